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
from keras_seht import SEHTD, SEHTH, regularizers


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
