"""The JAX train step and HVP (``keras_seht/backend/jax.py``).

The update is checked against an independent plain-JAX computation: a
hand-written ``jnp`` MLP with the model's weights, whose Hessian comes from
``jax.hessian`` of the flattened weight vector (no Keras, no keras_seht).
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import keras
import numpy as np
import pytest
from conftest import FixedProbes, rademacher_probe, run_script_result

if keras.config.backend() != "jax":
    pytest.skip("JAX backend tests", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import keras_seht  # noqa: E402
from keras_seht.operators import HessianOperator  # noqa: E402
from keras_seht.spectrum import quadratic_forms  # noqa: E402

L2 = 0.05
STRENGTH = 0.1


def _data(n: int = 8, d: int = 4, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, k, size=(n,)).astype("int32")
    return x, y


def _regularized_mlp() -> keras.Model:
    return keras_seht.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                3,
                activation="tanh",
                kernel_regularizer=keras.regularizers.L2(L2),
            ),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


#: Shapes of the trainable weights of `_regularized_mlp`, in model order.
MLP_SHAPES = ((4, 3), (3,), (3, 3), (3,))


def _flatten(arrays) -> jax.Array:
    return jnp.concatenate([jnp.ravel(jnp.asarray(a)) for a in arrays])


def _reference_loss(theta, x, y):
    """`_regularized_mlp`'s compiled loss, written out in jnp."""
    weights, offset = [], 0
    for shape in MLP_SHAPES:
        size = int(np.prod(shape))
        weights.append(theta[offset : offset + size].reshape(shape))
        offset += size
    w1, b1, w2, b2 = weights
    probs = jax.nn.softmax(jnp.tanh(x @ w1 + b1) @ w2 + b2)
    nll = -jnp.log(probs[jnp.arange(y.shape[0]), y])
    return jnp.mean(nll) + L2 * jnp.sum(w1**2)


@jax.jit
def _reference_objective(theta, x, y, sigmas):
    """(grad of L + s*t, L, t), t = mean_k sigma_k^T H sigma_k."""

    def trace(th):
        hessian = jax.hessian(_reference_loss)(th, x, y)
        return jnp.mean(jnp.einsum("ki,ij,kj->k", sigmas, hessian, sigmas))

    grad = jax.grad(
        lambda th: _reference_loss(th, x, y) + STRENGTH * trace(th)
    )(theta)
    return grad, _reference_loss(theta, x, y), trace(theta)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_update_matches_plain_jax(jit_compile):
    x, y = _data()
    model = _regularized_mlp()
    rng = np.random.default_rng(1)
    shapes = [v.shape for v in model.trainable_variables]
    probes = [rademacher_probe(shapes, rng) for _ in range(2)]
    probes[1][0][:] = 0.0  # a sparse probe, as SEHT-D draws
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes(probes, strength=STRENGTH),
        jit_compile=jit_compile,
    )
    before = [np.asarray(v.value) for v in model.trainable_variables]
    grad, loss, trace = _reference_objective(
        _flatten(before), x, y, jnp.stack([_flatten(p) for p in probes])
    )
    grad, loss, trace = np.asarray(grad), float(loss), float(trace)

    logs = model.train_on_batch(x, y, return_dict=True)

    after = np.concatenate(
        [np.ravel(v.value) for v in model.trainable_variables]
    )
    expected = np.concatenate([np.ravel(w) for w in before]) - grad
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    assert logs["seht_trace"] == pytest.approx(trace, rel=1e-4)
    assert logs["loss"] == pytest.approx(loss + STRENGTH * trace, rel=1e-5)
    assert logs["seht_skipped"] == 0.0


def test_non_finite_trace_applies_plain_gradient():
    x, y = _data()
    model = _regularized_mlp()
    probe = [
        np.full(v.shape, np.inf, "float32") for v in model.trainable_variables
    ]
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe], strength=STRENGTH),
    )
    theta = _flatten([v.value for v in model.trainable_variables])
    grad = np.asarray(jax.jit(jax.grad(_reference_loss))(theta, x, y))
    loss = float(_reference_loss(theta, x, y))

    logs = model.train_on_batch(x, y, return_dict=True)

    after = _flatten([v.value for v in model.trainable_variables])
    np.testing.assert_allclose(after, theta - grad, rtol=1e-5, atol=1e-7)
    assert logs["seht_skipped"] == 1.0
    assert logs["loss"] == pytest.approx(loss, rel=1e-6)


def _bn_model() -> keras.Model:
    return keras_seht.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_batchnorm_statistics_update_once():
    x, y = _data(n=16)
    seht_model, plain = _bn_model(), _bn_model()
    plain.set_weights(seht_model.get_weights())
    seht_model.compile(
        "sgd",
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTH(max_iter=2),
    )
    plain.compile("sgd", "sparse_categorical_crossentropy")
    seht_model.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    bn_seht, bn_plain = seht_model.layers[1], plain.layers[1]
    for name in ("moving_mean", "moving_variance"):
        got = np.asarray(getattr(bn_seht, name).value)
        want = np.asarray(getattr(bn_plain, name).value)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(bn_seht.moving_mean.value), 0.0)


