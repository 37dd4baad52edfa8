"""The torch step's forward-over-forward curvature, against nested autodiff.

Under torch, an exact Hessian penalty takes t = sigma^T H sigma from a
second-order Taylor forward pass (`keras_seht.backend.torch._TaylorForward`)
and the update from one reverse pass. Checked here:

* the SGD(1.0) update equals the gradient of L + strength * mean_k t_k by
  reverse-over-reverse-over-reverse autodiff (`reference.objective_gradient`)
  on tanh and ReLU MLPs (softmax outputs: the generic nested-jvp rule),
  a Conv + BatchNorm model and a small CIFAR ResNet (stride-2 convolutions,
  Add, average-pooled shortcuts, logits), with one and two probes;
* the Taylor path is the one taken there;
* Dropout (training) applies the one mask its seed draws to every
  coefficient: the step equals the reverse-over-reverse step of the same
  model (same mask, same moving statistics and seed afterwards);
* a model with a layer it has no rule for (a stateful GaussianNoise the
  probes reach) falls back to reverse over reverse, with the model's
  state (BatchNorm statistics, the noise seed) put back first: its step
  equals, bit for bit, a step of the same model sent to reverse over
  reverse from the start; a model with a weight regularizer never tries.

Runs under every backend and skips where it is not torch (JAX has its own
forward-over-forward step; TensorFlow nests tapes).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import reference
from conftest import (
    STRENGTH,
    FixedProbes,
    image_data,
    make_data,
    rademacher_probe,
    relu_mlp,
    tanh_mlp,
    tiny_cnn,
)

import keras_seht
from keras_seht.applications import resnet18_cifar

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="the forward-over-forward Taylor pass is the torch step's",
)

#: float32's unit round-off.
EPS32 = float(np.finfo(np.float32).eps)


def small_resnet():
    """resnet18_cifar at width 2 on 8x8 images (logits)."""
    return resnet18_cifar(3, width=2, input_shape=(8, 8, 1), seed=0)


def resnet_data(n: int = 6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(n,)).astype("int32")
    return x, y


MODELS = {
    "tanh": (tanh_mlp, make_data),
    "relu": (relu_mlp, make_data),
    "cnn_batchnorm": (tiny_cnn, image_data),
    "resnet": (small_resnet, resnet_data),
}


def numpy_weights(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
        for v in model.trainable_variables
    ]


def build(name):
    """(model, x, y, loss) for one of `MODELS`."""
    keras.utils.set_random_seed(0)
    make, data = MODELS[name]
    loss = "sparse_categorical_crossentropy"
    if name == "resnet":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = data(n=16) if name != "resnet" else data()
    return make(), x, y, loss


def taylor_calls(monkeypatch):
    """Records, per step, whether the Taylor forward pass produced t."""
    from keras_seht.backend import torch as backend

    calls = []
    original = backend._taylor_forward

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(backend, "_taylor_forward", spy)
    return calls


def tolerance(expected, depth):
    """Round-off bound of a third-order derivative in float32.

    Each of the `depth` layers rounds at EPS32 relative to the largest
    entries, in each of the three passes (forward, forward, reverse here;
    three nested reverse passes in the reference): the error, relative
    to the largest gradient entry, is at most about 3 * depth * EPS32.
    """
    scale = max(float(np.max(np.abs(e))) for e in expected)
    return 3 * depth * EPS32 * scale


@pytest.mark.parametrize("probes", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_update_is_exact(name, probes, monkeypatch):
    model, x, y, loss = build(name)
    rng = np.random.default_rng(1)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    draws = [rademacher_probe(shapes, rng) for _ in range(probes)]
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=loss,
        seht=FixedProbes(draws),
    )
    results = [
        reference.objective_gradient(model, x, y, p, STRENGTH) for p in draws
    ]
    t = float(np.mean([r[1] for r in results]))
    expected = [
        np.mean([r[2][i] for r in results], axis=0) for i in range(len(shapes))
    ]
    calls = taylor_calls(monkeypatch)
    before = numpy_weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    applied = [b - a for b, a in zip(before, numpy_weights(model))]
    assert calls == [True]
    depth = len(model.layers) + 2  # with the input's and the loss's
    atol = tolerance(expected, depth)
    for got, want in zip(applied, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert logs["seht_trace"] == pytest.approx(
        t, rel=3 * depth * EPS32, abs=atol
    )


def state(model):
    return [
        np.asarray(keras.ops.convert_to_numpy(v.value))
        for v in model.non_trainable_variables
    ]


def noisy_model(noise):
    """Dense -> BatchNorm -> `noise` -> Dense: the probes reach a
    stateful layer between two probed ones."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = noise(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return keras_seht.Model(inputs, outputs)


