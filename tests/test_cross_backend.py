"""The same weights, data and sigma give the same t and update everywhere.

One subprocess per Keras backend (the backend is fixed at import) loads the
same weights, batch and probe (`CurvatureEstimator.sample_probes` with a
NumPy generator: a draw that is identical on every backend), takes one
SEHT step with SGD(learning_rate=1) and reports the logged t and loss, the
applied update and the exact Hessian trace. All must agree to 1e-4
relative (float32).

The comparison runs once, in the torch pass of the suite (it starts all
three backends itself).
"""

from __future__ import annotations

import pathlib
import textwrap

import keras
import numpy as np
import pytest
from conftest import run_script_result

BACKENDS = ("torch", "jax", "tensorflow")
RTOL = 1e-4

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="starts every backend itself; runs once, in the torch pass",
)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras_seht, keras
    from keras_seht import SEHTD, SEHTH
    sys.path.insert(0, TESTS)
    from conftest import FixedProbes

    def mlp():
        return keras_seht.Sequential([
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh",
                               kernel_regularizer=keras.regularizers.L2(0.01)),
            keras.layers.Dense(3, activation="softmax"),
        ])

    def cnn():
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(2, 3, use_bias=False)(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Activation("tanh")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        outputs = keras.layers.Dense(3, activation="softmax")(h)
        return keras_seht.Model(inputs, outputs)

    rng = np.random.default_rng(0)
    results = {}
    for name, build, shape, estimator in [
        ("mlp_seht_h", mlp, (5,), SEHTH(max_iter=2)),
        ("mlp_seht_d", mlp, (5,), SEHTD(p=0.3, layer_p=0.5, unbiased=True)),
        ("cnn_seht_h", cnn, (6, 6, 1), SEHTH()),
    ]:
        keras.utils.set_random_seed(0)
        model = build()
        weights = [rng.normal(scale=0.7, size=w.shape).astype("float32")
                   if w.trainable else w.numpy()
                   for w in model.weights]
        model.set_weights(weights)
        x = rng.normal(size=(12,) + shape).astype("float32")
        y = rng.integers(0, 3, size=12).astype("int32")
        layout = keras_seht.weight_layout(model)
        probes = [
            estimator.sample_probes(
                layout, seed=np.random.default_rng(10 + k)
            )
            for k in range(estimator.max_iter)
        ]
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss="sparse_categorical_crossentropy",
                      seht=FixedProbes(probes, strength=0.5))
        exact = keras_seht.exact_hessian_trace(model, x, y)
        before = [np.array(v.numpy()) for v in model.trainable_variables]
        logs = model.train_on_batch(x, y, return_dict=True)
        after = [np.array(v.numpy()) for v in model.trainable_variables]
        results[name] = {
            "seht_trace": float(logs["seht_trace"]),
            "loss": float(logs["loss"]),
            "exact": float(exact),
            "update": [(b - a).tolist() for a, b in zip(after, before)],
            "probes": [[p.tolist() for p in probe] for probe in probes],
        }
    print("RESULT" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {
        backend: run_script_result(
            SCRIPT.replace("TESTS", repr(str(pathlib.Path(__file__).parent))),
            KERAS_BACKEND=backend,
            OMP_NUM_THREADS="1",
        )
        for backend in BACKENDS
    }


@pytest.mark.parametrize("case", ["mlp_seht_h", "mlp_seht_d", "cnn_seht_h"])
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backends_agree(results, case, backend):
    ref, other = results["torch"][case], results[backend][case]
    # The probes really are the same draw everywhere.
    for p, q in zip(ref["probes"], other["probes"]):
        for a, b in zip(p, q):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ref["seht_trace"] != 0.0
    for key in ("seht_trace", "loss", "exact"):
        np.testing.assert_allclose(other[key], ref[key], rtol=RTOL, err_msg=key)
    flat_ref = np.concatenate([np.ravel(u) for u in ref["update"]])
    flat = np.concatenate([np.ravel(u) for u in other["update"]])
    scale = np.abs(flat_ref).max()
    np.testing.assert_allclose(flat, flat_ref, rtol=RTOL, atol=RTOL * scale)