class _BatchTraces(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.traces: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.traces.append(float(logs["seht_trace"]))


def _seeded_run(seed: int) -> tuple[dict[str, Any], list[float]]:
    keras.utils.set_random_seed(seed)
    x, y = _data(n=32)
    model = keras_seht.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTD(p=0.3, strength=1e-2),
    )
    traces = _BatchTraces()
    history = model.fit(
        x, y, epochs=1, batch_size=8, verbose=0, callbacks=[traces]
    )
    return history.history, traces.traces


def test_same_seed_same_history():
    history_a, traces_a = _seeded_run(7)
    keras.backend.clear_session()
    history_b, traces_b = _seeded_run(7)
    assert history_a == history_b
    assert traces_a == traces_b


def test_probes_are_fresh_every_step():
    """With a zero learning rate only the probes can change the trace."""
    x, y = _data()
    model = _regularized_mlp()
    model.compile(
        keras.optimizers.SGD(0.0),
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTH(),
    )
    traces = [
        model.train_on_batch(x, y, return_dict=True)["seht_trace"]
        for _ in range(3)
    ]
    assert len(set(traces)) == 3


def test_hvp_matches_jax_hessian():
    x, y = _data()
    model = _regularized_mlp()
    model.compile("sgd", "sparse_categorical_crossentropy")
    weights = [np.asarray(v.value) for v in model.trainable_variables]
    hvp = HessianOperator(model, x, y)
    before = [np.asarray(v.value) for v in model.variables]

    rng = np.random.default_rng(3)
    vec = [rng.normal(size=w.shape).astype("float32") for w in weights]
    flat = np.asarray(_flatten(vec))
    theta = _flatten(weights)
    hessian = np.asarray(jax.jit(jax.hessian(_reference_loss))(theta, x, y))
    loss = float(_reference_loss(theta, x, y))
    got = np.concatenate([np.ravel(h) for h in hvp(vec)])
    np.testing.assert_allclose(got, hessian @ flat, rtol=1e-4, atol=1e-6)
    assert quadratic_forms(hvp, hvp.shapes, [vec])[0] == pytest.approx(
        float(flat @ hessian @ flat), rel=1e-4
    )
    assert hvp.products.loss == pytest.approx(loss, rel=1e-6)
    diag = np.concatenate([np.ravel(d) for d in hvp.diagonal(chunk_size=7)])
    np.testing.assert_allclose(diag, np.diag(hessian), rtol=1e-4, atol=1e-6)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, np.asarray(v.value))


_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, keras, numpy as np
    import keras_seht

    def run(distributed):
        if distributed:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=jax.devices())
            )
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4)).astype("float32")
        y = rng.integers(0, 3, size=(32,)).astype("int32")
        model = keras_seht.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ])
        model.compile(
            keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
            seht=keras_seht.SEHTH(max_iter=2, strength=1e-2),
        )
        history = model.fit(
            x, y, epochs=2, batch_size=16, shuffle=False, verbose=0
        )
        if distributed:  # the state really lives on both devices
            devices = model.trainable_variables[0].value.sharding.device_set
            assert len(devices) == 2, devices
        weights = [np.asarray(w).tolist() for w in model.get_weights()]
        return {"history": history.history, "weights": weights}

    assert len(jax.devices()) == 2, jax.devices()
    single = run(False)
    parallel = run(True)
    print("RESULT" + json.dumps({"single": single, "parallel": parallel}))
    """
)


def test_data_parallel_matches_single_device():
    xla_flags = os.environ.get("XLA_FLAGS", "")
    result = run_script_result(
        _DATA_PARALLEL_SCRIPT,
        timeout=300,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            xla_flags + " --xla_force_host_platform_device_count=2"
        ).strip(),
    )
    single, parallel = result["single"], result["parallel"]
    assert single["history"].keys() == parallel["history"].keys()
    for key in ("loss", "seht_trace"):
        np.testing.assert_allclose(
            parallel["history"][key], single["history"][key], rtol=1e-4
        )
    for w_single, w_parallel in zip(single["weights"], parallel["weights"]):
        np.testing.assert_allclose(w_parallel, w_single, rtol=1e-4, atol=1e-6)


class ClippedTanh(keras.layers.Layer):
    """tanh with a custom (clipped) gradient: a custom_vjp under JAX."""

    def call(self, x):
        @keras.ops.custom_gradient
        def clipped_tanh(x):
            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                return keras.ops.clip(upstream, -0.5, 0.5)

            return keras.ops.tanh(x), grad

        return clipped_tanh(x)


def test_custom_gradient_layer_trains_forward_over_reverse():
    # A custom_vjp has no forward mode: the step must detect it and take
    # its Hessian-vector products forward-over-reverse (which uses the
    # custom backward rule), the same products as `HessianOperator`.
    x, y = _data()
    model = keras_seht.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            ClippedTanh(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    probe = [
        np.random.default_rng(i).choice([-1.0, 1.0], size=v.shape)
        for i, v in enumerate(model.trainable_variables)
    ]
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe], strength=STRENGTH),
    )
    hvp = HessianOperator(model, x, y, training=True)
    (expected,) = quadratic_forms(
        hvp, hvp.shapes, [[jnp.asarray(p, "float32") for p in probe]]
    )

    logs = model.train_on_batch(x, y, return_dict=True)

    assert logs["seht_trace"] == pytest.approx(expected, rel=1e-4)
    assert logs["seht_skipped"] == 0.0
    assert all(
        np.isfinite(keras.ops.convert_to_numpy(v.value)).all()
        for v in model.trainable_variables
    )
