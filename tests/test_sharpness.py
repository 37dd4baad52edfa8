"""SAM, ASAM, m-sharpness and the finite-difference gradient-norm penalty.

The truth is the one-hidden-layer tanh network of `test_penalties`, with
its loss gradient written by hand in float64 NumPy; one step of
SGD(learning_rate=1) must apply minus the reference update of each method
(to float32 precision), on every backend.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import make_data
from test_penalties import (
    ATOL,
    RTOL,
    D,
    K,
    N,
    logits_loss,
    logits_mlp,
    np_loss,
    np_loss_gradient,
    one_step,
)

import keras_seht
from keras_seht import ASAM, SAM, SEHTH, regularizers
from keras_seht.regularizers import GradientNorm


def _setup(seht, optimizer=None):
    x, y = make_data(N, D, K)
    keras.utils.set_random_seed(0)  # the same weights at every call
    model = logits_mlp()
    model.compile(
        optimizer or keras.optimizers.SGD(1.0), logits_loss(), seht=seht
    )
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    return model, x, y, params


def _norm(tensors):
    return np.sqrt(sum(np.sum(t**2) for t in tensors))


def _sam_update(params, x, y, rho, adaptive=False, eta=0.01):
    """-grad L(w + e), e = rho T^2 g / ||T g|| (T = 1 for SAM)."""
    g = np_loss_gradient(params, x, y)
    scales = [np.abs(w) + eta if adaptive else np.ones_like(w) for w in params]
    norm = _norm([s * t for s, t in zip(scales, g)])
    shifted = [w + rho * s * s * t / norm for w, s, t in zip(params, scales, g)]
    return [-u for u in np_loss_gradient(shifted, x, y)], _norm(g)


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "seht, rho, adaptive",
    [(SAM(rho=0.3), 0.3, False), (ASAM(rho=1.5), 1.5, True)],
    ids=["sam", "asam"],
)
def test_update_matches_the_reference(seht, rho, adaptive):
    model, x, y, params = _setup(seht)
    update, logs = one_step(model, x, y)
    expected, norm = _sam_update(params, x, y, rho, adaptive)
    _assert_close(update, expected)
    np.testing.assert_allclose(logs["sam_gradient_norm"], norm, rtol=1e-5)
    # The logged loss is the loss at w, not at w + e.
    np.testing.assert_allclose(logs["loss"], np_loss(params, x, y), rtol=1e-5)


def test_m_sharpness_averages_the_micro_batches():
    model, x, y, params = _setup(SAM(rho=0.3, micro_batch=N // 2))
    before = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    history = model.fit(x, y, batch_size=N, shuffle=False, verbose=0).history
    after = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    update = [a - b for a, b in zip(after, before)]
    logs = {k: v[-1] for k, v in history.items()}
    halves = [slice(0, N // 2), slice(N // 2, N)]
    parts = [_sam_update(params, x[h], y[h], 0.3) for h in halves]
    expected = [(a + b) / 2 for a, b in zip(parts[0][0], parts[1][0])]
    _assert_close(update, expected)
    mean_norm = (parts[0][1] + parts[1][1]) / 2
    np.testing.assert_allclose(logs["sam_gradient_norm"], mean_norm, 1e-5)


def _gnp_update(params, x, y, strength, r):
    """-( grad L + strength 2||g|| / r (grad L(w + r g/||g||) - grad L) )."""
    g = np_loss_gradient(params, x, y)
    norm = _norm(g)
    shifted = [w + r * t / norm for w, t in zip(params, g)]
    g_r = np_loss_gradient(shifted, x, y)
    slope = strength * 2.0 * norm / r
    return [-(a + slope * (b - a)) for a, b in zip(g, g_r)], norm**2


def test_finite_difference_gradient_norm_matches_the_two_gradients():
    seht = GradientNorm(0.2, method="finite_difference", epsilon=0.05)
    model, x, y, params = _setup(seht)
    update, logs = one_step(model, x, y)
    expected, norm_sq = _gnp_update(params, x, y, 0.2, 0.05)
    _assert_close(update, expected)
    np.testing.assert_allclose(logs["gradient_norm_sq"], norm_sq, rtol=1e-5)
    penalty = 0.2 * norm_sq
    np.testing.assert_allclose(
        logs["loss"], np_loss(params, x, y) + penalty, rtol=1e-5
    )


def test_finite_difference_converges_to_the_exact_penalty_at_order_r():
    """A forward difference: its error falls like r (halving r halves it)."""
    strength = 1.0
    model, x, y, params = _setup(GradientNorm(strength))
    exact, _ = one_step(model, x, y)
    errors = []
    for r in (0.08, 0.04, 0.02):
        seht = GradientNorm(strength, method="finite_difference", epsilon=r)
        model, x, y, _ = _setup(seht)
        update, _ = one_step(model, x, y)
        errors.append(_norm([u - e for u, e in zip(update, exact)]))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.7 < q < 2.3 for q in ratios), (errors, ratios)


def test_batchnorm_statistics_come_from_the_pass_at_w():
    x, y = make_data(16, D, K)

    def run(seht):
        keras.utils.set_random_seed(0)
        model = keras_seht.Sequential(
            [
                keras.Input((D,)),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.BatchNormalization(momentum=0.5),
                keras.layers.Dense(K),
            ]
        )
        model.compile(keras.optimizers.SGD(0.5), logits_loss(), seht=seht)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        return [np.array(v) for v in model.layers[1].non_trainable_weights]

    plain = run(None)
    for sam, reference in zip(run(SAM(rho=0.5)), plain):
        np.testing.assert_allclose(sam, reference, rtol=1e-6, atol=1e-7)


def test_zero_gradient_gives_the_plain_step():
    """At an exact minimum (zero gradient) e = 0, never NaN."""
    model = keras_seht.Sequential(
        [keras.Input((D,)), keras.layers.Dense(1, kernel_initializer="zeros")]
    )
    x = np.ones((4, D), "float32")
    y = np.zeros((4, 1), "float32")
    for seht in (SAM(), ASAM(), GradientNorm(method="finite_difference")):
        model.compile(keras.optimizers.SGD(1.0), "mse", seht=seht)
        update, logs = one_step(model, x, y)
        assert logs["seht_skipped"] == 0.0
        for u in update:
            np.testing.assert_array_equal(u, 0.0)


def test_loss_scaling_gives_the_same_update():
    updates = []
    for factor in (None, 64.0):
        optimizer = keras.optimizers.SGD(1.0, loss_scale_factor=factor)
        model, x, y, _ = _setup(SAM(rho=0.3), optimizer)
        updates.append(one_step(model, x, y))
    _assert_close(updates[1][0], updates[0][0])
    np.testing.assert_allclose(
        updates[1][1]["sam_gradient_norm"],
        updates[0][1]["sam_gradient_norm"],
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "seht",
    [
        SAM(rho=0.1, micro_batch=2),
        ASAM(rho=2.0, eta=0.0),
        GradientNorm(0.1, method="finite_difference", epsilon=0.02),
        [SAM(), SEHTH()],
    ],
    ids=["sam", "asam", "gnp", "sam_seht"],
)
def test_saves_and_loads(seht, tmp_path):
    model, x, y, _ = _setup(seht)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.seht == model.seht
    loaded.fit(x, y, batch_size=N, epochs=1, verbose=0)


def test_registry_names():
    assert regularizers.get("sam") == SAM()
    assert regularizers.get("asam") == ASAM()
    assert ASAM(rho=1.0).adaptive


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SAM(rho=0.0), "rho"),
        (lambda: SAM(rho=float("nan")), "rho"),
        (lambda: SAM(rho="0.1"), "rho"),
        (lambda: SAM(eta=-0.1), "eta"),
        (lambda: SAM(adaptive="yes"), "adaptive"),
        (lambda: SAM(micro_batch=0), "micro_batch"),
        (lambda: SAM(micro_batch=2.5), "micro_batch"),
        (lambda: GradientNorm(method="bogus"), "method"),
        (lambda: GradientNorm(epsilon=0.1), "epsilon"),
        (
            lambda: GradientNorm(method="finite_difference", epsilon=0),
            "epsilon",
        ),
        (lambda: regularizers.get(["sam", "asam"]), "seht"),
        (
            lambda: regularizers.get([SAM(), SEHTH(method="antithetic")]),
            "replaces the loss's own gradient",
        ),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_micro_batch_must_divide_the_batch():
    model, x, y, _ = _setup(SAM(micro_batch=3))
    with pytest.raises(ValueError, match="micro_batch"):
        model.fit(x, y, batch_size=N, epochs=1, verbose=0)
