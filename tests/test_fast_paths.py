"""The fast paths of the train step, each against plain nested autodiff.

* Sparse probes: the step differentiates only the variables a probe
  touches (exact: the others add nothing to sigma^T H sigma). Checked on
  tanh and ReLU models and a Conv + BatchNorm model, with probes on the
  output layer only, a hidden layer only, both, and none (t = 0 exactly).
* The opt-in smoothed methods (``finite_difference``, ``antithetic``): the
  update is the exact gradient of L + strength * t_eps, and converges to
  the SEHT gradient as eps -> 0 on a smooth (tanh) model, at the O(eps^2)
  rate the central difference promises.
* BatchNorm moving statistics after one step equal a plain step's, for
  every method.
* `SEHTD.sample_probes(sparse=True)` has the distribution of the dense
  probes.

Runs under every Keras backend (on JAX and TensorFlow the compiled steps
use dense probes; the checks hold all the same).
"""

from __future__ import annotations

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

from keras_seht import SEHTD, SEHTH
from keras_seht.layout import weight_layout

LOSS = "sparse_categorical_crossentropy"
MODELS = {
    "tanh": (tanh_mlp, make_data),
    "relu": (relu_mlp, make_data),
    "cnn_batchnorm": (tiny_cnn, image_data),
}


def numpy_weights(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
        for v in model.trainable_variables
    ]


def masked_probe(model, layers, seed=1):
    """A Rademacher probe on the variables of `layers` (indices into the
    layout's layers; "output" for the last), zero elsewhere."""
    layout = weight_layout(model)
    chosen = {layout.output_layer if j == "output" else j for j in layers}
    rng = np.random.default_rng(seed)
    probe = []
    for i, shape in enumerate(layout.shapes):
        owner = layout.layer_of()[i]
        values = rng.choice([-1.0, 1.0], size=shape).astype("float32")
        probe.append(values if owner in chosen else np.zeros(shape, "f4"))
    return probe


