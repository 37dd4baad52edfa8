"""The non-finite guard and the safeguard `keras_seht.GradientBound`.

The update a step applies is checked against `reference`'s plain nested
autodiff with fixed probes (`FixedProbes`): with ``SGD(learning_rate=1)``
the weights move by minus the update. The tolerances are those of
``tests/test_training.py`` for the same float32 computation (the step's
reused gradients against a from-scratch recomputation).
"""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
import reference
from conftest import FixedProbes, compile_plain, make_data, tanh_mlp

import keras_seht
from keras_seht import SAM, SEHTH, GradientBound, safeguard

LOSS = "sparse_categorical_crossentropy"
RTOL, ATOL = 1e-4, 2e-6  # as tests/test_training.py, same float32 sums


def _numpy(values):
    return [
        np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in values
    ]


def _state(model):
    """Weights and optimizer variables, as float64 arrays."""
    return _numpy(model.trainable_variables) + _numpy(model.optimizer.variables)


def _probe(model, seed=1):
    rng = np.random.default_rng(seed)
    return [
        rng.choice([-1.0, 1.0], size=v.shape).astype("float32")
        for v in model.trainable_variables
    ]


def _one_step(seht, safeguard=None, optimizer=None, seed=3):
    """One SGD(1) step on a fresh tanh MLP; (model, before, update, logs)."""
    keras.utils.set_random_seed(seed)
    x, y = make_data(n=16)
    model = tanh_mlp()
    model(x[:1])
    model.compile(
        optimizer or keras.optimizers.SGD(learning_rate=1.0),
        LOSS,
        seht=seht,
        seht_safeguard=safeguard,
    )
    before = _numpy(model.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    messages = [str(w.message) for w in caught]
    after = _numpy(model.trainable_variables)
    update = [b - a for b, a in zip(before, after)]
    return model, (x, y, before), update, logs.history, messages


def _norm(tensors):
    return float(np.sqrt(sum(np.sum(t**2) for t in tensors)))


# --------------------------------------------------------------------------
# The object: arguments, config, registry, compile
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_ratio", [0, -1.0, float("nan"), float("inf"), "1", True, None]
)
def test_bad_max_ratio_raises(max_ratio):
    with pytest.raises(ValueError, match="max_ratio"):
        GradientBound(max_ratio)


@pytest.mark.parametrize(
    "value, match",
    [
        (-0.5, "max_ratio"),
        ("bound", "seht_safeguard"),
        ({"class_name": "SEHTH", "config": {}}, "seht_safeguard"),
        ({"class_name": "GradientBound", "rho": 1.0}, "seht_safeguard"),
    ],
)
def test_bad_compile_argument_raises(value, match):
    model = tanh_mlp()
    with pytest.raises(ValueError, match=match):
        model.compile("sgd", LOSS, seht=SEHTH(), seht_safeguard=value)


def test_config_round_trips():
    bound = GradientBound(max_ratio=0.25)
    assert GradientBound.from_config(bound.get_config()) == bound
    config = json.loads(json.dumps(safeguard.serialize(bound)))
    assert safeguard.deserialize(config) == bound
    assert keras.saving.deserialize_keras_object(config) == bound
    assert safeguard.get(config) == bound
    assert safeguard.get(0.25) == bound
    assert safeguard.get({"class_name": "GradientBound", "max_ratio": 0.25})
    assert safeguard.get(None) is None
    assert GradientBound(0.5) != bound


def test_save_load_keeps_the_safeguard(tmp_path):
    x, y = make_data(n=16)
    model = compile_plain(
        tanh_mlp(), seht=SEHTH(), seht_safeguard=GradientBound(0.5)
    )
    model.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.seht_safeguard == GradientBound(0.5)
    logs = loaded.fit(x, y, batch_size=8, verbose=0).history
    assert np.isfinite(logs["seht_bound_factor"][0])
    assert "seht_bounded" in logs


def test_seht_none_ignores_the_safeguard():
    model = compile_plain(tanh_mlp(), seht=None, seht_safeguard=0.5)
    assert model.seht_safeguard is None
    assert "seht_safeguard" not in (model.get_compile_config() or {})
    compile_plain(model, seht=SEHTH(), seht_safeguard=0.5)
    assert model.seht_safeguard == GradientBound(0.5)
    assert model.get_compile_config()["seht_safeguard"]["config"] == {
        "max_ratio": 0.5
    }
    compile_plain(model, seht=SEHTH())
    assert model.seht_safeguard is None


# --------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------


def test_update_is_exactly_g_where_the_bound_does_not_bind():
    """c = 1: the same weights, bit for bit, as without the safeguard."""
    probe = _probe(tanh_mlp())
    runs = [
        _one_step(FixedProbes([probe]), bound)
        for bound in (None, GradientBound(1e6))
    ]
    (_, _, plain, _, _), (_, _, bounded, logs, _) = runs
    for a, b in zip(plain, bounded):
        np.testing.assert_array_equal(a, b)
    assert logs["seht_bounded"] == [0.0]
    assert logs["seht_bound_factor"] == [1.0]


