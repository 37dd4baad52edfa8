"""The baseline penalties (Jacobian, confidence, gradient norm) in training.

Backend-agnostic. The truth is independent of every autodiff framework: a
one-hidden-layer tanh network written out in float64 NumPy, whose loss,
loss gradient (by hand), Jacobian norm and entropy are closed forms, and
whose objective's gradient is taken by central finite differences. A train
step with SGD(learning_rate=1) must apply exactly minus that gradient (to
float32 precision).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import reference
from conftest import FixedProbes, make_data, rademacher_probe

import keras_seht
from keras_seht import SEHTD, regularizers
from keras_seht.regularizers import ConfidencePenalty, GradientNorm, Jacobian

D, HIDDEN, K, N = 4, 5, 3, 8

# float32 arithmetic in the step against a float64 truth: relative
# round-off of a few float32 ulps (1.2e-7) accumulated over ~100 ops.
RTOL, ATOL = 2e-5, 2e-6


# ---------------------------------------------------------------- the truth


def _forward(params, x):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    return h, h @ w2 + b2


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_loss(params, x, y):
    _, z = _forward(params, x)
    return -np.mean(_log_softmax(z)[np.arange(len(y)), y])


def np_loss_gradient(params, x, y):
    """Backpropagation by hand."""
    w1, b1, w2, b2 = params
    h, z = _forward(params, x)
    dz = np.exp(_log_softmax(z))
    dz[np.arange(len(y)), y] -= 1.0
    dz /= len(y)
    da = (dz @ w2.T) * (1.0 - h**2)
    return [x.T @ da, da.sum(0), h.T @ dz, dz.sum(0)]


def np_jacobian_norm(params, x):
    """mean_i ||dz_i/dx_i||_F^2 with dz/dx = W1 diag(1 - h^2) W2."""
    w1, _, w2, _ = params
    h, _ = _forward(params, x)
    return np.mean([np.sum(((w1 * (1.0 - hi**2)) @ w2) ** 2) for hi in h])


def np_negative_entropy(params, x):
    _, z = _forward(params, x)
    log_p = _log_softmax(z)
    return np.mean(np.sum(np.exp(log_p) * log_p, axis=1))


def np_gradient_norm_sq(params, x, y):
    return sum(np.sum(g**2) for g in np_loss_gradient(params, x, y))


TRUTH = {
    "Jacobian": lambda p, x, y: np_jacobian_norm(p, x),
    "ConfidencePenalty": lambda p, x, y: np_negative_entropy(p, x),
    "GradientNorm": np_gradient_norm_sq,
}


def fd_gradient(fn, params, eps=1e-5):
    """Central finite differences in float64 (error ~eps^2)."""
    grads = []
    for i, p in enumerate(params):
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (fn(plus) - fn(minus)) / (2 * eps)
        grads.append(g)
    return grads


# ------------------------------------------------------------------ helpers


def logits_mlp():
    return keras_seht.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K),
        ]
    )


def logits_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def one_step(model, x, y):
    """Fits one full batch with SGD(1); returns (update, logs)."""
    before = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    after = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    logs = {k: v[-1] for k, v in history.history.items()}
    return [a - b for a, b in zip(after, before)], logs


def logged_samples(model, x, y, key, steps=200):
    """`steps` full-batch train steps at learning rate 0 (weights fixed):
    the `steps` values of the log entry `key`, one independent draw each.

    `train_on_batch` after `reset_metrics`, so each log is that step's
    value, not a running mean: the same train step as `fit` with one step
    per epoch, without fit's per-epoch cost (about 6 s per 200 epochs
    under TensorFlow, against 0.7 s)."""
    values = []
    for _ in range(steps):
        model.reset_metrics()
        logs = model.train_on_batch(x, y, return_dict=True)
        values.append(float(logs[key]))
    return np.asarray(values, "float64")


def assert_close(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)


PENALTIES = [
    Jacobian(strength=0.3, exact=True),
    ConfidencePenalty(strength=0.4),
    GradientNorm(strength=0.5),
]


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: type(p).__name__)
def test_update_is_exact_gradient_of_penalized_loss(penalty):
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model.compile(keras.optimizers.SGD(1.0), logits_loss(), seht=penalty)
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    x64 = x.astype("float64")
    truth = TRUTH[type(penalty).__name__]

    update, logs = one_step(model, x, y)

    value = truth(params, x64, y)
    np.testing.assert_allclose(logs[penalty.log_name], value, rtol=RTOL)
    loss = np_loss(params, x64, y)
    np.testing.assert_allclose(
        logs["loss"], loss + penalty.strength * value, rtol=RTOL
    )
    expected = fd_gradient(
        lambda p: np_loss(p, x64, y) + penalty.strength * truth(p, x64, y),
        params,
    )
    assert_close(update, [-g for g in expected])
    assert logs["seht_skipped"] == 0


def test_confidence_penalty_reads_probabilities_from_the_loss():
    """A softmax model with a string loss: from_logits is inferred False."""
    x, y = make_data(N, D, K)
    model = keras_seht.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(1.0),
        "sparse_categorical_crossentropy",
        seht=ConfidencePenalty(strength=0.4),
    )
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    _, logs = one_step(model, x, y)
    np.testing.assert_allclose(
        logs["negative_entropy"],
        np_negative_entropy(params, x.astype("float64")),
        rtol=1e-5,
    )


def test_combination_with_seht_adds_the_gradients():
    """[SEHT, Jacobian, confidence, gradient norm]: the update is the SEHT
    objective's gradient (nested autodiff, `reference`) plus each penalty's
    (finite differences of the closed forms)."""
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model(x[:1])
    rng = np.random.default_rng(0)
    probe = rademacher_probe([v.shape for v in model.weights], rng)
    seht = FixedProbes([probe], strength=0.2)
    model.compile(
        keras.optimizers.SGD(1.0), logits_loss(), seht=[seht, *PENALTIES]
    )
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    x64 = x.astype("float64")
    loss, trace, seht_grad = reference.objective_gradient(
        model, x, y, probe, seht.strength
    )

    update, logs = one_step(model, x, y)

    def penalties(p):
        return sum(
            q.strength * TRUTH[type(q).__name__](p, x64, y) for q in PENALTIES
        )

    expected = [
        a + b for a, b in zip(seht_grad, fd_gradient(penalties, params))
    ]
    assert_close(update, [-g for g in expected])
    np.testing.assert_allclose(logs["seht_trace"], trace, rtol=1e-4)
    np.testing.assert_allclose(
        logs["loss"],
        loss + seht.strength * trace + penalties(params),
        rtol=1e-4,
    )
    for q in PENALTIES:
        np.testing.assert_allclose(
            logs[q.log_name], TRUTH[type(q).__name__](params, x64, y), rtol=1e-4
        )


@pytest.mark.parametrize("n_proj", [1, 3])
def test_jacobian_estimate_is_unbiased(n_proj):
    """E[R_hat] = ||J||_F^2 / B: the mean of many one-step estimates (at
    learning rate 0) is within 4 standard errors of the closed form."""
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model.compile(
        keras.optimizers.SGD(0.0),
        logits_loss(),
        seht=Jacobian(strength=0.1, n_proj=n_proj),
    )
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    steps = 200
    samples = logged_samples(model, x, y, "jacobian_norm", steps)
    exact = np_jacobian_norm(params, x.astype("float64"))
    std_error = samples.std(ddof=1) / math.sqrt(steps)
    assert samples.std() > 0  # random projections, not a constant
    assert abs(samples.mean() - exact) < 4 * std_error, (
        samples.mean(),
        exact,
        std_error,
    )


def test_jacobian_variance_falls_with_n_proj():
    """Averaging n_proj projections divides the variance by n_proj."""
    x, y = make_data(N, D, K)
    stds = {}
    for n_proj in (1, 8):
        keras.utils.set_random_seed(0)
        model = logits_mlp()
        model.compile(
            keras.optimizers.SGD(0.0),
            logits_loss(),
            seht=Jacobian(n_proj=n_proj),
        )
        samples = logged_samples(model, x, y, "jacobian_norm", 100)
        stds[n_proj] = np.std(samples)
    # Expected ratio sqrt(8) ~ 2.8; allow for the sampling error of stds.
    assert stds[1] > 1.8 * stds[8], stds


def test_jacobian_on_a_batchnorm_cnn_trains():
    """Image inputs, batch-coupled BatchNorm, and a last partial batch (a
    retraced TensorFlow step sees a dynamic batch size)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 6, 6, 1)).astype("float32")
    y = rng.integers(0, K, size=10)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(2, 3)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras_seht.Model(inputs, keras.layers.Dense(K)(h))
    model.compile("sgd", logits_loss(), seht=Jacobian(n_proj=2))
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.asarray(history.history["jacobian_norm"]) > 0)


