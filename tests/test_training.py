"""Training with ``compile(seht=...)``: the update, the logs and the state.

Backend-agnostic: runs under KERAS_BACKEND=torch, jax and tensorflow. The
update a train step applies is checked against `reference.
objective_gradient`, plain nested autodiff that shares no probe or
gradient-reuse code with the package, using a `FixedProbes` estimator so
that the random probe is known.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import reference
from conftest import (
    STRENGTH,
    FixedProbes,
    compile_plain,
    image_data,
    make_data,
    relu_mlp,
    tanh_mlp,
    tiny_cnn,
)

import keras_seht
from keras_seht import SEHTD, SEHTH
from keras_seht.data import load_digits

L2 = 0.05
LOSS = "sparse_categorical_crossentropy"


def random_probes(model, count, seed=1):
    """``count`` probes: the first Rademacher, the others sparse (+-1, 0)."""
    rng = np.random.default_rng(seed)
    probes = []
    for k in range(count):
        values = [-1.0, 1.0] if k == 0 else [-1.0, 0.0, 0.0, 1.0]
        probes.append(
            [
                rng.choice(values, size=v.shape).astype("float32")
                for v in model.trainable_variables
            ]
        )
    return probes


def numpy_weights(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
        for v in model.trainable_variables
    ]


def objective_gradient(model, x, y, probe, strength, sample_weight=None):
    """`reference.objective_gradient` in training mode."""
    return reference.objective_gradient(
        model,
        x,
        y,
        probe,
        strength,
        training=True,
        sample_weight=sample_weight,
    )


def _tanh_l2_mlp():
    return tanh_mlp(kernel_regularizer=keras.regularizers.L2(L2))


MODELS = {
    "tanh_l2": (_tanh_l2_mlp, make_data),
    "relu": (relu_mlp, make_data),
    "cnn_batchnorm": (tiny_cnn, image_data),
}


@pytest.mark.parametrize(
    "name, weighted, num_probes",
    [
        ("tanh_l2", False, 1),
        ("tanh_l2", True, 2),
        ("relu", False, 2),
        ("relu", True, 1),
        ("cnn_batchnorm", True, 2),
    ],
)
def test_update_is_gradient_of_penalized_loss(name, weighted, num_probes):
    build, data = MODELS[name]
    model = build()
    x, y = data(n=16)
    sample_weight = (
        np.random.default_rng(2).uniform(0.2, 2.0, size=len(x)).astype("f4")
        if weighted
        else None
    )
    probes = random_probes(model, num_probes)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=LOSS,
        seht=FixedProbes(probes),
    )
    before = numpy_weights(model)
    refs = [
        objective_gradient(model, x, y, p, STRENGTH, sample_weight)
        for p in probes
    ]
    loss = refs[0][0]
    trace = float(np.mean([r[1] for r in refs]))
    # grad(L + s * mean_k t_k) = mean_k grad(L + s * t_k).
    expected = [np.mean(g, axis=0) for g in zip(*[r[2] for r in refs])]
    plain = objective_gradient(model, x, y, probes[0], 0.0, sample_weight)[2]

    logs = model.train_on_batch(
        x, y, sample_weight=sample_weight, return_dict=True
    )

    applied = [b - a for b, a in zip(before, numpy_weights(model))]
    for got, want in zip(applied, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
    # The penalty moves the update well beyond the tolerance.
    penalty = max(np.max(np.abs(e - p)) for e, p in zip(expected, plain))
    assert penalty > 1e-3
    assert logs["seht_trace"] == pytest.approx(trace, rel=1e-4, abs=1e-6)
    assert logs["loss"] == pytest.approx(loss + STRENGTH * trace, rel=1e-5)
    assert logs["seht_skipped"] == 0.0
    if name == "tanh_l2":
        # The L2 term is large enough that leaving `model.losses` out of
        # the step (or out of its Hessian) would fail the checks above.
        assert loss > L2 * np.sum(before[0] ** 2) > 1e-3


def _dropout_mlp(cls, dropout_seed=None):
    return cls(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.3, seed=dropout_seed),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_seht_none_is_plain_keras_bit_for_bit():
    x, y = make_data(n=48)
    keras.utils.set_random_seed(5)
    plain = _dropout_mlp(keras.Sequential)
    keras.utils.set_random_seed(5)  # the same Dropout seed
    model = _dropout_mlp(keras_seht.Sequential)
    model.set_weights(plain.get_weights())
    initial = plain.get_weights()
    plain.compile(keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"])
    model.compile(
        keras.optimizers.Adam(1e-2), LOSS, metrics=["accuracy"], seht=None
    )
    assert model.seht is None
    histories = []
    for m in (plain, model):
        keras.utils.set_random_seed(11)  # the same shuffles
        histories.append(
            m.fit(x, y, epochs=2, batch_size=16, verbose=0).history
        )
    assert set(histories[1]) == {"loss", "accuracy"}
    assert histories[1] == histories[0]
    for got, want, start in zip(
        model.get_weights(), plain.get_weights(), initial
    ):
        assert np.array_equal(got, want)
        assert not np.array_equal(got, start)


def test_seht_trace_log_is_epoch_mean():
    x, y = image_data(n=48)
    model = tiny_cnn()
    probes = random_probes(model, 1)
    model.compile(
        keras.optimizers.SGD(learning_rate=0.0),
        LOSS,
        seht=FixedProbes(probes),
    )
    batch_size = 16  # the batch shape of the update test
    losses, traces = [], []
    for start in range(0, len(x), batch_size):
        # Training mode, as in the train step: BatchNorm batch statistics.
        loss, trace, _ = objective_gradient(
            model,
            x[start : start + batch_size],
            y[start : start + batch_size],
            probes[0],
            STRENGTH,
        )
        losses.append(loss)
        traces.append(trace)
    assert np.ptp(traces) > 0.05 * np.mean(np.abs(traces))
    recorder = LogRecorder()

    history = model.fit(
        x,
        y,
        epochs=1,
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    ).history

    assert history["seht_trace"][0] == pytest.approx(np.mean(traces), rel=1e-4)
    assert history["loss"][0] == pytest.approx(
        np.mean(losses) + STRENGTH * np.mean(traces), rel=1e-4
    )
    assert history["seht_skipped"] == [0.0]
    # Batch logs are running means, as for any Keras metric.
    running = np.cumsum(traces) / np.arange(1, len(traces) + 1)
    logged = [logs["seht_trace"] for logs in recorder.batch_logs]
    np.testing.assert_allclose(logged, running, rtol=1e-4)


def _seeded_fit(seed, initial_weights=None):
    keras.utils.set_random_seed(seed)
    x, y = make_data(n=32)
    # The Dropout masks have their own seed: with the same initial weights,
    # only the probes depend on the global seed.
    model = _dropout_mlp(keras_seht.Sequential, dropout_seed=3)
    if initial_weights is not None:
        model.set_weights(initial_weights)
    initial = model.get_weights()
    model.compile(
        keras.optimizers.SGD(0.1), LOSS, seht=SEHTD(p=0.1, strength=1e-2)
    )
    history = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    return initial, history.history, model.get_weights()


def test_seed_determines_training():
    initial, history_a, weights_a = _seeded_fit(7)
    _, history_b, weights_b = _seeded_fit(7)
    assert history_a == history_b
    assert all(np.array_equal(a, b) for a, b in zip(weights_a, weights_b))
    # Another global seed, the same initial weights and Dropout masks.
    _, history_c, _ = _seeded_fit(8, initial_weights=initial)
    assert history_c["seht_trace"] != history_a["seht_trace"]


def test_nan_estimate_applies_plain_gradient_and_warns_once():
    x, y = make_data(n=32)
    model = _tanh_l2_mlp()
    plain = _tanh_l2_mlp()
    plain.set_weights(model.get_weights())
    probe = random_probes(model, 1)[0]
    probe[0][0, 0] = np.nan  # one NaN entry makes t NaN
    model.compile(keras.optimizers.SGD(0.1), LOSS, seht=FixedProbes([probe]))
    compile_plain(plain, optimizer=keras.optimizers.SGD(0.1))
    fit_kwargs = dict(epochs=2, batch_size=8, shuffle=False, verbose=0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, **fit_kwargs).history
        second = model.fit(x, y, **fit_kwargs).history
    plain_losses = []
    for _ in range(2):
        plain_losses += plain.fit(x, y, **fit_kwargs).history["loss"]

    skip_warnings = [
        w
        for w in caught
        if issubclass(w.category, RuntimeWarning)
        and "was NaN/Inf" in str(w.message)
    ]
    assert len(skip_warnings) == 1, [str(w.message) for w in caught]
    assert history["seht_skipped"] == [4.0, 4.0]
    assert second["seht_skipped"] == [4.0, 4.0]
    np.testing.assert_allclose(
        history["loss"] + second["loss"], plain_losses, rtol=1e-5
    )
    for got, want in zip(model.get_weights(), plain.get_weights()):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class LogRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batch_logs = []
        self.test_batch_logs = []
        self.epoch_logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs or {}))

    def on_test_batch_end(self, batch, logs=None):
        self.test_batch_logs.append(dict(logs or {}))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append(dict(logs or {}))


def test_fit_with_validation_callbacks_and_metrics():
    x, y = make_data(n=32)
    x_val, y_val = make_data(n=16, seed=1)
    model = tanh_mlp()
    model.compile(
        keras.optimizers.SGD(0.05),
        LOSS,
        metrics=["accuracy"],
        seht=SEHTH(strength=0.5),
    )
    recorder = LogRecorder()

    history = model.fit(
        x,
        y,
        validation_data=(x_val, y_val),
        epochs=2,
        batch_size=8,
        callbacks=[recorder],
        verbose=0,
    ).history

    train_keys = {
        "loss",
        "accuracy",
        "seht_trace",
        "seht_negative_fraction",
        "seht_skipped",
        "seht_update_skipped",
        "seht_step_skipped",
    }
    val_keys = {"val_loss", "val_accuracy"}
    assert set(history) == train_keys | val_keys
    assert "val_seht_trace" not in history
    assert len(recorder.batch_logs) == 8
    for logs in recorder.batch_logs:
        assert set(logs) == train_keys
        assert np.isfinite(logs["seht_trace"])
    assert recorder.test_batch_logs
    for logs in recorder.test_batch_logs:
        assert set(logs) == {"loss", "accuracy"}
    for logs in recorder.epoch_logs:
        assert set(logs) == train_keys | val_keys
    # Validation reports the plain loss, without the penalty.
    weights = [v.value for v in model.trainable_variables]
    plain = reference.loss_fn(model, x_val, y_val, False)(weights)
    val_loss = float(keras.ops.convert_to_numpy(plain))
    assert history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-5)
    evaluated = model.evaluate(x_val, y_val, return_dict=True, verbose=0)
    assert set(evaluated) == {"loss", "accuracy"}
    assert evaluated["loss"] == pytest.approx(val_loss, rel=1e-5)


def _digits_initial_weights(seed=0):
    """Glorot-uniform weights from NumPy: the same under every backend."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in ((64, 16), (16, 10)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, (fan_in, fan_out))
        weights += [kernel.astype("float32"), np.zeros(fan_out, "float32")]
    return weights