def sgd_update(model, x, y):
    """The update of one SGD(1.0) step, and its logs."""
    before = numpy_weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    return [b - a for b, a in zip(before, numpy_weights(model))], logs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "layers", [("output",), (0,), (0, "output"), ()], ids=str
)
def test_sparse_probe_update_is_exact(name, layers):
    if keras.config.backend() != "torch" and layers != (0, "output"):
        # The compiled steps take dense probes whatever layers they
        # touch: one case per model covers them (and keeps JAX's
        # compile time down).
        pytest.skip("compiled step: dense probes, one case per model")
    build, data = MODELS[name]
    model = build()
    x, y = data(n=16)
    probe = masked_probe(model, layers)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=LOSS,
        seht=FixedProbes([probe]),
    )
    loss, t, expected = reference.objective_gradient(
        model, x, y, probe, STRENGTH
    )
    applied, logs = sgd_update(model, x, y)
    for got, want in zip(applied, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
    assert logs["seht_trace"] == pytest.approx(t, rel=1e-4, abs=1e-6)
    if not layers:
        assert t == 0.0 and logs["seht_trace"] == 0.0
        assert logs["loss"] == pytest.approx(loss, rel=1e-6)


def smoothed_reference(model, x, y, probe, strength, epsilon, method):
    """(t_eps, grad of L + strength * t_eps) by plain first-order autodiff
    at w and w +- eps * sigma."""
    w = [v.value for v in model.trainable_variables]
    points = {
        step: [
            keras.ops.convert_to_numpy(v) + step * s for v, s in zip(w, probe)
        ]
        for step in (0.0, epsilon, -epsilon)
    }
    f = reference.loss_fn(model, x, y, training=True)
    losses = {
        step: float(keras.ops.convert_to_numpy(f(values)))
        for step, values in points.items()
    }
    grads = {
        step: reference.loss_gradient(model, x, y, values, training=True)
        for step, values in points.items()
    }
    t = (losses[epsilon] + losses[-epsilon] - 2 * losses[0.0]) / epsilon**2
    c = strength / epsilon**2
    if method == "antithetic":
        gradient = [
            0.5 * (a + b) for a, b in zip(grads[epsilon], grads[-epsilon])
        ]
    else:
        gradient = [
            g0 + c * (a + b - 2 * g0)
            for g0, a, b in zip(grads[0.0], grads[epsilon], grads[-epsilon])
        ]
    return t, gradient, grads


def smoothed_estimator(probe, method, strength, epsilon):
    kwargs = {"epsilon": epsilon} if method == "finite_difference" else {}
    return FixedProbes([probe], strength=strength, method=method, **kwargs)


@pytest.mark.parametrize("name", ["tanh", "relu", "cnn_batchnorm"])
@pytest.mark.parametrize("method", ["finite_difference", "antithetic"])
def test_smoothed_update_is_gradient_of_smoothed_objective(name, method):
    build, data = MODELS[name]
    model = build()
    x, y = data(n=16)
    probe = masked_probe(model, range(8))
    strength, epsilon = 0.02, 0.05
    if method == "antithetic":
        epsilon = float(np.sqrt(2 * strength))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=LOSS,
        seht=smoothed_estimator(probe, method, strength, epsilon),
    )
    t, expected, grads = smoothed_reference(
        model, x, y, probe, strength, epsilon, method
    )
    applied, logs = sgd_update(model, x, y)
    # float32 rounding of each gradient, amplified by strength / eps^2 for
    # the finite difference (1/2 for the antithetic pair).
    gain = 0.5 if method == "antithetic" else 4 * strength / epsilon**2
    for i, (got, want) in enumerate(zip(applied, expected)):
        size = max(np.max(np.abs(g[i])) for g in grads.values())
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5 * size * (1 + gain)
        )
    # t_eps itself: float32 losses, differenced and divided by eps^2.
    loss_size = abs(logs["loss"]) + 1.0
    assert logs["seht_trace"] == pytest.approx(
        t, abs=4 * 1e-6 * loss_size / epsilon**2
    )


@pytest.mark.parametrize("method", ["finite_difference", "antithetic"])
def test_smoothed_methods_converge_to_exact_on_tanh(method):
    """Update error against the exact SEHT update, at eps and eps / 2: the
    central difference makes it O(eps^2), so halving eps divides it by
    about 4 (measured 3.9 here; at least 2.5 allowing for the O(eps^4)
    term and rounding). eps multiplies a probe of norm sqrt(83)."""
    x, y = make_data(n=16)
    model = tanh_mlp()
    probe = masked_probe(model, range(8))
    initial = [v.numpy() for v in model.weights]
    errors, trace_errors = [], []
    for epsilon in (0.05, 0.025):
        if method == "antithetic":
            strength, eps_arg = epsilon**2 / 2, None
        else:
            strength, eps_arg = STRENGTH, epsilon
        model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss=LOSS,
            seht=smoothed_estimator(probe, method, strength, eps_arg),
        )
        _, t_exact, exact = reference.objective_gradient(
            model, x, y, probe, strength
        )
        _, _, plain = reference.objective_gradient(model, x, y, probe, 0.0)
        applied, logs = sgd_update(model, x, y)
        # Error in the penalty's gradient, relative to its size.
        size = max(np.max(np.abs(e - p)) for e, p in zip(exact, plain))
        err = max(np.max(np.abs(a - e)) for a, e in zip(applied, exact))
        errors.append(err / size)
        trace_errors.append(abs(logs["seht_trace"] - t_exact) / abs(t_exact))
    # In the asymptotic regime, and converging at the central rate.
    assert errors[1] < 0.1
    assert errors[1] < errors[0] / 2.5
    assert trace_errors[1] < 0.1
    assert trace_errors[1] < trace_errors[0] / 2.5