def twin_steps(noise, monkeypatch):
    """One SGD(1.0) step of the same model twice: as the step chooses,
    and sent to reverse over reverse from the start.

    Returns (taylor_calls, chosen, reverse, logs of each, the weights
    before the step).
    """
    from keras_seht.backend import torch as backend

    x, y = make_data(n=16)
    keras.utils.set_random_seed(0)
    weights = noisy_model(noise()).get_weights()
    models = []
    for reverse in (False, True):
        keras.utils.set_random_seed(0)
        model = noisy_model(noise())
        model.set_weights(weights)
        shapes = [tuple(v.shape) for v in model.trainable_variables]
        probe = rademacher_probe(shapes, np.random.default_rng(1))
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss="sparse_categorical_crossentropy",
            seht=FixedProbes([probe]),
        )
        if reverse:
            backend._REVERSE_ONLY.add(model)
        models.append(model)
    before = numpy_weights(models[0])
    calls = taylor_calls(monkeypatch)
    logs = [m.train_on_batch(x, y, return_dict=True) for m in models]
    return calls, models[0], models[1], logs, before


def test_dropout_rule_matches_reverse_over_reverse(monkeypatch):
    calls, taylor, reverse, logs, before = twin_steps(
        lambda: keras.layers.Dropout(0.5, seed=3), monkeypatch
    )
    assert calls == [True]  # the mask comes from the same seed state
    for a, b in zip(state(taylor), state(reverse)):
        np.testing.assert_array_equal(a, b)
    updates = [
        [b - a for b, a in zip(before, numpy_weights(m))]
        for m in (taylor, reverse)
    ]
    depth = len(taylor.layers) + 2
    atol = tolerance(updates[1], depth)
    for got, want in zip(*updates):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert logs[0]["seht_trace"] == pytest.approx(
        logs[1]["seht_trace"], rel=3 * depth * EPS32
    )


def test_unsupported_layer_falls_back_with_its_state(monkeypatch):
    from keras_seht.backend import torch as backend

    calls, tried, direct, logs, _ = twin_steps(
        lambda: keras.layers.GaussianNoise(0.1, seed=3), monkeypatch
    )
    assert calls == [False]  # tried, failed, put the state back
    assert tried in backend._REVERSE_ONLY
    for a, b in zip(numpy_weights(tried), numpy_weights(direct)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state(tried), state(direct)):
        np.testing.assert_array_equal(a, b)
    assert logs[0] == logs[1]
    x, y = make_data(n=16)
    tried.train_on_batch(x, y)  # no second try
    assert calls == [False]


def test_regularized_model_keeps_reverse_over_reverse(monkeypatch):
    keras.utils.set_random_seed(0)
    model = tanh_mlp(kernel_regularizer=keras.regularizers.L2(0.1))
    x, y = make_data(n=16)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    probe = rademacher_probe(shapes, np.random.default_rng(1))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss="sparse_categorical_crossentropy",
        seht=FixedProbes([probe]),
    )
    loss, t, expected = reference.objective_gradient(
        model, x, y, probe, STRENGTH
    )
    calls = taylor_calls(monkeypatch)
    before = numpy_weights(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    applied = [b - a for b, a in zip(before, numpy_weights(model))]
    assert calls == []  # not attempted: L's regularization term
    depth = len(model.layers) + 2
    atol = tolerance(expected, depth)
    for got, want in zip(applied, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert logs["seht_trace"] == pytest.approx(t, rel=3 * depth * EPS32)
