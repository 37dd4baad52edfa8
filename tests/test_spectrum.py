"""Curvature diagnostics over a matvec: `keras_seht.spectrum`.

The core estimators are checked on NumPy matrices with known spectra, with
tolerances taken from the estimators' variances; the model-level functions
on (a) linear models whose Hessian has a closed form, independent of any
Hessian-vector product, and (b) a ~50-weight tanh MLP whose dense Hessian is
assembled from Hessian-vector products on basis vectors (those products are
tested elsewhere; here they only provide the matrix the eigen-solver and
the trace estimator must agree with).
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
from conftest import compile_plain, image_data, make_data, tanh_mlp, tiny_cnn

import keras_seht
from keras_seht.operators import HessianOperator
from keras_seht.spectrum import (
    ConvergenceWarning,
    hessian_top_eigenvalue,
    hessian_trace_hutchpp,
    hutchinson_trace,
    hutchpp_trace,
    top_eigenvalue,
)

Z = 4.0  # standard errors: false-failure probability below 1e-4


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def with_spectrum(eigenvalues, seed=0):
    """A symmetric matrix U diag(eigenvalues) U^T, U Haar-random."""
    eigenvalues = np.asarray(eigenvalues, "float64")
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues),) * 2))
    return (u * eigenvalues) @ u.T


def random_symmetric(n, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n))
    return (b + b.T) / 2


class Operator:
    """A dense matrix as a matvec on lists of arrays, counting calls."""

    def __init__(self, a, shapes=None):
        self.a = np.asarray(a, "float64")
        self.shapes = shapes or [(len(a),)]
        self.sizes = [math.prod(s) for s in self.shapes]
        assert sum(self.sizes) == len(a)
        self.calls = 0

    def __call__(self, vectors):
        self.calls += 1
        assert [np.shape(v) for v in vectors] == list(self.shapes)
        flat = np.concatenate([np.ravel(v) for v in vectors]) @ self.a.T
        out = np.split(flat, np.cumsum(self.sizes)[:-1])
        return [o.reshape(s) for o, s in zip(out, self.shapes)]


def largest_magnitude(a):
    eigenvalues = np.linalg.eigvalsh(a)
    return eigenvalues[np.argmax(np.abs(eigenvalues))]


def hutchinson_variance(a):
    """Per-probe variance of sigma^T A sigma, Rademacher sigma."""
    off = a - np.diag(np.diag(a))
    return 2.0 * float(np.sum(off**2))


def dense_hessian(model, x, y):
    """The loss Hessian from HVPs of the basis vectors, symmetrized."""
    matvec = HessianOperator(model, x, y)
    shapes = matvec.shapes
    sizes = [math.prod(s) for s in shapes]
    n = sum(sizes)
    columns = []
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        pieces = np.split(e, np.cumsum(sizes)[:-1])
        out = matvec([p.reshape(s) for p, s in zip(pieces, shapes)])
        columns.append(np.concatenate([np.ravel(o) for o in out]))
    h = np.stack(columns, axis=1).astype("float64")
    assert np.allclose(h, h.T, atol=1e-5 * np.abs(h).max())
    return (h + h.T) / 2


def weights_of(model):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.variables]


# --------------------------------------------------------------------------
# Core estimators on NumPy matrices
# --------------------------------------------------------------------------


class TestTopEigenvalue:
    @pytest.mark.parametrize(
        "top",
        [pytest.param(5.0, id="positive"), pytest.param(-5.0, id="negative")],
    )
    def test_matches_eigh(self, top):
        rest = np.linspace(-3.0, 3.0, 39)
        a = with_spectrum(np.concatenate([[top], rest]))
        op = Operator(a)
        value = top_eigenvalue(op, op.shapes, iters=200, seed=1, tol=1e-12)
        assert value == pytest.approx(largest_magnitude(a), rel=1e-8)
        assert value == pytest.approx(top, rel=1e-8)

    def test_random_symmetric_multi_shape(self):
        a = random_symmetric(30, seed=3)
        eigenvalues = np.sort(np.abs(np.linalg.eigvalsh(a)))
        assert eigenvalues[-2] / eigenvalues[-1] < 0.99  # converges
        op = Operator(a, shapes=[(2, 3), (4,), (5, 2, 2)])
        value = top_eigenvalue(op, op.shapes, iters=2000, seed=0, tol=0.0)
        assert value == pytest.approx(largest_magnitude(a), rel=1e-8)
        assert op.calls == 2000  # tol=0 runs every iteration

    def test_stops_early_and_bounds_the_eigenvalue(self):
        a = with_spectrum([10.0, -9.0, *np.linspace(-1, 1, 20)], seed=2)
        op = Operator(a)
        value = top_eigenvalue(op, op.shapes, iters=500, seed=0, tol=1e-4)
        assert op.calls < 500
        # A Rayleigh quotient never exceeds the largest magnitude.
        assert abs(value) <= 10.0 * (1 + 1e-12)
        assert value == pytest.approx(10.0, rel=1e-2)

    def test_seeded_and_zero_matrix(self):
        a = random_symmetric(10, seed=4)
        first = top_eigenvalue(Operator(a), [(10,)], iters=7, seed=3)
        again = top_eigenvalue(Operator(a), [(10,)], iters=7, seed=3)
        assert first == again
        assert top_eigenvalue(Operator(np.zeros((4, 4))), [(4,)]) == 0.0


class TestHutchinson:
    def test_within_variance_of_exact_trace(self):
        a = random_symmetric(30, seed=5) + np.diag(np.arange(30.0))
        samples = 2000
        estimate, se = hutchinson_trace(
            Operator(a), [(30,)], samples=samples, seed=0
        )
        sd = math.sqrt(hutchinson_variance(a) / samples)
        assert abs(estimate - np.trace(a)) <= Z * sd
        # The reported standard error estimates the true one.
        assert 0.8 * sd <= se <= 1.2 * sd

    def test_diagonal_is_exact(self):
        a = np.diag(np.arange(1.0, 7.0))
        op = Operator(a, shapes=[(2, 3)])
        assert hutchinson_trace(op, op.shapes, samples=3) == (21.0, 0.0)
        assert op.calls == 3
        assert hutchinson_trace(op, op.shapes, samples=1) == (
            21.0,
            float("inf"),
        )


class TestHutchpp:
    def test_unbiased(self):
        a = random_symmetric(20, seed=6) + np.diag(np.linspace(0, 4, 20))
        draws = [
            hutchpp_trace(Operator(a), [(20,)], samples=12, seed=s)
            for s in range(300)
        ]
        se = np.std(draws, ddof=1) / math.sqrt(len(draws))
        assert np.std(draws) > 0  # random, so the check is not vacuous
        assert abs(np.mean(draws) - np.trace(a)) <= Z * se

    @pytest.mark.parametrize("samples", [3, 10, 99, 100])
    def test_uses_samples_matvecs(self, samples):
        a = random_symmetric(50, seed=7)
        op = Operator(a, shapes=[(5, 5), (25,)])
        hutchpp_trace(op, op.shapes, samples=samples, seed=0)
        assert op.calls == samples

    def test_exact_when_sketch_spans_the_space(self):
        a = random_symmetric(8, seed=8)
        op = Operator(a)
        value = hutchpp_trace(op, op.shapes, samples=26, seed=0)  # k = 8
        assert value == pytest.approx(np.trace(a), abs=1e-10)
        assert op.calls == 16  # A S and A Q; no residual probes

    def test_beats_hutchinson_on_low_rank_plus_noise(self):
        n, samples = 300, 60
        rng = np.random.default_rng(9)
        low_rank = with_spectrum(
            np.concatenate([np.linspace(20, 100, 10), np.zeros(n - 10)])
        )
        noise = 0.05 * random_symmetric(n, seed=10)
        a = low_rank + noise
        exact = np.trace(a)
        seeds = rng.integers(0, 2**31, size=10)
        pp_errors, h_errors = [], []
        for seed in seeds:
            pp = hutchpp_trace(Operator(a), [(n,)], samples=samples, seed=seed)
            h, _ = hutchinson_trace(
                Operator(a), [(n,)], samples=samples, seed=seed
            )
            pp_errors.append(pp - exact)
            h_errors.append(h - exact)
        pp_rms = math.sqrt(np.mean(np.square(pp_errors)))
        h_rms = math.sqrt(np.mean(np.square(h_errors)))
        # Hutchinson's error is its full variance; Hutch++'s only that of
        # the noise once Q has captured the rank-10 part (k = 20 >= 10).
        h_sd = math.sqrt(hutchinson_variance(a) / samples)
        noise_sd = math.sqrt(hutchinson_variance(noise) / (samples // 3))
        assert h_rms > h_sd / 3
        assert pp_rms <= 2 * noise_sd
        assert pp_rms < h_rms / 10


class TestCoreValidation:
    @pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
    @pytest.mark.parametrize(
        "call",
        [
            lambda op, v: hutchinson_trace(op, [(3,)], samples=v),
            lambda op, v: hutchpp_trace(op, [(3,)], samples=v),
        ],
        ids=["hutchinson", "hutchpp"],
    )
    def test_samples(self, call, value):
        with pytest.raises(ValueError, match="`samples`"):
            call(Operator(np.eye(3)), value)

    @pytest.mark.parametrize("value", [0, -2, 2.0, False])
    def test_iters(self, value):
        with pytest.raises(ValueError, match="`iters` must be an integer >= 1"):
            top_eigenvalue(Operator(np.eye(3)), [(3,)], iters=value)

    @pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "a"])
    def test_tol(self, value):
        with pytest.raises(ValueError, match="`tol`"):
            top_eigenvalue(Operator(np.eye(3)), [(3,)], tol=value)

    @pytest.mark.parametrize("value", [-1, 0.5, "0"])
    def test_seed(self, value):
        with pytest.raises(ValueError, match="`seed`"):
            hutchpp_trace(Operator(np.eye(3)), [(3,)], seed=value)

    @pytest.mark.parametrize("shapes", [[], [(0,)], "abc", [(3, -1)], 3])
    def test_shapes(self, shapes):
        with pytest.raises(ValueError, match="`shapes`"):
            hutchinson_trace(Operator(np.eye(3)), shapes)

    def test_matvec(self):
        with pytest.raises(ValueError, match="`matvec` must be callable"):
            top_eigenvalue(np.eye(3), [(3,)])
        with pytest.raises(ValueError, match="`matvec` must return 2"):
            top_eigenvalue(lambda v: [v[0]], [(3,), (2,)])
        with pytest.raises(ValueError, match="`matvec` returned an array"):
            top_eigenvalue(lambda v: [v[0], v[0]], [(3,), (2,)])


# --------------------------------------------------------------------------
# Model-level functions
# --------------------------------------------------------------------------


def negative_square_loss(y_true, y_pred):
    return -keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def linear_model(loss, d=4):
    model = keras_seht.Sequential(
        [keras.Input((d,)), keras.layers.Dense(1, use_bias=False)]
    )
    model.compile(optimizer="sgd", loss=loss)
    return model


class TestClosedForm:
    """L = ±mean_i s_i (x_i . w - y_i)^2, so H = ±(2/n) X^T diag(s) X."""

    @pytest.mark.parametrize(
        "loss, sign",
        [("mse", 1.0), (negative_square_loss, -1.0)],
        ids=["mse", "negative"],
    )
    @pytest.mark.parametrize("weighted", [False, True])
    def test_eigenvalue_and_trace(self, loss, sign, weighted):
        rng = np.random.default_rng(11)
        n, d = 16, 4
        x = (rng.normal(size=(n, d)) * [3.0, 1.0, 0.5, 0.2]).astype("float32")
        y = rng.normal(size=(n, 1)).astype("float32")
        s = rng.uniform(0.5, 2.0, size=n).astype("float32")
        s = s if weighted else np.ones(n, "float32")
        h = sign * 2.0 / n * (x.T * s) @ x.astype("float64")
        model = linear_model(loss, d)
        kwargs = {"sample_weight": s} if weighted else {}
        value = hessian_top_eigenvalue(
            model, x, y, iters=300, tol=1e-10, **kwargs
        )
        assert value == pytest.approx(largest_magnitude(h), rel=1e-5)
        assert np.sign(value) == sign
        trace = hessian_trace_hutchpp(model, x, y, samples=12, **kwargs)
        assert trace == pytest.approx(np.trace(h), rel=1e-5)  # k = 4 = d


class TestSmallMLP:
    @pytest.fixture
    def problem(self):
        model = compile_plain(tanh_mlp(d=4, k=3, hidden=4))  # 55 weights
        x, y = make_data(n=32, d=4, k=3)
        return model, x, y, dense_hessian(model, x, y)

    def test_top_eigenvalue(self, problem):
        model, x, y, h = problem
        magnitudes = np.sort(np.abs(np.linalg.eigvalsh(h)))
        assert magnitudes[-2] / magnitudes[-1] < 0.99  # converges in 1000
        before = weights_of(model)
        value = hessian_top_eigenvalue(model, x, y, iters=1000, tol=0.0)
        expected = largest_magnitude(h)
        assert value == pytest.approx(expected, rel=1e-5)
        # The defaults stop early, close to it, and below it (here after
        # all 100 iterations, with a ConvergenceWarning on some backends).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            default = hessian_top_eigenvalue(model, x, y)
        assert default == pytest.approx(expected, rel=1e-2)
        assert abs(default) <= abs(expected) * (1 + 1e-5)
        for a, b in zip(before, weights_of(model)):
            np.testing.assert_array_equal(a, b)

    def test_hutchpp_trace(self, problem):
        model, x, y, h = problem
        exact = keras_seht.exact_hessian_trace(model, x, y)
        assert exact == pytest.approx(np.trace(h), rel=1e-4, abs=1e-6)
        # The default budget: within Z standard errors of a single draw,
        # bounded by Hutchinson's on the residual, var <= 2 ||H||_F^2 / g.
        value = hessian_trace_hutchpp(model, x, y)
        assert abs(value - exact) <= Z * math.sqrt(hutchinson_variance(h) / 33)
        # Small budgets, several seeds: the mean is within Z standard
        # errors of the exact trace (unbiased).
        # (One operator for all seeds: a JAX HVP compiles once per object.)
        matvec = HessianOperator(model, x, y)
        shapes = matvec.shapes
        draws = [
            hutchpp_trace(matvec, shapes, samples=15, seed=s) for s in range(12)
        ]
        se = np.std(draws, ddof=1) / math.sqrt(len(draws))
        assert abs(np.mean(draws) - exact) <= Z * se + 1e-5 * abs(exact)

    def test_model_state_unchanged_in_training_mode(self):
        model = compile_plain(tiny_cnn())
        x, y = image_data()
        model(x)
        before = weights_of(model)
        # Both functions evaluate the loss through `HessianOperator`.
        hessian_top_eigenvalue(model, x, y, iters=3, tol=0.0, training=True)
        for a, b in zip(before, weights_of(model)):
            np.testing.assert_array_equal(a, b)


class TestModelValidation:
    @pytest.fixture
    def problem(self):
        model = compile_plain(tanh_mlp(d=4, k=3, hidden=4))
        return (model, *make_data(n=8, d=4, k=3))

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"iters": 0}, "iters"),
            ({"iters": 2.5}, "iters"),
            ({"tol": -1e-3}, "tol"),
            ({"seed": -3}, "seed"),
        ],
    )
    def test_top_eigenvalue_arguments(self, problem, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            hessian_top_eigenvalue(*problem, **kwargs)

    @pytest.mark.parametrize(
        "kwargs, name",
        [({"samples": 0}, "samples"), ({"seed": "x"}, "seed")],
    )
    def test_hutchpp_arguments(self, problem, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            hessian_trace_hutchpp(*problem, **kwargs)

    def test_uncompiled_model(self):
        model = tanh_mlp(d=4, k=3, hidden=4)
        x, y = make_data(n=8, d=4, k=3)
        with pytest.raises(ValueError, match="`model` must be compiled"):
            hessian_top_eigenvalue(model, x, y)
        with pytest.raises(ValueError, match="`model` must be compiled"):
            hessian_trace_hutchpp(model, x, y)