def test_antithetic_validation():
    with pytest.raises(ValueError, match="clip_negative"):
        SEHTH(method="antithetic", clip_negative=True)
    with pytest.raises(ValueError, match="epsilon"):
        SEHTH(method="antithetic", epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        SEHTD(method="finite_difference", epsilon=-1.0)
    with pytest.raises(ValueError, match="method"):
        SEHTD(method="taylor")
    with pytest.raises(ValueError, match="curvature"):
        SEHTH(method="finite_difference", curvature="gauss_newton")
    est = SEHTD(p=0.05, method="finite_difference", epsilon=0.003)
    assert SEHTD.from_config(est.get_config()) == est
    assert not est.needs_double_backward
    assert SEHTH(method="antithetic", strength=0.02).step_epsilon == (
        pytest.approx(0.2)
    )


@pytest.mark.parametrize(
    "estimator",
    [
        SEHTD(p=0.3, layer_p=1.0, strength=0.01),
        SEHTH(strength=0.01),
        SEHTH(strength=0.01, method="finite_difference"),
        SEHTH(strength=0.01, method="antithetic"),
    ],
    ids=["seht_d", "seht_h", "finite_difference", "antithetic"],
)
def test_batchnorm_statistics_match_a_plain_step(estimator):
    x, y = image_data(n=16)
    plain = compile_plain(tiny_cnn())
    model = tiny_cnn()
    model.set_weights(plain.get_weights())
    model.compile(optimizer="sgd", loss=LOSS, seht=estimator)
    plain.train_on_batch(x, y)
    model.train_on_batch(x, y)
    pairs = list(
        zip(
            [v for v in plain.non_trainable_variables if "moving" in v.path],
            [v for v in model.non_trainable_variables if "moving" in v.path],
        )
    )
    assert len(pairs) == 2
    for a, b in pairs:
        assert a.name == b.name
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(b.value),
            keras.ops.convert_to_numpy(a.value),
            rtol=1e-6,
            atol=1e-7,
        )
        # And they moved: the step did update them.
        assert np.any(keras.ops.convert_to_numpy(b.value) != 0.0)


def test_sparse_probes_have_the_dense_distribution():
    """Per layer: drawn with probability pi_l, entries +-1 each with
    probability p, scaled by 1/sqrt(pi_l 2p) (unbiased); counts within 5
    binomial standard deviations."""
    model = tanh_mlp(hidden=20)
    layout = weight_layout(model)
    est = SEHTD(p=0.1, layer_p=0.3, unbiased=True)
    probs = est.layer_probabilities(layout)
    owner = layout.layer_of()
    seed = keras.random.SeedGenerator(3)
    draws = 400
    drawn = np.zeros(layout.num_layers)
    plus = np.zeros(layout.num_layers)
    minus = np.zeros(layout.num_layers)
    entries = np.zeros(layout.num_layers)
    for _ in range(draws):
        probe = est.sample_probes(layout, seed=seed, sparse=True)
        hit = set()
        for i, sigma in enumerate(probe):
            layer = owner[i]
            if sigma is None:
                continue
            hit.add(layer)
            values = keras.ops.convert_to_numpy(sigma).ravel()
            scale = 1.0 / np.sqrt(probs[layer] * 2 * est.p)
            magnitudes = np.unique(np.abs(values))
            np.testing.assert_allclose(magnitudes[magnitudes > 0], scale)
            plus[layer] += np.sum(values > 0)
            minus[layer] += np.sum(values < 0)
            entries[layer] += values.size
        for layer in hit:
            drawn[layer] += 1
    for layer, pi in enumerate(probs):
        sd = np.sqrt(draws * pi * (1 - pi))
        assert abs(drawn[layer] - draws * pi) <= 5 * sd + 1e-9
        n = entries[layer]
        assert n > 0
        sd = np.sqrt(n * est.p * (1 - est.p))
        assert abs(plus[layer] - n * est.p) <= 5 * sd
        assert abs(minus[layer] - n * est.p) <= 5 * sd
    assert drawn[layout.output_layer] == draws
