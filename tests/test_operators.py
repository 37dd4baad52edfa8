"""Curvature operators (keras_seht.operators) and the backend products.

Backend-agnostic. The truth is independent of every autodiff framework:
for the logits network z = tanh(x W1 + b1) W2 + b2 with mean softmax
cross-entropy (``test_penalties``), the dense Hessian comes from central
finite differences of the hand-written float64 NumPy gradient
(``test_reinit.fd_hessian``), and the Gauss-Newton quadratic form, the
output direction J v and the output Hessian H_z = (diag(p) - p p^T) / B
are closed forms (``test_gauss_newton``).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import compile_plain, image_data, make_data, tiny_cnn
from test_gauss_newton import np_gauss_newton_form, np_output_direction
from test_penalties import D, K, N, _forward, _log_softmax, logits_loss
from test_penalties import logits_mlp as _logits_mlp
from test_reinit import fd_hessian

import keras_seht
from keras_seht import SEHTH, operators, spectrum
from keras_seht._checks import seed_generator
from keras_seht.operators import GaussNewtonOperator, HessianOperator


def _problem():
    x, y = make_data(N, D, K)
    model = _logits_mlp()
    model.compile("sgd", logits_loss())
    model(x[:1])
    params = [np.array(v.numpy(), "float64") for v in model.trainable_weights]
    return model, x, y, params


def _dense(operator):
    """The operator's matrix, column by column from basis vectors."""
    n = operator.num_weights
    flat = spectrum._FlatOperator(operator, operator.shapes)
    return np.stack([flat(e) for e in np.eye(n)], axis=1)


def _flat(arrays):
    return np.concatenate(
        [np.ravel(keras.ops.convert_to_numpy(a)) for a in arrays]
    ).astype("float64")


def _weights(model):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.variables]


def test_hessian_operator_matches_the_dense_hessian():
    model, x, y, params = _problem()
    hessian = HessianOperator(model, x, y)
    assert hessian.shapes == [p.shape for p in params]
    assert hessian.num_weights == sum(p.size for p in params)
    dense = _dense(hessian)
    truth = fd_hessian(params, x.astype("float64"), y)
    scale = np.abs(truth).max()
    np.testing.assert_allclose(dense, truth, atol=1e-4 * scale)
    # Rows and the exact diagonal, with chunks that do not divide n (the
    # last one is padded with zero rows).
    for chunk_size in (7, 64, 1000):
        diagonal = _flat(hessian.diagonal(chunk_size=chunk_size))
        np.testing.assert_allclose(
            diagonal, np.diag(truth), rtol=1e-4, atol=1e-5 * scale
        )
    rows = hessian.products.hvp_rows(
        keras.ops.convert_to_tensor(np.eye(hessian.num_weights)[3:9], "float32")
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rows), truth[3:9], atol=1e-4 * scale
    )


def test_gauss_newton_operator_matches_closed_form_and_dense_factors():
    model, x, y, params = _problem()
    x64 = x.astype("float64")
    gauss_newton = GaussNewtonOperator(model, x, y)
    assert gauss_newton.num_outputs == N * K
    jacobian, output_hessian = keras_seht.gauss_newton_factors(model, x, y)
    dense = _dense(gauss_newton)
    np.testing.assert_allclose(
        dense,
        jacobian.T @ output_hessian @ jacobian,
        rtol=1e-4,
        atol=1e-6 * np.abs(dense).max(),
    )
    rng = np.random.default_rng(1)
    for _ in range(3):
        sigma = [rng.normal(size=p.shape) for p in params]
        (value,) = spectrum.quadratic_forms(
            gauss_newton, gauss_newton.shapes, [sigma]
        )
        assert value == pytest.approx(
            np_gauss_newton_form(params, x64, sigma), rel=1e-4
        )


def test_products_jvp_vjp_and_output_hessian():
    model, x, y, params = _problem()
    products = GaussNewtonOperator(model, x, y).products
    x64 = x.astype("float64")
    rng = np.random.default_rng(2)
    sigma = [rng.normal(size=p.shape).astype("float32") for p in params]
    tensors = [keras.ops.convert_to_tensor(s) for s in sigma]
    # J v against the closed form of the logits' derivative.
    jv = keras.ops.convert_to_numpy(products.jvp(tensors))
    np.testing.assert_allclose(
        jv,
        np_output_direction(params, x64, sigma).ravel(),
        rtol=1e-4,
        atol=1e-5,
    )
    # J^T u is the adjoint: u . (J v) = (J^T u) . v.
    u = rng.normal(size=N * K).astype("float32")
    jtu = _flat(products.vjp(keras.ops.convert_to_tensor(u)))
    assert float(u @ jv) == pytest.approx(float(jtu @ _flat(sigma)), rel=1e-4)
    rows = keras.ops.convert_to_numpy(
        products.vjp_rows(keras.ops.convert_to_tensor(np.stack([u, 2 * u])))
    )
    np.testing.assert_allclose(rows, np.stack([jtu, 2 * jtu]), rtol=1e-5)
    # H_z = blockdiag(diag(p_i) - p_i p_i^T) / B for softmax cross-entropy.
    _, z = _forward(params, x64)
    p = np.exp(_log_softmax(z))
    blocks = [(np.diag(q) - np.outer(q, q)) / N for q in p]
    truth = np.zeros((N * K, N * K))
    for i, block in enumerate(blocks):
        truth[i * K : (i + 1) * K, i * K : (i + 1) * K] = block
    hz_u = keras.ops.convert_to_numpy(
        products.output_hvp(keras.ops.convert_to_tensor(u))
    )
    np.testing.assert_allclose(hz_u, truth @ u, rtol=1e-4, atol=1e-6)
    hz_rows = keras.ops.convert_to_numpy(
        products.output_hvp_rows(
            keras.ops.convert_to_tensor(np.eye(N * K, dtype="float32")[:5])
        )
    )
    np.testing.assert_allclose(hz_rows, truth[:5], atol=1e-6)


