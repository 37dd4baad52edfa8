"""Independent references for the tests: plain nested autodiff, per backend.

These recompute the objective from scratch with the most direct recipe each
framework offers (no gradient reuse, no probe machinery of keras_seht), so
that the package's train step is checked against something it does not
share code with, except `functional.stateless_loss` (the compiled loss as a
function of weight values).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import numpy as np

from keras_seht import functional
from keras_seht._keras_compat import exact_tf_moments


def loss_fn(
    model: keras.Model, x: Any, y: Any, training: bool, sample_weight=None
) -> Callable[[Sequence[Any]], Any]:
    """The compiled loss as a function of trainable values."""
    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    non_trainable = [v.value for v in model.non_trainable_variables]

    def f(values: Sequence[Any]) -> Any:
        loss, _, _ = functional.stateless_loss(
            model, values, non_trainable, x, y, sample_weight, training
        )
        return loss

    return f


def _np(values: Sequence[Any]) -> list[np.ndarray]:
    return [
        np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in values
    ]


def objective_gradient(
    model: keras.Model,
    x: Any,
    y: Any,
    probe: Sequence[np.ndarray],
    strength: float,
    training: bool = True,
    sample_weight: Any = None,
) -> tuple[float, float, list[np.ndarray]]:
    """(L, t, grad of L + strength * t) with t = sigma^T H sigma.

    Computed by reverse-over-reverse-over-reverse autodiff from scratch.
    Under TensorFlow the forward pass uses exactly differentiable
    BatchNorm moments (Keras' ``tf.nn.moments`` stops the mean's gradient,
    which drops a second-derivative term; see ``_keras_compat``).
    """
    f = loss_fn(model, x, y, training, sample_weight)
    weights = [v.value for v in model.trainable_variables]
    backend = keras.config.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        sigma = [jnp.asarray(s, "float32") for s in probe]

        def t_fn(w):
            gv = jax.grad(
                lambda u: sum(
                    jnp.sum(g * s) for g, s in zip(jax.grad(f)(u), sigma)
                )
            )(w)
            return sum(jnp.sum(h * s) for h, s in zip(gv, sigma))

        def objective(w):
            loss, t = f(w), t_fn(w)
            return loss + strength * t, (loss, t)

        grads, (loss, t) = jax.grad(objective, has_aux=True)(list(weights))
        return float(loss), float(t), _np(grads)
    if backend == "torch":
        import torch

        params = [w.detach().clone().requires_grad_(True) for w in weights]
        sigma = [torch.as_tensor(s, dtype=torch.float32) for s in probe]
        loss = f(params)
        g = torch.autograd.grad(loss, params, create_graph=True)
        gv = sum(torch.sum(a * s) for a, s in zip(g, sigma))
        h = torch.autograd.grad(gv, params, create_graph=True)
        t = sum(torch.sum(a * s) for a, s in zip(h, sigma))
        grads = torch.autograd.grad(loss + strength * t, params)
        return float(loss.detach()), float(t.detach()), _np(grads)
    if backend == "tensorflow":
        import tensorflow as tf

        params = [tf.Variable(tf.identity(w)) for w in weights]
        sigma = [tf.constant(s, tf.float32) for s in probe]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as middle:
                with tf.GradientTape() as inner, exact_tf_moments():
                    loss = f(params)
                g = inner.gradient(loss, params)
                gv = tf.add_n([tf.reduce_sum(a * s) for a, s in zip(g, sigma)])
            h = middle.gradient(gv, params)
            t = tf.add_n(
                [
                    tf.reduce_sum((a if a is not None else 0.0) * s)
                    for a, s in zip(h, sigma)
                ]
            )
            objective = loss + strength * t
        grads = outer.gradient(objective, params)
        return float(loss), float(t), _np(grads)
    raise NotImplementedError(backend)


def loss_gradient(
    model: keras.Model, x: Any, y: Any, values: Sequence[Any], training=False
) -> list[np.ndarray]:
    """First-order gradient of the compiled loss at the given values."""
    f = loss_fn(model, x, y, training)
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return _np(jax.grad(f)(list(values)))
    if backend == "torch":
        import torch

        params = [
            torch.as_tensor(v, dtype=torch.float32).requires_grad_(True)
            for v in values
        ]
        return _np(torch.autograd.grad(f(params), params))
    if backend == "tensorflow":
        import tensorflow as tf

        params = [tf.Variable(np.asarray(v, "float32")) for v in values]
        with tf.GradientTape() as tape:
            loss = f(params)
        return _np(tape.gradient(loss, params))
    raise NotImplementedError(backend)


def finite_difference_diagonal(
    model: keras.Model, x: Any, y: Any, eps: float = 1e-2
) -> list[np.ndarray]:
    """Hessian diagonal by central differences of the first-order gradient.

    H_ii ~ (g_i(w + eps e_i) - g_i(w - eps e_i)) / (2 eps): uses only first
    derivatives, so it shares nothing with the HVP code it checks.
    """
    weights = [
        np.asarray(keras.ops.convert_to_numpy(v.value), "float32")
        for v in model.trainable_variables
    ]
    out = []
    for k, w in enumerate(weights):
        diag = np.zeros(w.size)
        for i in range(w.size):
            values_plus = [v.copy() for v in weights]
            values_minus = [v.copy() for v in weights]
            values_plus[k].reshape(-1)[i] += eps
            values_minus[k].reshape(-1)[i] -= eps
            g_plus = loss_gradient(model, x, y, values_plus)[k].reshape(-1)
            g_minus = loss_gradient(model, x, y, values_minus)[k].reshape(-1)
            diag[i] = (g_plus[i] - g_minus[i]) / (2 * eps)
        out.append(diag.reshape(w.shape))
    return out
