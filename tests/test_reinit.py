"""HessianReinit: which weights it picks, what it writes, what it resets.

Backend-agnostic. The truth for the Hessian diagonal is independent of
every autodiff framework: central finite differences of the hand-written
float64 NumPy loss gradient of a tanh MLP (``test_penalties``).
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
from conftest import make_data
from test_penalties import HIDDEN, D, K, N, logits_loss, logits_mlp
from test_penalties import np_loss_gradient as loss_gradient

from keras_seht.callbacks import HessianReinit


def fd_hessian(params, x, y, eps=1e-5):
    """The dense Hessian, by central differences of the exact gradient."""
    sizes = [p.size for p in params]
    n = sum(sizes)

    def flat_grad(flat):
        pieces, offset = [], 0
        for p, size in zip(params, sizes):
            pieces.append(flat[offset : offset + size].reshape(p.shape))
            offset += size
        return np.concatenate([g.ravel() for g in loss_gradient(pieces, x, y)])

    w = np.concatenate([p.ravel() for p in params])
    hessian = np.zeros((n, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = eps
        hessian[i] = (flat_grad(w + e) - flat_grad(w - e)) / (2 * eps)
    return 0.5 * (hessian + hessian.T)


def _model(optimizer=None):
    x, y = make_data(N, D, K)
    model = logits_mlp()
    model.compile(optimizer or keras.optimizers.SGD(0.0), logits_loss())
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    return model, x, y, params


def _split(vector, params):
    out, offset = [], 0
    for p in params:
        out.append(vector[offset : offset + p.size].reshape(p.shape))
        offset += p.size
    return out


def _fit_once(model, x, y, reinit):
    model.fit(x, y, batch_size=len(x), epochs=1, callbacks=[reinit], verbose=0)
    return [np.array(v.numpy(), "float64") for v in model.trainable_weights]


def test_weight_mode_reinitializes_exactly_the_top_k_per_layer():
    model, x, y, params = _model()
    k = 20.0
    reinit = HessianReinit(
        x,
        y,
        k=k,
        n_layers=2,
        initializer=keras.initializers.Constant(7.0),
        bias_initializer=keras.initializers.Constant(-3.0),
        diagonal="exact",
    )
    after = _fit_once(model, x, y, reinit)

    diag = _split(np.diag(fd_hessian(params, x.astype("float64"), y)), params)
    for layer in ((0, 1), (2, 3)):
        scores = np.concatenate([np.abs(diag[i]).ravel() for i in layer])
        count = math.ceil(k / 100 * scores.size)
        expected = np.zeros(scores.size, bool)
        expected[np.argsort(-scores)[:count]] = True
        # Kernels get the initializer's 7, biases the bias initializer's -3;
        # every other entry keeps its value (SGD(0) changes nothing).
        new = {layer[0]: 7.0, layer[1]: -3.0}
        changed = np.concatenate([(after[i] == new[i]).ravel() for i in layer])
        np.testing.assert_array_equal(changed, expected)
        for i in layer:
            kept = after[i] != new[i]
            np.testing.assert_array_equal(after[i][kept], params[i][kept])
    assert reinit.history == [
        math.ceil(0.2 * (D * HIDDEN + HIDDEN))
        + math.ceil(0.2 * (HIDDEN * K + K))
    ]


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_unit_mode_reinitializes_whole_units(aggregate):
    model, x, y, params = _model()
    reinit = HessianReinit(
        x,
        y,
        k=40,
        n_layers=2,
        granularity="unit",
        aggregate=aggregate,
        initializer=keras.initializers.Constant(7.0),
        bias_initializer=keras.initializers.Constant(-3.0),
        diagonal="exact",
    )
    after = _fit_once(model, x, y, reinit)
    diag = _split(np.diag(fd_hessian(params, x.astype("float64"), y)), params)
    w1, b1 = np.abs(diag[0]), np.abs(diag[1])
    scores = w1.sum(axis=0) + b1  # incoming weights and bias of each unit
    if aggregate == "mean":
        scores = scores / (D + 1)
    units = set(np.argsort(-scores)[: math.ceil(0.4 * HIDDEN)])
    for unit in range(HIDDEN):
        if unit in units:
            assert np.all(after[0][:, unit] == 7.0)
            assert after[1][unit] == -3.0
        else:
            np.testing.assert_array_equal(after[0][:, unit], params[0][:, unit])
            assert after[1][unit] == params[1][unit]


def test_momentum_of_reinitialized_weights_is_reset():
    model, x, y, params = _model(keras.optimizers.SGD(0.01, momentum=0.9))
    reinit = HessianReinit(x, y, k=30, n_layers=1, diagonal="exact")
    after = _fit_once(model, x, y, reinit)
    kernel = model.trainable_weights[2]
    slots = [
        v
        for v in model.optimizer.variables
        if v.name.startswith(kernel.path.replace("/", "_") + "_")
    ]
    assert len(slots) == 1
    momentum = np.asarray(slots[0].numpy())
    expected_step = (
        params[2] - 0.01 * loss_gradient(params, x.astype("float64"), y)[2]
    )
    reinitialized = ~np.isclose(after[2], expected_step, atol=1e-6)
    assert reinitialized.any() and (~reinitialized).any()
    assert np.all(momentum[reinitialized] == 0.0)
    assert np.all(momentum[~reinitialized] != 0.0)


def test_hutchinson_diagonal_converges_to_the_exact_one():
    model, x, y, params = _model()
    samples = 400
    reinit = HessianReinit(x, y, diagonal="hutchinson", samples=samples)
    reinit.set_model(model)
    estimate = reinit.hessian_diagonal([2, 3])
    hessian = fd_hessian(params, x.astype("float64"), y)
    sizes = [p.size for p in params]
    start = sizes[0] + sizes[1]
    block = hessian[start:, start:]  # the probe only touches these weights
    off = block - np.diag(np.diag(block))
    tolerance = 5 * np.sqrt((off**2).sum(axis=1) / samples) + 1e-6
    got = np.concatenate([e.ravel() for e in estimate])
    assert np.all(np.abs(got - np.diag(block)) <= tolerance)


def test_non_finite_diagonal_changes_nothing_and_is_logged(monkeypatch):
    model, x, y, params = _model()
    reinit = HessianReinit(x, y, diagonal="exact")
    monkeypatch.setattr(
        reinit,
        "hessian_diagonal",
        lambda indices: [
            np.full(model.trainable_variables[i].shape, np.nan) for i in indices
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=len(x), epochs=2, callbacks=[reinit], verbose=0
        )
    assert history.history["hessian_reinit_skipped"] == [1.0, 1.0]
    assert history.history["hessian_reinit_weights"] == [0.0, 0.0]
    assert sum("NaN/Inf" in str(w.message) for w in caught) == 1
    for got, want in zip(model.trainable_weights, params):
        np.testing.assert_array_equal(np.asarray(got.numpy(), "float64"), want)


def test_same_seed_same_result_and_logs():
    results = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        model, x, y, _ = _model(keras.optimizers.SGD(0.05))
        reinit = HessianReinit(
            x, y, k=10, n_layers=2, diagonal="hutchinson", samples=20, seed=3
        )
        history = model.fit(
            x, y, batch_size=4, epochs=2, callbacks=[reinit], verbose=0
        )
        assert history.history["hessian_reinit_weights"][0] > 0
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 100}, "k"),
        ({"k": -5}, "k"),
        ({"n_layers": 0}, "n_layers"),
        ({"initializer": "nope"}, "initializer"),
        ({"granularity": "neuron"}, "granularity"),
        ({"aggregate": "max"}, "aggregate"),
        ({"diagonal": "approx"}, "diagonal"),
        ({"samples": 0}, "samples"),
        ({"every": 1.5}, "every"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    x, y = make_data(N, D, K)
    with pytest.raises(ValueError, match=f"`{name}`"):
        HessianReinit(x, y, **kwargs)


def test_n_layers_larger_than_the_model_raises():
    model, x, y, _ = _model()
    with pytest.raises(ValueError, match="`n_layers`"):
        model.fit(x, y, callbacks=[HessianReinit(x, y, n_layers=3)], verbose=0)
