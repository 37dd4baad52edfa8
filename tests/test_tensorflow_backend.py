"""The TensorFlow SEHT train step and HVP, against independent references.

Runs only under ``KERAS_BACKEND=tensorflow``. The reference gradients come
from ``tests/reference.py``: three nested ``tf.GradientTape``s around the
stateless compiled loss, recomputed from scratch for a given probe.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

if keras.config.backend() != "tensorflow":
    pytest.skip(
        "TensorFlow-backend tests (set KERAS_BACKEND=tensorflow)",
        allow_module_level=True,
    )

import tensorflow as tf  # noqa: E402
from conftest import (  # noqa: E402
    FixedProbes,
    image_data,
    make_data,
    rademacher_probe,
    relu_mlp,
    tanh_mlp,
    tiny_cnn,
)
from reference import (  # noqa: E402
    finite_difference_diagonal,
    loss_fn,
    loss_gradient,
    objective_gradient,
)

import keras_seht  # noqa: E402
from keras_seht import _keras_compat as compat  # noqa: E402
from keras_seht import variants  # noqa: E402
from keras_seht.backend import tensorflow as tf_backend  # noqa: E402
from keras_seht.layout import weight_layout  # noqa: E402
from keras_seht.operators import HessianOperator  # noqa: E402
from keras_seht.spectrum import quadratic_forms  # noqa: E402

STRENGTH = 0.1


def _weights(model):
    return [np.asarray(v.numpy(), "float64") for v in model.trainable_weights]


def _probes(model, seed=0):
    """A sparse SEHT-D-like probe (first layer off) and a Rademacher one."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(v.shape) for v in model.trainable_weights]
    sparse = [rng.choice([-1.0, 0.0, 1.0], size=s) for s in shapes]
    sparse[0] = np.zeros(shapes[0])
    dense = rademacher_probe(shapes, rng)
    return [sparse, dense]


def _regularized_mlp():
    return tanh_mlp(kernel_regularizer=keras.regularizers.l2(0.05))


def _check_update(model, x, y, probes, **compile_kwargs):
    """One step with SGD(1) moves w by -grad[L + strength * mean_k t_k]."""
    model.compile(
        optimizer=compile_kwargs.pop("optimizer", keras.optimizers.SGD(1.0)),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes(probes),
        **compile_kwargs,
    )
    before = _weights(model)
    references = [
        objective_gradient(model, x, y, p, STRENGTH, training=True)
        for p in probes
    ]
    loss = references[0][0]
    trace = float(np.mean([t for _, t, _ in references]))
    expected = [
        np.mean([grads[i] for _, _, grads in references], axis=0)
        for i in range(len(before))
    ]
    logs = model.train_on_batch(x, y, return_dict=True)
    after = _weights(model)
    plain = loss_gradient(model, x, y, before, training=True)
    for w0, w1, g, g_plain in zip(before, after, expected, plain):
        np.testing.assert_allclose(w0 - w1, g, rtol=1e-4, atol=1e-6)
        assert not np.allclose(g, g_plain, rtol=1e-3)  # the penalty counts
    np.testing.assert_allclose(logs["seht_trace"], trace, rtol=1e-4)
    np.testing.assert_allclose(logs["loss"], loss + STRENGTH * trace, rtol=1e-5)
    assert logs["seht_skipped"] == 0.0


@pytest.mark.parametrize(
    "mode", ["graph", "eager", "xla"], ids=["graph", "eager", "xla"]
)
def test_update_matches_independent_gradient(mode):
    model = _regularized_mlp()
    x, y = make_data()
    kwargs = {
        "graph": {"jit_compile": False},
        "eager": {"run_eagerly": True},
        "xla": {"jit_compile": True},
    }[mode]
    _check_update(model, x, y, _probes(model), **kwargs)


def test_update_with_loss_scale_optimizer():
    """The scaled loss is differentiated; the update and logs are not."""
    model = _regularized_mlp()
    x, y = make_data()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1.0), initial_scale=2.0**10
    )
    _check_update(
        model,
        x,
        y,
        _probes(model)[1:],
        optimizer=optimizer,
        jit_compile=False,
    )


def test_non_finite_trace_applies_plain_gradient():
    model = _regularized_mlp()
    x, y = make_data()
    probe = _probes(model)[1]
    probe[-1] = np.full_like(probe[-1], np.inf)
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe]),
        jit_compile=False,
    )
    before = _weights(model)
    plain = loss_gradient(model, x, y, before, training=True)
    values = [v.value for v in model.trainable_variables]
    loss = float(loss_fn(model, x, y, training=True)(values))
    logs = model.train_on_batch(x, y, return_dict=True)
    for w0, w1, g in zip(before, _weights(model), plain):
        assert np.all(np.isfinite(w1))
        np.testing.assert_allclose(w0 - w1, g, rtol=1e-4, atol=1e-6)
    assert logs["seht_skipped"] == 1.0
    np.testing.assert_allclose(logs["loss"], loss, rtol=1e-5)


