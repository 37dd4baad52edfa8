"""The Gauss-Newton curvature and the clip_negative safeguard.

Backend-agnostic. The truth is float64 NumPy: for the logits network
z = tanh(x W1 + b1) W2 + b2 with mean softmax cross-entropy, the
directional output derivative u = J sigma and the loss's output Hessian
H_z = (diag(p) - p p^T) / B are closed forms, so t = u^T H_z u, tr(GGN)
and (by central finite differences) the gradient of L + strength * t are
computed without any autodiff framework.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import reference
from conftest import FixedProbes, make_data, rademacher_probe
from test_penalties import (
    HIDDEN,
    RTOL,
    D,
    K,
    N,
    _forward,
    _log_softmax,
    assert_close,
    fd_gradient,
    logged_samples,
    logits_loss,
    logits_mlp,
    np_loss,
    one_step,
)

import keras_seht
from keras_seht import SEHTD, SEHTH, output_split, regularizers


def np_output_direction(params, x, sigma):
    """u = J sigma: the derivative of the logits along sigma."""
    w1, b1, w2, _ = params
    d_w1, d_b1, d_w2, d_b2 = sigma
    h, _ = _forward(params, x)
    dh = (1.0 - h**2) * (x @ d_w1 + d_b1)
    return dh @ w2 + h @ d_w2 + d_b2


def np_gauss_newton_form(params, x, sigma):
    """sigma^T G sigma = sum_i u_i^T (diag(p_i) - p_i p_i^T) u_i / B."""
    _, z = _forward(params, x)
    p = np.exp(_log_softmax(z))
    u = np_output_direction(params, x, sigma)
    per_sample = np.sum(p * u**2, axis=1) - np.sum(p * u, axis=1) ** 2
    return per_sample.sum() / len(x)


def np_gauss_newton_trace(params, x):
    """tr(G) = sum_j e_j^T G e_j over every weight j."""
    total = 0.0
    for i, p in enumerate(params):
        for idx in np.ndindex(p.shape):
            basis = [np.zeros_like(q) for q in params]
            basis[i][idx] = 1.0
            total += np_gauss_newton_form(params, x, basis)
    return total


def _setup(seht_factory):
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    rng = np.random.default_rng(3)
    probe = rademacher_probe([p.shape for p in params], rng)
    model.compile(
        keras.optimizers.SGD(1.0), logits_loss(), seht=seht_factory(probe)
    )
    return model, x, y, params, probe


def test_update_is_exact_gradient_of_loss_plus_gauss_newton_form():
    strength = 0.3
    model, x, y, params, probe = _setup(
        lambda probe: FixedProbes(
            [probe], strength=strength, curvature="gauss_newton"
        )
    )
    x64 = x.astype("float64")

    update, logs = one_step(model, x, y)

    t = np_gauss_newton_form(params, x64, probe)
    assert t > 0
    np.testing.assert_allclose(logs["seht_trace"], t, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], np_loss(params, x64, y) + strength * t, rtol=1e-5
    )
    expected = fd_gradient(
        lambda p: (
            np_loss(p, x64, y) + strength * np_gauss_newton_form(p, x64, probe)
        ),
        params,
    )
    assert_close(update, [-g for g in expected])


def test_estimate_is_unbiased_for_the_gauss_newton_trace():
    """The mean of SEHT-H(gauss_newton) over many steps at learning rate 0
    is within 4 standard errors of tr(GGN), which differs from tr(H)."""
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model.compile(
        keras.optimizers.SGD(0.0),
        logits_loss(),
        seht=SEHTH(curvature="gauss_newton"),
    )
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    steps = 200
    samples = logged_samples(model, x, y, "seht_trace", steps)
    exact = np_gauss_newton_trace(params, x.astype("float64"))
    std_error = samples.std(ddof=1) / math.sqrt(steps)
    assert np.all(samples >= -1e-6)  # PSD: t >= 0 up to round-off
    assert abs(samples.mean() - exact) < 4 * std_error, (
        samples.mean(),
        exact,
        std_error,
    )
    hessian = keras_seht.exact_hessian_trace(model, x, y)
    assert abs(hessian - exact) > 4 * std_error  # a different quantity


def test_equals_hessian_when_only_the_output_layer_trains():
    """On the weights of a last linear layer, H and GGN coincide."""
    results = {}
    for curvature in ("hessian", "gauss_newton"):
        keras.utils.set_random_seed(7)
        x, y = make_data(N, D, K)
        model = logits_mlp()
        model.layers[0].trainable = False
        model(x[:1])
        rng = np.random.default_rng(3)
        probe = rademacher_probe(
            [v.shape for v in model.trainable_weights], rng
        )
        model.compile(
            keras.optimizers.SGD(1.0),
            logits_loss(),
            seht=FixedProbes([probe], strength=0.5, curvature=curvature),
        )
        results[curvature] = one_step(model, x, y)
    (u_h, logs_h), (u_g, logs_g) = results["hessian"], results["gauss_newton"]
    np.testing.assert_allclose(
        logs_h["seht_trace"], logs_g["seht_trace"], rtol=1e-5
    )
    assert_close(u_g, u_h)


def _negative_probe(model, x, y):
    """A Rademacher probe with sigma^T H sigma < 0 (searched by seed)."""
    for seed in range(200):
        rng = np.random.default_rng(seed)
        probe = rademacher_probe(
            [v.shape for v in model.trainable_weights], rng
        )
        _, t, _ = reference.objective_gradient(model, x, y, probe, 0.0)
        if t < -1e-3:
            return probe, t
    raise AssertionError("no probe with negative curvature found")


def test_clip_negative_keeps_a_negative_estimate_out_of_the_loss():
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model(x[:1])
    model.compile(keras.optimizers.SGD(1.0), logits_loss())
    probe, t = _negative_probe(model, x, y)
    start = model.get_weights()
    updates = {}
    for clip in (False, True):
        model.set_weights(start)
        model.compile(
            keras.optimizers.SGD(1.0),
            logits_loss(),
            seht=FixedProbes([probe], strength=0.5, clip_negative=clip),
        )
        updates[clip], logs = one_step(model, x, y)
        # The raw t is logged either way, and counted as negative.
        np.testing.assert_allclose(logs["seht_trace"], t, rtol=1e-4)
        assert logs["seht_negative_fraction"] == 1.0
    model.set_weights(start)
    plain = reference.loss_gradient(
        model, x, y, model.get_weights(), training=True
    )
    # Clipped: max(t, 0) = 0, so only the plain loss gradient is applied.
    assert_close(updates[True], [-g for g in plain])
    assert not np.allclose(updates[False][0], updates[True][0], atol=1e-5)


def test_gauss_newton_and_clip_on_seht_d_train_everywhere(tmp_path):
    x, y = make_data(32, D, K)
    for seht in (
        SEHTD(p=0.2, curvature="gauss_newton"),
        SEHTH(clip_negative=True, max_iter=2),
    ):
        model = logits_mlp()
        model.compile("adam", logits_loss(), seht=seht)
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
        assert 0.0 <= history["seht_negative_fraction"][-1] <= 1.0
        path = str(tmp_path / "m.keras")
        model.save(path)
        assert keras.models.load_model(path).seht == seht


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"curvature": "foo"}, "curvature"),
        ({"curvature": None}, "curvature"),
        ({"clip_negative": "yes"}, "clip_negative"),
    ],
)
@pytest.mark.parametrize("cls", [SEHTH, SEHTD])
def test_bad_curvature_arguments_raise(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**kwargs)


def test_curvature_round_trips_through_the_registry():
    est = SEHTD(p=0.05, curvature="gauss_newton", clip_negative=False)
    assert regularizers.deserialize(regularizers.serialize(est)) == est
    assert regularizers.get(
        {"class_name": "seht_h", "curvature": "gauss_newton"}
    ) == SEHTH(curvature="gauss_newton")


def test_exact_gauss_newton_trace_and_hessian_trace_estimate():
    """exact_hessian_trace(curvature="gauss_newton") equals the NumPy
    closed form; hessian_trace with a Gauss-Newton estimator converges to
    it (4 standard errors); the dense factors give the quadratic form."""
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model.compile("sgd", logits_loss())
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    x64 = x.astype("float64")
    exact = np_gauss_newton_trace(params, x64)
    got = keras_seht.exact_hessian_trace(model, x, y, curvature="gauss_newton")
    np.testing.assert_allclose(got, exact, rtol=1e-5)

    jacobian, output_hessian = keras_seht.hessian.gauss_newton_factors(
        model, x, y
    )
    assert jacobian.shape == (N * K, sum(p.size for p in params))
    rng = np.random.default_rng(0)
    sigma = [rng.normal(size=p.shape) for p in params]
    u = jacobian @ np.concatenate([s.ravel() for s in sigma])
    np.testing.assert_allclose(
        u @ output_hessian @ u,
        np_gauss_newton_form(params, x64, sigma),
        rtol=1e-5,
    )

    mean, std_error = keras_seht.hessian_trace(
        model,
        x,
        y,
        estimator=SEHTH(curvature="gauss_newton"),
        samples=300,
        return_std_error=True,
    )
    assert abs(mean - exact) < 4 * std_error, (mean, exact, std_error)
    with pytest.raises(ValueError, match="`curvature`"):
        keras_seht.exact_hessian_trace(model, x, y, curvature="ggn")


# ------------------------------------------------ the split at the logits
#
# A softmax (sigmoid) output with a probability cross-entropy is split at
# the logits: G = sum_n W_n J_n^T Lambda_n J_n, J_n the logits' Jacobian,
# Lambda_n = c_n (diag(p_n) - p_n p_n^T) (softmax; c_n the label mass) or
# diag(p_n (1 - p_n)) / K (sigmoid, binary cross-entropy's mean over K).
# The truth is float64 NumPy on the same tanh MLP: J_n from the closed-form
# directional derivative of the logits along every basis vector.


def head_mlp(activation):
    """`logits_mlp` with a final activation (None: the logits twin)."""
    return keras_seht.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(K, activation=activation),
        ]
    )


def _basis(params):
    """Every basis vector e_j of weight space, as one array per variable."""
    for i, p in enumerate(params):
        for idx in np.ndindex(p.shape):
            basis = [np.zeros_like(q) for q in params]
            basis[i][idx] = 1.0
            yield basis


def np_logit_jacobian(params, x):
    """(N, K, n): d z_n / d w, one closed-form column per weight."""
    columns = [np_output_direction(params, x, e) for e in _basis(params)]
    return np.stack(columns, axis=-1)


def np_probability_split_form(params, x, y, weights, sigma):
    """The split at the probabilities (before this one), for sparse
    cross-entropy: sum_n (s_n / N) u_p^T H_p u_p with H_p = diag(y/p^2) -
    1 1^T (Keras renormalizes p) and u_p = S u_z, so 1^T u_p = 0 leaves
    sum_i y_i u_p,i^2 / p_i^2."""
    _, z = _forward(params, x)
    p = np.exp(_log_softmax(z))
    u = np_output_direction(params, x, sigma)
    u_p = p * (u - np.sum(p * u, axis=1, keepdims=True))
    per_sample = np.sum(np.eye(K)[y] * u_p**2 / p**2, axis=1)
    return np.sum(weights * per_sample) / len(x)


def np_logit_ggn(params, x, activation, sample_mass):
    """Dense sum_n m_n J_n^T Lambda_n J_n (m_n: W_n times c_n)."""
    _, z = _forward(params, x)
    jacobian = np_logit_jacobian(params, x)
    total = 0.0
    for n, j in enumerate(jacobian):
        if activation == "softmax":
            p = np.exp(_log_softmax(z[n : n + 1]))[0]
            block = np.diag(p) - np.outer(p, p)
        else:
            p = 1.0 / (1.0 + np.exp(-z[n]))
            block = np.diag(p * (1.0 - p)) / K
        total = total + sample_mass[n] * j.T @ block @ j
    return total


def _params(model):
    return [np.array(v.numpy(), "float64") for v in model.trainable_weights]


def _split_problem(case):
    """(model, x, y, sample_weight, activation, m_n) for each loss form."""
    x, labels = make_data(N, D, K)
    rng = np.random.default_rng(5)
    weights = rng.uniform(0.5, 2.0, size=N).astype("float32")
    if case == "sparse":
        activation, loss, y = (
            "softmax",
            "sparse_categorical_crossentropy",
            labels,
        )
        mass = np.ones(N)
    elif case == "categorical":
        # Unnormalized soft labels and label smoothing: c_n = (1 - a) s_n + a.
        smoothing = 0.1
        y = rng.uniform(0.0, 1.0, size=(N, K)).astype("float32")
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        activation = "softmax"
        mass = (1.0 - smoothing) * y.sum(axis=1).astype("float64") + smoothing
    else:
        activation, loss = "sigmoid", keras.losses.BinaryCrossentropy()
        y = rng.integers(0, 2, size=(N, K)).astype("float32")
        mass = np.ones(N)
    model = head_mlp(activation)
    model.compile("sgd", loss)
    model(x[:1])
    # sum_over_batch_size with sample weights: W_n = s_n / N.
    return model, x, y, weights, activation, mass * weights / N


@pytest.mark.parametrize("case", ["sparse", "categorical", "binary"])
def test_probability_output_is_split_at_the_logits(case):
    """exact_hessian_trace and gauss_newton_factors give the dense logit
    Gauss-Newton matrix, to float32 round-off."""
    model, x, y, weights, activation, mass = _split_problem(case)
    truth = np_logit_ggn(_params(model), x.astype("float64"), activation, mass)
    jacobian, output_hessian = keras_seht.gauss_newton_factors(
        model, x, y, sample_weight=weights
    )
    dense = jacobian.T @ output_hessian @ jacobian
    scale = np.abs(truth).max()
    np.testing.assert_allclose(dense, truth, rtol=RTOL, atol=RTOL * scale)
    got = keras_seht.exact_hessian_trace(
        model, x, y, sample_weight=weights, curvature="gauss_newton"
    )
    np.testing.assert_allclose(got, np.trace(truth), rtol=RTOL)
    if case == "sparse":  # the split at the probabilities differs
        params, x64 = _params(model), x.astype("float64")
        old = sum(
            np_probability_split_form(params, x64, y, weights, basis)
            for basis in _basis(params)
        )
        assert abs(old - got) > 100 * RTOL * got, (old, got)


def _twins(case):
    """The probability model and its logits twin (same weights), compiled."""
    model, x, y, _, _, _ = _split_problem(case)
    if case == "categorical":
        # TensorFlow's fused softmax cross-entropy differentiates as if the
        # labels summed to 1 (its logit gradient is p - y, not c p - y).
        y = y / y.sum(axis=1, keepdims=True)
    twin = head_mlp(None)
    twin.set_weights(model.get_weights())
    logits_loss_of = {
        "sparse": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "categorical": keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1
        ),
        "binary": keras.losses.BinaryCrossentropy(from_logits=True),
    }
    twin.compile("sgd", logits_loss_of[case])
    return model, twin, logits_loss_of[case], x, y


@pytest.mark.parametrize("case", ["sparse", "categorical", "binary"])
def test_probabilities_and_logits_give_the_same_gauss_newton(case):
    """from_logits=False on the softmax/sigmoid model and from_logits=True
    on its logits twin: the same exact trace, the same t for the same
    probe, and the same update of L + strength * t (whose gradient runs
    through the weights' effect on H_z as well)."""
    model, twin, twin_loss, x, y = _twins(case)
    exact = keras_seht.exact_hessian_trace(
        model, x, y, curvature="gauss_newton"
    )
    exact_twin = keras_seht.exact_hessian_trace(
        twin, x, y, curvature="gauss_newton"
    )
    np.testing.assert_allclose(exact, exact_twin, rtol=RTOL)
    rng = np.random.default_rng(3)
    probe = rademacher_probe([v.shape for v in model.trainable_weights], rng)
    steps = {}
    for name, net, loss in (
        ("probabilities", model, model.loss),
        ("logits", twin, twin_loss),
    ):
        net.compile(
            keras.optimizers.SGD(1.0),
            loss,
            seht=FixedProbes([probe], strength=0.3, curvature="gauss_newton"),
        )
        steps[name] = one_step(net, x, y)
    (update, logs), (update_twin, logs_twin) = (
        steps["probabilities"],
        steps["logits"],
    )
    np.testing.assert_allclose(
        logs["seht_trace"], logs_twin["seht_trace"], rtol=RTOL
    )
    np.testing.assert_allclose(logs["loss"], logs_twin["loss"], rtol=RTOL)
    assert_close(update, update_twin)


def test_training_estimate_is_unbiased_for_the_logit_split():
    """SEHT-H(gauss_newton) on a softmax model with probability sparse
    cross-entropy: the mean of 200 steps at learning rate 0 lies within 4
    standard errors of tr(logit GGN)."""
    x, y = make_data(N, D, K)
    model = head_mlp("softmax")
    model.compile(
        keras.optimizers.SGD(0.0),
        "sparse_categorical_crossentropy",
        seht=SEHTH(curvature="gauss_newton"),
    )
    model(x[:1])
    params = _params(model)
    x64 = x.astype("float64")
    steps = 200
    samples = logged_samples(model, x, y, "seht_trace", steps)
    exact = np_gauss_newton_trace(params, x64)
    std_error = samples.std(ddof=1) / math.sqrt(steps)
    assert abs(samples.mean() - exact) < 4 * std_error, (
        samples.mean(),
        exact,
        std_error,
    )


class SoftmaxSubclass(keras.Model):
    """Its last operation is invisible to the split: no functional graph."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(HIDDEN, activation="tanh")
        self.head = keras.layers.Dense(K, activation="softmax")

    def call(self, inputs, training=None):
        return self.head(self.hidden(inputs))


def test_models_that_do_not_qualify_keep_the_compiled_loss_hessian():
    """MSE on softmax outputs, and a subclassed softmax model: H_z is the
    compiled loss's own output Hessian (closed forms in p)."""
    x, y = make_data(N, D, K)
    onehot = np.eye(K, dtype="float32")[y]
    mse = head_mlp("softmax")
    mse.compile("sgd", "mse")
    _, output_hessian = keras_seht.gauss_newton_factors(mse, x, onehot)
    np.testing.assert_allclose(
        output_hessian, 2.0 / (N * K) * np.eye(N * K), atol=1e-7
    )
    subclassed = SoftmaxSubclass()
    subclassed.compile("sgd", "sparse_categorical_crossentropy")
    subclassed(x[:1])
    assert output_split.output_kinds(subclassed) == []
    _, output_hessian = keras_seht.gauss_newton_factors(subclassed, x, y)
    p = keras.ops.convert_to_numpy(subclassed(x)).astype("float64")
    # Keras' -sum y log(p / sum p): H_p = (diag(y / p^2) - 1 1^T) / N.
    truth = np.zeros((N * K, N * K))
    for n in range(N):
        block = np.diag(np.eye(K)[y[n]] / p[n] ** 2) - np.ones((K, K))
        truth[n * K : (n + 1) * K, n * K : (n + 1) * K] = block / N
    np.testing.assert_allclose(
        output_hessian, truth, rtol=1e-4, atol=1e-4 * np.abs(truth).max()
    )


def test_detection_of_final_activations_and_losses():
    inputs = keras.Input((D,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    softmax_layer = keras.layers.Softmax()(keras.layers.Dense(K)(h))
    activation = keras.layers.Activation("sigmoid")(keras.layers.Dense(K)(h))
    last_axis_only = keras.layers.Softmax(axis=0)(keras.layers.Dense(K)(h))
    logits = keras.layers.Dense(K)(h)
    model = keras.Model(
        inputs, [softmax_layer, activation, last_axis_only, logits]
    )
    assert output_split.output_kinds(model) == [
        "softmax",
        "sigmoid",
        None,
        None,
    ]
    nested = keras.Sequential([keras.Input((D,)), head_mlp("softmax")])
    assert output_split.output_kinds(nested) == ["softmax"]
    kind = output_split.loss_kind
    assert kind(keras.losses.CategoricalCrossentropy()) == (
        "categorical",
        "softmax",
        0.0,
    )
    assert kind(keras.losses.CategoricalCrossentropy(from_logits=True)) is None
    assert kind(keras.losses.CategoricalCrossentropy(axis=1)) is None
    assert kind(keras.losses.SparseCategoricalCrossentropy(ignore_class=0)) is (
        None
    )
    assert kind(keras.losses.BinaryCrossentropy(label_smoothing=0.2)) == (
        "binary",
        "sigmoid",
        0.2,
    )
    assert kind(keras.losses.MeanSquaredError()) is None
    assert kind(keras.losses.BinaryFocalCrossentropy()) is None


def _two_heads(probabilities):
    inputs = keras.Input((D,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    head = keras.layers.Dense(
        K, activation="softmax" if probabilities else None, name="classes"
    )(h)
    value = keras.layers.Dense(1, name="value")(h)
    return keras_seht.Model(inputs, [head, value])


def test_weighted_multi_output_model():
    """A softmax head (sample weights, loss weight 0.5) beside a regression
    head (loss weight 2): the same Gauss-Newton matrix as the logits twin,
    and the per-output loss logs of a plain fit."""
    x, y = make_data(N, D, K)
    rng = np.random.default_rng(0)
    targets = [y, rng.normal(size=(N, 1)).astype("float32")]
    weights = rng.uniform(0.5, 2.0, size=N).astype("float32")
    model, twin = _two_heads(True), _two_heads(False)
    twin.set_weights(model.get_weights())
    losses = {
        True: [keras.losses.SparseCategoricalCrossentropy(), "mse"],
        False: [
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "mse",
        ],
    }
    factors = {}
    for probabilities, net in ((True, model), (False, twin)):
        net.compile("sgd", losses[probabilities], loss_weights=[0.5, 2.0])
        j, h = keras_seht.gauss_newton_factors(
            net, x, targets, sample_weight=weights
        )
        factors[probabilities] = j.T @ h @ j
    scale = np.abs(factors[False]).max()
    np.testing.assert_allclose(
        factors[True], factors[False], rtol=RTOL, atol=RTOL * scale
    )

    start = model.get_weights()
    logs = {}
    for seht in (None, SEHTH(curvature="gauss_newton")):
        model.set_weights(start)
        model.compile(
            keras.optimizers.SGD(0.0),
            losses[True],
            loss_weights=[0.5, 2.0],
            seht=seht,
        )
        history = model.fit(
            x, targets, sample_weight=weights, batch_size=4, verbose=0
        ).history
        logs[seht is None] = history
    # The total "loss" carries strength * t; the per-output ones do not.
    for key in ("classes_loss", "value_loss"):
        np.testing.assert_allclose(logs[False][key], logs[True][key], rtol=RTOL)
    assert np.isfinite(logs[False]["seht_trace"][0])