def test_update_is_bounded_where_the_bound_binds():
    """u = g_L + c (g - g_L), c = rho ||g_L|| / ||g - g_L||, against the
    reference's g (L + strength * t) and g_L (strength 0)."""
    rho, strength = 0.05, 0.3
    probe = _probe(tanh_mlp())
    model, (x, y, _), update, logs, _ = _one_step(
        FixedProbes([probe], strength=strength), GradientBound(rho)
    )
    # The reference at the weights before the step.
    keras.utils.set_random_seed(3)
    fresh = compile_plain(tanh_mlp())
    fresh(x[:1])
    g = reference.objective_gradient(fresh, x, y, probe, strength)[2]
    g_loss = reference.objective_gradient(fresh, x, y, probe, 0.0)[2]
    share = [a - b for a, b in zip(g, g_loss)]
    c = rho * _norm(g_loss) / _norm(share)
    assert c < 0.5  # the bound binds, well past the tolerance
    expected = [gl + c * p for gl, p in zip(g_loss, share)]
    for got, want in zip(update, expected):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert logs["seht_bounded"] == [1.0]
    assert logs["seht_bound_factor"][0] == pytest.approx(c, rel=RTOL)


def test_bound_on_a_penalty_that_replaces_the_loss_gradient():
    """SAM: g is the gradient at w + e, g - g_L its difference to g_L."""
    rho_sam, rho = 0.5, 0.1
    model, (x, y, before), update, logs, _ = _one_step(
        SAM(rho=rho_sam), GradientBound(rho)
    )
    g_loss = reference.loss_gradient(model, x, y, before, training=True)
    shift = [rho_sam * g / _norm(g_loss) for g in g_loss]
    shifted = [w + e for w, e in zip(before, shift)]
    g = reference.loss_gradient(model, x, y, shifted, training=True)
    share = [a - b for a, b in zip(g, g_loss)]
    c = rho * _norm(g_loss) / _norm(share)
    assert c < 0.5
    for got, gl, p in zip(update, g_loss, share):
        np.testing.assert_allclose(got, gl + c * p, rtol=RTOL, atol=ATOL)
    assert logs["seht_bound_factor"][0] == pytest.approx(c, rel=RTOL)


# --------------------------------------------------------------------------
# The non-finite guard
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strength",
    [1e30, 1e39],
    ids=["squared_norm_overflows", "entries_not_finite"],
)
def test_non_finite_update_falls_back_to_the_loss_gradient(strength):
    """t is finite, but strength * dt/dw overflows: at 1e30 the entries
    are finite and the float32 squared norm is not; at 1e39 (inf in
    float32) the entries are not. The step applies g_L and says why."""
    probe = _probe(tanh_mlp())
    model, (x, y, before), update, logs, messages = _one_step(
        FixedProbes([probe], strength=strength)
    )
    g_loss = reference.loss_gradient(model, x, y, before, training=True)
    for got, want in zip(update, g_loss):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.isfinite(logs["seht_trace"][0])
    assert logs["seht_skipped"] == [0.0]
    assert logs["seht_update_skipped"] == [1.0]
    assert logs["seht_step_skipped"] == [0.0]
    (message,) = [m for m in messages if "seht_update_skipped" in m]
    assert "applied the plain loss gradient" in message


def test_non_finite_update_under_loss_scaling_skips_and_lowers_the_scale():
    probe = _probe(tanh_mlp())
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1.0), initial_scale=2.0**10
    )
    model, _, update, logs, messages = _one_step(
        FixedProbes([probe], strength=1e30), optimizer=optimizer
    )
    assert all(np.all(u == 0) for u in update)
    assert logs["seht_update_skipped"] == [1.0]
    assert logs["seht_step_skipped"] == [0.0]
    scale = float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    assert scale < 2.0**10
    assert any("lowered its scale" in m for m in messages)


@pytest.mark.parametrize("bound", [None, GradientBound(1.0)])
def test_non_finite_loss_gradient_leaves_the_state_unchanged(bound):
    """A NaN input: t, g and g_L are all NaN; no step is applied, and the
    weights and the optimizer's variables (momentum, iterations) stay
    exactly as they were."""
    x, y = make_data(n=16)
    model = tanh_mlp()
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        LOSS,
        seht=SEHTH(),
        seht_safeguard=bound,
    )
    model.fit(x, y, batch_size=16, verbose=0)  # momentum now non-zero
    state = _state(model)
    x[0, 0] = np.nan
    with pytest.warns(RuntimeWarning) as caught:
        logs = model.fit(x, y, batch_size=16, verbose=0).history
    for before, after in zip(state, _state(model)):
        np.testing.assert_array_equal(before, after)
    assert logs["seht_skipped"] == [1.0]
    assert logs["seht_step_skipped"] == [1.0]
    messages = [str(w.message) for w in caught]
    (message,) = [m for m in messages if "seht_step_skipped" in m]
    assert "not applied" in message
    assert any("`seht_skipped`" in m for m in messages)