def test_batchnorm_statistics_match_plain_step():
    x, y = image_data()
    seht_model, plain_model = tiny_cnn(), tiny_cnn()
    plain_model.set_weights(seht_model.get_weights())
    seht_model.compile(
        "sgd",
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTH(strength=0.1),
        jit_compile=False,
    )
    plain_model.compile("sgd", "sparse_categorical_crossentropy")
    initial = [v.numpy().copy() for v in seht_model.non_trainable_weights]
    seht_model.train_on_batch(x, y)
    plain_model.train_on_batch(x, y)
    seht_stats = seht_model.non_trainable_weights
    plain_stats = plain_model.non_trainable_weights
    assert len(seht_stats) == len(plain_stats) == 2
    for a, b, c in zip(seht_stats, plain_stats, initial):
        assert not np.allclose(a.numpy(), c)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def _history(seed):
    keras.utils.set_random_seed(seed)
    model = tanh_mlp()
    model.compile(
        "sgd",
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTD(p=0.25, strength=0.05),
        jit_compile=False,
    )
    x, y = make_data(n=32)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    return history, _weights(model)


def test_same_seed_same_history():
    history_a, weights_a = _history(7)
    history_b, weights_b = _history(7)
    assert history_a == history_b
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(history_a["loss"]))
    assert history_a["seht_trace"][0] != history_a["seht_trace"][1]