def test_jacobian_needs_a_float_input():
    model = keras_seht.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(K),
        ]
    )
    model.compile("sgd", logits_loss(), seht=Jacobian())
    x = np.random.default_rng(0).integers(0, 10, size=(4, 5))
    with pytest.raises(ValueError, match="floating-point input"):
        model.fit(x, np.zeros(4, "int32"), verbose=0)


def test_confidence_penalty_needs_from_logits_for_custom_losses():
    def my_loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_pred))

    model = logits_mlp()
    model.compile("sgd", my_loss, seht=ConfidencePenalty())
    x, y = make_data(4, D, K)
    with pytest.raises(ValueError, match="from_logits"):
        model.fit(x, y, verbose=0)


@pytest.mark.parametrize(
    "seht",
    [
        "jacobian",
        "confidence_penalty",
        "gradient_norm",
        [SEHTD(p=0.1), "jacobian", "confidence_penalty", "gradient_norm"],
    ],
    ids=["jacobian", "confidence", "gradient_norm", "all_with_seht_d"],
)
def test_trains_saves_and_loads(seht, tmp_path):
    x, y = make_data(32, D, K)
    model = logits_mlp()
    model.compile("adam", logits_loss(), seht=seht)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for penalty in model.seht_penalties:
        assert np.all(np.isfinite(history.history[penalty.log_name]))
    evaluation = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(evaluation) == {"loss"}
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.seht == model.seht
    assert loaded.seht_penalties == model.seht_penalties
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_registry_names_and_lists():
    assert regularizers.get("jacobian") == Jacobian()
    assert regularizers.get("confidence_penalty") == ConfidencePenalty()
    assert regularizers.get("gradient_norm") == GradientNorm()
    assert regularizers.get("Jacobian") == Jacobian()
    combined = regularizers.get(
        ["seht_d", {"class_name": "jacobian", "n_proj": 2}]
    )
    assert combined == [SEHTD(), Jacobian(n_proj=2)]
    config = regularizers.serialize(combined)
    assert regularizers.get(config) == combined
    for penalty in PENALTIES:
        config = regularizers.serialize(penalty)
        assert regularizers.deserialize(config) == penalty


@pytest.mark.parametrize(
    "seht, match",
    [
        ([], "empty list"),
        ([SEHTD(), "seht_h"], "one penalty of each kind"),
        ([Jacobian(), Jacobian(n_proj=2)], "one penalty of each kind"),
        ([None], "Each entry"),
        ("jacobain", "Unknown `seht` name"),
    ],
)
def test_bad_seht_lists_raise(seht, match):
    model = logits_mlp()
    with pytest.raises(ValueError, match=match):
        model.compile("sgd", logits_loss(), seht=seht)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: Jacobian(strength=-1.0), "strength"),
        (lambda: Jacobian(n_proj=0), "n_proj"),
        (lambda: Jacobian(n_proj=1.5), "n_proj"),
        (lambda: Jacobian(exact="yes"), "exact"),
        (lambda: ConfidencePenalty(strength=float("nan")), "strength"),
        (lambda: ConfidencePenalty(from_logits="yes"), "from_logits"),
        (lambda: GradientNorm(strength=True), "strength"),
        (lambda: GradientNorm(strength="big"), "strength"),
    ],
)
def test_bad_arguments_raise(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()