def test_progress_bar_hides_zero_counts(capsys):
    x, y = make_data(n=16)
    model = compile_plain(tanh_mlp(), seht=SEHTH(), seht_safeguard=1e6)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=2).history
    shown = capsys.readouterr().out
    for key in ("seht_update_skipped", "seht_step_skipped", "seht_bounded"):
        assert history[key] == [0.0]
        assert key not in shown
    assert "seht_bound_factor" in shown


def test_logs_name_the_new_entries():
    model = compile_plain(tanh_mlp(), seht=SEHTH(), seht_safeguard=1.0)
    assert set(model.seht_log_keys) >= {
        "seht_skipped",
        "seht_update_skipped",
        "seht_step_skipped",
        "seht_bounded",
        "seht_bound_factor",
    }
    x, y = make_data(n=8)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert not any(key.startswith("seht") for key in logs)
    assert keras_seht.GradientBound is GradientBound


# --------------------------------------------------------------------------
# The regression: a digits CNN that exact SEHT-H drives to NaN
# --------------------------------------------------------------------------

#: Measured on every backend with this seed: without the bound, the loss
#: is NaN within the first two epochs (torch and TensorFlow: the first).
DIGITS_EPOCHS = 3


def _digits_cnn():
    """3 x Conv(16, 3x3, stride 2, ReLU) + Dense(10) logits, on 8x8."""
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for _ in range(3):
        h = keras.layers.Conv2D(
            16, 3, strides=2, padding="same", activation="relu"
        )(h)
    outputs = keras.layers.Dense(10)(keras.layers.Flatten()(h))
    return keras_seht.Model(inputs, outputs)


def _digits_run(bound):
    """Trains with SEHT-H(strength 10), SGD(0.5, momentum 0.9), until the
    loss or a weight is NaN/Inf; returns (epochs run, history, model)."""
    from keras_seht.data import load_digits

    (x, y), _ = load_digits()
    x, y = x[:512], y[:512]
    keras.utils.set_random_seed(0)
    model = _digits_cnn()
    model.compile(
        keras.optimizers.SGD(0.5, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        seht=SEHTH(max_iter=1, strength=10.0),
        seht_safeguard=bound,
    )
    losses = []
    for epoch in range(1, DIGITS_EPOCHS + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logs = model.fit(
                x, y, batch_size=64, shuffle=False, verbose=0
            ).history
        losses.append(logs["loss"][0])
        weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
        finite = all(np.all(np.isfinite(w)) for w in weights)
        if not (finite and np.isfinite(losses[-1])):
            return epoch, logs, model
    return None, logs, model


@pytest.mark.slow  # ~10 s under torch, ~20 s TensorFlow, ~45 s JAX
def test_digits_cnn_blows_up_without_the_bound_and_not_with_it():
    failed, _, _ = _digits_run(None)
    assert failed is not None and failed <= DIGITS_EPOCHS
    failed, logs, model = _digits_run(GradientBound(1.0))
    assert failed is None
    assert logs["seht_bounded"][0] > 0
    assert np.isfinite(logs["seht_trace"][0])


def _relu_mlp_run(bound, steps=10):
    """Full-batch SEHT-H(strength 10) steps, SGD(0.5, momentum 0.9), on a
    6-16-16-16-3 ReLU MLP with logits; returns the losses and weights."""
    x, y = make_data(n=32)
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(16, activation="relu") for _ in range(3)]
    model = keras_seht.Sequential([keras.Input((6,)), *layers])
    model.add(keras.layers.Dense(3))
    model.compile(
        keras.optimizers.SGD(0.5, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        seht=SEHTH(max_iter=1, strength=10.0),
        seht_safeguard=bound,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logs = model.fit(
            x, y, batch_size=32, epochs=steps, shuffle=False, verbose=0
        ).history
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    return np.array(logs["loss"]), weights, logs


def test_relu_mlp_blows_up_without_the_bound_and_not_with_it():
    """The fast variant: measured NaN loss at step 4 (JAX), 5 (torch), 6
    (TensorFlow) of 10 without the bound; finite with it."""
    losses, _, _ = _relu_mlp_run(None)
    assert not np.all(np.isfinite(losses))
    losses, weights, logs = _relu_mlp_run(GradientBound(1.0))
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert max(logs["seht_bounded"]) == 1.0