def test_mixed_float16_trains():
    keras.config.set_dtype_policy("mixed_float16")
    model = tiny_cnn()
    model.compile(
        "sgd",
        "sparse_categorical_crossentropy",
        seht=keras_seht.SEHTH(strength=0.01),
        jit_compile=False,
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = image_data()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert np.all(np.isfinite(history["seht_trace"]))


def _hessian(model, x, y, training=False):
    """The full Hessian of the stateless loss, by tape.jacobian."""
    values = [tf.Variable(v.value) for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    x, y, _ = keras_seht.functional.as_tensors(x, y, None)
    # Exact BatchNorm moments (tested against a closed form below).
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner, compat.exact_tf_moments():
            loss, _, _ = keras_seht.functional.stateless_loss(
                model, values, non_trainable, x, y, None, training
            )
        grads = inner.gradient(loss, values)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    rows = outer.jacobian(flat, values)
    return tf.concat(
        [tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1
    ).numpy()


@pytest.mark.parametrize("training", [False, True])
def test_hessian_vector_product(training):
    model = tiny_cnn()
    x, y = image_data()
    model.compile(loss="sparse_categorical_crossentropy")
    before = [v.numpy().copy() for v in model.variables]
    hvp = HessianOperator(model, x, y, training=training)
    hessian = _hessian(model, x, y, training)
    rng = np.random.default_rng(0)
    vectors = [
        rng.normal(size=v.shape).astype("float32")
        for v in model.trainable_variables
    ]
    flat_v = np.concatenate([v.reshape(-1) for v in vectors])
    product = np.concatenate([np.reshape(h, -1) for h in hvp(vectors)])
    np.testing.assert_allclose(product, hessian @ flat_v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        quadratic_forms(hvp, hvp.shapes, [vectors])[0],
        flat_v @ hessian @ flat_v,
        rtol=1e-4,
    )
    diagonal = np.concatenate(
        [np.reshape(d, -1) for d in hvp.diagonal(chunk_size=7)]
    )
    np.testing.assert_allclose(diagonal, np.diag(hessian), rtol=1e-4, atol=1e-6)
    assert isinstance(hvp.products.loss, float)
    for a, v in zip(before, model.variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_diagonal_matches_finite_differences():
    model = tanh_mlp()
    model.compile(loss="sparse_categorical_crossentropy")
    x, y = make_data()
    hvp = HessianOperator(model, x, y)
    reference = finite_difference_diagonal(model, x, y)
    for d, r in zip(hvp.diagonal(), reference):
        np.testing.assert_allclose(d, r, atol=2e-3)


def test_batchnorm_moments_are_twice_differentiable():
    """Keras' TF moments stop the mean's gradient; SEHT's must not.

    For v(x) = mean((x - mean(x))^2), d^2 v / dx_i^2 = 2/n - 2/n^2.
    """
    n = 5
    x = tf.constant(np.linspace(-1.0, 2.0, n), tf.float64)
    bn = keras.layers.BatchNormalization(center=False, scale=False)

    def second_derivative():
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                _, variance = bn._moments(tf.reshape(x, (n, 1)), None)
            g = inner.gradient(variance, x)
        return outer.jacobian(g, x).numpy()

    expected = np.full((n, n), -2.0 / n**2) + np.eye(n) * 2.0 / n
    with compat.exact_tf_moments():
        np.testing.assert_allclose(second_derivative(), expected, 1e-12)
    # Outside the context Keras' own moments are in force again (and wrong
    # at second order: the -2/n^2 coupling is missing).
    assert not np.allclose(second_derivative(), expected)


# --------------------------------------------------------------------------
# The forward-over-reverse step and its probed-variable variants
# --------------------------------------------------------------------------

FORWARD_MODELS = {
    "tanh": (tanh_mlp, make_data),
    "relu": (relu_mlp, make_data),
    "cnn_batchnorm": (tiny_cnn, image_data),
}


def _layer_probe(model, layers, seed=1):
    """A Rademacher probe on the variables of `layers` (layout indices,
    "output" for the last layer), zero elsewhere."""
    layout = weight_layout(model)
    chosen = {layout.output_layer if j == "output" else j for j in layers}
    rng = np.random.default_rng(seed)
    owner = layout.layer_of()
    return [
        rng.choice([-1.0, 1.0], size=shape).astype("float32")
        if owner[i] in chosen
        else np.zeros(shape, "float32")
        for i, shape in enumerate(layout.shapes)
    ]


def _no_tapes(monkeypatch):
    """Makes the nested-tape path fail: the step must not fall back."""

    def fail(self, make_plan, evaluate):
        raise AssertionError("the step fell back to the nested tapes")

    monkeypatch.setattr(tf_backend.StepRun, "_nested_tapes", fail)


@pytest.mark.parametrize("name", sorted(FORWARD_MODELS))
@pytest.mark.parametrize(
    "layers, sparse",
    [
        (("output",), True),
        ((0,), True),
        ((0, "output"), True),
        ((), True),
        ((0, "output"), False),
    ],
    ids=str,
)
def test_forward_mode_variants_are_exact(name, layers, sparse, monkeypatch):
    """Each variant (the probed layers and up; none) equals nested tapes.

    The update of one SGD(1) step against three nested tapes from scratch
    (`reference.objective_gradient`), to float32 round-off; with no layer
    probed, t = 0 exactly and the loss is the plain one. `sparse`: the
    step picks among the variants (as for SEHT-D on a large model; forced
    here on these small ones), else one program (SEHT-H).
    """
    _no_tapes(monkeypatch)
    monkeypatch.setattr(
        variants, "sparse_layers", lambda penalties, layout: sparse
    )
    build, data = FORWARD_MODELS[name]
    model = build()
    x, y = data(n=16)
    probe = _layer_probe(model, layers)
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe]),
        jit_compile=False,
    )
    loss, t, expected = objective_gradient(
        model, x, y, probe, STRENGTH, training=True
    )
    before = _weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    for w0, w1, g in zip(before, _weights(model), expected):
        np.testing.assert_allclose(w0 - w1, g, rtol=1e-4, atol=2e-6)
    assert logs["seht_trace"] == pytest.approx(t, rel=1e-4, abs=1e-6)
    if not layers:
        assert t == 0.0 and logs["seht_trace"] == 0.0
        assert logs["loss"] == pytest.approx(loss, rel=1e-6)


def test_variant_index_covers_every_probed_layer():
    """The chosen variant starts at or below the lowest probed layer."""
    groups = [(0, 1), (2,), (3, 4), (5,), (6, 7), (8, 9)]
    starts = tf_backend._variant_starts(groups)
    assert starts[0] == 0 and starts[-1] == len(groups) - 1
    assert starts == sorted(set(starts))
    shapes = [(2,)] * 10
    owner = [j for j, g in enumerate(groups) for _ in g]
    for lowest in range(len(groups)):
        probe = [
            tf.ones(s) if owner[i] >= lowest else tf.zeros(s)
            for i, s in enumerate(shapes)
        ]
        index = int(tf_backend._variant_index([probe], groups, starts))
        assert starts[index] <= lowest
        # The last such variant: the next one would miss the layer.
        assert index == len(starts) - 1 or starts[index + 1] > lowest
    nothing = [tf.zeros(s) for s in shapes]
    index = tf_backend._variant_index([nothing, nothing], groups, starts)
    assert int(index) == len(starts)


def _tiny_lstm():
    keras.utils.set_random_seed(0)
    return keras_seht.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.LSTM(3),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_rnn_falls_back_to_exact_tapes(monkeypatch):
    """Forward mode has no rule for the TensorList ops of Keras' RNN loop.

    The step then takes the nested tapes (and stays exact).
    """
    calls = []
    original = tf_backend.StepRun._nested_tapes

    def spy(self, make_plan, evaluate):
        calls.append(True)
        return original(self, make_plan, evaluate)

    monkeypatch.setattr(tf_backend.StepRun, "_nested_tapes", spy)
    model = _tiny_lstm()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 3)).astype("float32")
    y = rng.integers(0, 3, size=8).astype("int32")
    probe = rademacher_probe(
        [tuple(v.shape) for v in model.trainable_weights], rng
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe]),
        jit_compile=False,
    )
    _, t, expected = objective_gradient(model, x, y, probe, STRENGTH)
    before = _weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert calls
    for w0, w1, g in zip(before, _weights(model), expected):
        np.testing.assert_allclose(w0 - w1, g, rtol=1e-4, atol=2e-6)
    assert logs["seht_trace"] == pytest.approx(t, rel=1e-4)