def test_gauss_newton_hessian_trace_uses_the_matvec():
    """hessian_trace(curvature="gauss_newton") equals the dense factors'
    quadratic forms on the same probes, and needs no dense Jacobian: it
    runs where the dense size guard refuses."""
    model, x, y, _ = _problem()
    estimator = SEHTH(max_iter=2, curvature="gauss_newton")
    mean, std_error = keras_seht.hessian_trace(
        model, x, y, estimator=estimator, samples=4, return_std_error=True
    )
    jacobian, output_hessian = keras_seht.gauss_newton_factors(model, x, y)
    generator = seed_generator(0)
    layout = keras_seht.weight_layout(model)
    draws = []
    for _ in range(4):
        values = []
        for _ in range(2):
            u = jacobian @ _flat(estimator.sample_probes(layout, generator))
            values.append(u @ output_hessian @ u)
        draws.append(np.mean(values))
    assert mean == pytest.approx(np.mean(draws), rel=1e-5)
    assert std_error == pytest.approx(
        np.std(draws, ddof=1) / math.sqrt(4), rel=1e-4
    )


def test_dense_size_guard(monkeypatch):
    model, x, y, _ = _problem()
    n = sum(math.prod(v.shape) for v in model.trainable_variables)
    m = N * K
    monkeypatch.setattr(operators, "MAX_DENSE_ENTRIES", m * (n + m) - 1)
    with pytest.raises(ValueError, match=r"would hold \d+ entries"):
        keras_seht.gauss_newton_factors(model, x, y)
    with pytest.raises(ValueError, match=r"would hold \d+ entries"):
        keras_seht.exact_hessian_trace(model, x, y, curvature="gauss_newton")
    with pytest.raises(ValueError, match=f"{n} trainable weights"):
        keras_seht.gauss_newton_factors(model, x, y, max_weights=n - 1)
    jacobian, _ = keras_seht.gauss_newton_factors(model, x, y, force=True)
    assert jacobian.shape == (m, n)
    # The estimate multiplies by J, H_z and J^T: no guard applies.
    value = keras_seht.hessian_trace(
        model, x, y, estimator=SEHTH(curvature="gauss_newton"), samples=2
    )
    assert math.isfinite(value)


def test_exact_size_guard():
    operators.check_exact_size(10, 10, force=False)
    operators.check_exact_size(11, 10, force=True)
    with pytest.raises(ValueError, match=r"11 trainable weights.*force=True"):
        operators.check_exact_size(11, 10, force=False)


def test_operators_leave_the_model_unchanged_in_training_mode():
    model = compile_plain(tiny_cnn())
    x, y = image_data()
    model(x)
    before = _weights(model)
    rng = np.random.default_rng(0)
    for cls in (HessianOperator, GaussNewtonOperator):
        operator = cls(model, x, y, training=True)
        vectors = [
            rng.normal(size=s).astype("float32") for s in operator.shapes
        ]
        assert all(np.isfinite(_flat(operator(vectors))))
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)


def test_operator_validates_its_arguments():
    model, x, y, _ = _problem()
    hessian = HessianOperator(model, x, y)
    with pytest.raises(ValueError, match="one per trainable variable"):
        hessian([np.zeros(hessian.shapes[0])])
    with pytest.raises(TypeError, match="keras.Model"):
        HessianOperator("model", x, y)
    uncompiled = _logits_mlp()
    with pytest.raises(ValueError, match="must be compiled"):
        HessianOperator(uncompiled, x, y)


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="JAX compilation cache"
)
def test_jax_functions_are_compiled_once_per_model():
    model, x, y, _ = _problem()
    first = HessianOperator(model, x, y).products._fns
    assert HessianOperator(model, x, y).products._fns is first
    assert HessianOperator(model, x, y, training=True).products._fns is not (
        first
    )
    model.compile("sgd", logits_loss())  # a new compiled loss: rebuilt
    assert HessianOperator(model, x, y).products._fns is not first