def _digits_run(x, y, seht):
    keras.utils.set_random_seed(0)
    model = keras_seht.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.set_weights(_digits_initial_weights())
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        LOSS,
        metrics=["accuracy"],
        seht=seht,
    )
    history = model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    return model, history.history["accuracy"][-1]


def test_seht_h_lowers_hessian_trace_on_digits():
    """Training with SEHT-H ends at a clearly flatter point, still fitting.

    A ReLU hidden layer makes the loss linear in each single weight (given
    the activation pattern), so the Hessian trace equals its Gauss-Newton
    part and cannot be lowered by moving to negative curvature (with tanh,
    strength 0.1 drove the trace to -200 and accuracy to chance). Measured
    trace ratios: 0.60 torch, 0.59 JAX, 0.56 TensorFlow (0.56-0.62 over 5
    weight seeds on torch); accuracy 0.92-0.94 against 0.95-0.96.
    """
    (x, y), _ = load_digits(flatten=True)
    x, y = x[:1344], y[:1344]  # 21 full batches: one compiled step shape
    x_sub, y_sub = x[:256], y[:256]
    baseline, base_accuracy = _digits_run(x, y, None)
    regular, seht_accuracy = _digits_run(x, y, SEHTH(max_iter=3, strength=0.03))
    trace_base = keras_seht.exact_hessian_trace(baseline, x_sub, y_sub)
    trace_seht = keras_seht.exact_hessian_trace(regular, x_sub, y_sub)
    assert base_accuracy > 0.9
    assert seht_accuracy > 0.85
    assert 0 < trace_seht < 0.7 * trace_base, (trace_seht, trace_base)
