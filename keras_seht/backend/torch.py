"""SEHT autodiff on the PyTorch backend.

The train step is eager PyTorch: one forward pass, one graph-building
backward for g = dL/dw, an HVP h = d(g . sigma)/dw per probe, and one
backward of t = mean(sigma . h) for its gradient. The loss gradient g is
reused for the update (never recomputed):

    update direction = g + strength * dt/dw.

With a loss-scaling optimizer (``LossScaleOptimizer`` under
``mixed_float16``, or ``loss_scale_factor``) the scaled loss s * L is
differentiated, as in Keras' own step, so that small float16 gradients do
not underflow: g, t and dt/dw all come out scaled by s, the optimizer
unscales the update, and the logged t is divided by s. A non-finite t
under a ``LossScaleOptimizer`` is treated as an overflow: the optimizer
gets a non-finite gradient, skips the step and lowers its scale.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import keras
import torch

from keras_seht import _keras_compat as compat
from keras_seht import functional
from keras_seht.penalties import (
    ConfidencePenalty,
    GradientNorm,
    Jacobian,
    flatten_outputs,
    float_inputs,
)


def _grad(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    create_graph: bool,
    grad_outputs: Any = None,
    batched: bool = False,
) -> list[torch.Tensor]:
    """autograd.grad with zeros (not None) for inputs the output ignores."""
    if not output.requires_grad:
        shape = (output.shape[0],) if batched else ()
        return [
            torch.zeros(shape + tuple(p.shape), device=p.device, dtype=p.dtype)
            for p in inputs
        ]
    grads = torch.autograd.grad(
        output,
        list(inputs),
        grad_outputs=grad_outputs,
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )
    out = []
    for g, p in zip(grads, inputs):
        if g is None:
            shape = (output.shape[0],) if batched else ()
            g = torch.zeros(
                shape + tuple(p.shape), device=p.device, dtype=p.dtype
            )
        out.append(g)
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    total = None
    for u, v in zip(a, b):
        term = torch.sum(u * v)
        total = term if total is None else total + term
    assert total is not None
    return total


def probe_estimate(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor]],
    create_graph: bool,
) -> torch.Tensor:
    """mean_k sigma_k^T H sigma_k from a graph-connected gradient."""
    values = []
    for sigma in probes:
        hv = _grad(_dot(grads, sigma), params, create_graph=create_graph)
        values.append(_dot(sigma, hv))
    return torch.stack(values).mean()


def gauss_newton_estimate(
    model: keras.Model,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor]],
    scale: torch.Tensor,
) -> torch.Tensor:
    """mean_k u_k^T H_z u_k, u_k = J sigma_k, differentiable in the weights.

    u = J sigma comes from two reverse passes (the "double-vjp" trick):
    J^T v for a dummy cotangent v, built with ``create_graph``, is linear
    in v, so its derivative with respect to v along sigma is J sigma.
    H_z u is the derivative of the compiled loss's output gradient along
    u, taken at a copy of the outputs so that only the loss (not u, which
    reaches the outputs through saved activations) is differentiated.
    """
    outputs = keras.tree.flatten(y_pred)
    dummies = [torch.zeros_like(z, requires_grad=True) for z in outputs]
    jacobian_t_v = _grad(_dot(dummies, outputs), params, create_graph=True)
    copies = [z.clone() for z in outputs]
    output_loss = compat.compiled_loss(
        model, y, keras.tree.pack_sequence_as(y_pred, copies), sample_weight
    )
    output_grads = _grad(output_loss * scale, copies, create_graph=True)
    values = []
    for sigma in probes:
        u = _grad(_dot(jacobian_t_v, sigma), dummies, create_graph=True)
        h_u = _grad(_dot(output_grads, u), copies, create_graph=True)
        values.append(_dot(u, h_u))
    return torch.stack(values).mean()


def _input_products(
    penalty: Jacobian,
    z: torch.Tensor,
    leaves: Sequence[torch.Tensor],
    seed: Any,
) -> torch.Tensor:
    """The Jacobian penalty R from the outputs z and the watched inputs."""
    projections, weight = penalty.projections(tuple(z.shape), z.dtype, seed)
    products = [
        _grad(torch.sum(v * z), leaves, create_graph=True) for v in projections
    ]
    return penalty.norm_from_products(products, weight, z.shape[0])


def train_step(model: keras.Model, data: Any) -> dict[str, Any]:
    """One step of L + sum_j strength_j R_j (``model.seht`` is not None).

    The penalties R_j are computed from one forward pass: a SEHT estimate
    from HVPs of the graph-connected loss gradient, ``GradientNorm`` from
    that gradient, ``Jacobian`` from input gradients of the outputs taken
    with ``create_graph``, ``ConfidencePenalty`` from the outputs. One
    backward of sum_j strength_j R_j gives their weight gradient.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    penalties = model.seht_penalties
    estimator = model.seht_estimator
    needs_graph = any(p.needs_loss_gradient for p in penalties)
    leaves: list[torch.Tensor] = []
    if any(p.needs_input_gradient for p in penalties):
        x, leaves = _watch_inputs(x)
    if compat.call_has_training_arg(model):
        y_pred = model(x, training=True)
    else:
        y_pred = model(x)
    model.zero_grad()
    loss = compat.compute_loss(model, x, y, y_pred, sample_weight, True)
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    scale = torch.as_tensor(model.optimizer.scale_loss(one)).detach()
    scaled_loss = loss * scale

    trainable = model.trainable_weights[:]
    params = [v.value for v in trainable]
    grads = _grad(scaled_loss, params, create_graph=needs_graph)
    seed = model.seht_seed_generator
    scaled_values = []
    for penalty in penalties:
        if penalty is estimator:
            probes = [
                estimator.sample_probes(
                    model.seht_layout, seed=seed, dtype=params[0].dtype
                )
                for _ in range(estimator.max_iter)
            ]
            if estimator.curvature == "gauss_newton":
                value = gauss_newton_estimate(
                    model, y, y_pred, sample_weight, params, probes, scale
                )
            else:
                value = probe_estimate(grads, params, probes, True)
        elif isinstance(penalty, GradientNorm):
            value = _dot(grads, grads) / scale
        elif isinstance(penalty, Jacobian):
            z = flatten_outputs(y_pred)
            value = _input_products(penalty, z, leaves, seed) * scale
        elif isinstance(penalty, ConfidencePenalty):
            value = penalty.value(model, y_pred, sample_weight) * scale
        else:
            raise TypeError(f"Unsupported `seht` penalty: {penalty!r}")
        scaled_values.append(value)
    values = [v.detach() / scale for v in scaled_values]
    finite = bool(torch.all(torch.isfinite(torch.stack(values))))
    if finite:
        objective = sum(
            p.strength * p.objective_value(v)
            for p, v in zip(penalties, scaled_values)
        )
        grad_penalty = _grad(objective, params, create_graph=False)
        gradients = [g.detach() + gp for g, gp in zip(grads, grad_penalty)]
        total = loss.detach() + sum(
            p.strength * p.objective_value(v) for p, v in zip(penalties, values)
        )
    elif isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        # An overflow of the scaled HVP: a non-finite gradient makes the
        # optimizer skip the step and lower its scale, as for any overflow.
        gradients = [torch.full_like(g, float("nan")) for g in grads]
        total = loss.detach()
    else:
        gradients = [g.detach() for g in grads]
        total = loss.detach()
    del grads, scaled_values

    first_input = next(i for i in keras.tree.flatten(x) if i is not None)
    batch_size = first_input.shape[0]
    compat.loss_tracker(model).update_state(total, sample_weight=batch_size)
    model.update_seht_trackers(values, finite)
    with torch.no_grad():
        model.optimizer.apply(gradients, trainable)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _watch_inputs(x: Any) -> tuple[Any, list[torch.Tensor]]:
    """`x` with its float leaves replaced by leaf tensors that need grad."""
    flat = keras.tree.flatten(x)
    leaves = []
    for i in float_inputs(x):
        flat[i] = torch.as_tensor(flat[i]).detach().requires_grad_(True)
        leaves.append(flat[i])
    return keras.tree.pack_sequence_as(x, flat), leaves


class HessianVectorProduct:
    """Hessian-vector products of the compiled loss at the current weights.

    The loss is evaluated once, statelessly (no variable, BatchNorm
    statistic or seed of the model changes); every product reuses the
    graph of one differentiable gradient.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        self.params = [
            v.value.detach().clone().requires_grad_(True)
            for v in model.trainable_variables
        ]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with torch.enable_grad():
            loss, _, _ = functional.stateless_loss(
                model,
                self.params,
                non_trainable,
                x,
                y,
                sample_weight,
                training,
            )
            self.grads = _grad(loss, self.params, create_graph=True)
        self.loss = float(loss.detach())

    def __call__(self, vectors: Sequence[Any]) -> list[torch.Tensor]:
        """H v for one vector given as one tensor per variable."""
        with torch.enable_grad():
            out = _grad(_dot(self.grads, vectors), self.params, False)
        return [o.detach() for o in out]

    def quadratic_form(self, vectors: Sequence[Any]) -> float:
        """v^T H v."""
        return float(_dot(vectors, self(vectors)))

    def diagonal(self, chunk_size: int = 256) -> list[torch.Tensor]:
        """The exact Hessian diagonal, by batches of Hessian rows."""
        flat_grad = torch.cat([g.reshape(-1) for g in self.grads])
        n = flat_grad.numel()
        diag = torch.zeros(n, dtype=flat_grad.dtype, device=flat_grad.device)
        with torch.enable_grad(), warnings.catch_warnings():
            # vmap falls back to a loop for ops without batching rules.
            warnings.simplefilter("ignore")
            for start in range(0, n, chunk_size):
                idx = torch.arange(
                    start, min(n, start + chunk_size), device=flat_grad.device
                )
                basis = torch.zeros(
                    len(idx), n, dtype=flat_grad.dtype, device=flat_grad.device
                )
                basis[torch.arange(len(idx)), idx] = 1.0
                rows = _grad(
                    flat_grad,
                    self.params,
                    create_graph=False,
                    grad_outputs=basis,
                    batched=True,
                )
                rows_flat = torch.cat(
                    [r.reshape(len(idx), -1) for r in rows], dim=1
                )
                diag[idx] = rows_flat[torch.arange(len(idx)), idx].detach()
        out, offset = [], 0
        for p in self.params:
            size = p.numel()
            out.append(diag[offset : offset + size].reshape(p.shape))
            offset += size
        return out


def gauss_newton_factors(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
) -> tuple[Any, Any]:
    """The dense output Jacobian J (M x n) and output Hessian H_z (M x M).

    M counts every output entry of the batch, n every trainable weight;
    G = J^T H_z J. Evaluated statelessly at the current weights. J's rows
    come from batched reverse passes (``is_grads_batched``), H_z from
    ``torch.autograd.functional.hessian`` of the compiled loss.
    """
    import numpy as np

    params = [
        v.value.detach().clone().requires_grad_(True)
        for v in model.trainable_variables
    ]
    non_trainable = [v.value for v in model.non_trainable_variables]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap fallbacks
        _, y_pred, _ = functional.stateless_loss(
            model, params, non_trainable, x, y, sample_weight, training
        )
        leaves = keras.tree.flatten(y_pred)
        flat = torch.cat([z.reshape(-1) for z in leaves])
        m = flat.numel()
        rows = []
        for start in range(0, m, 256):
            count = min(256, m - start)
            basis = torch.zeros(count, m, dtype=flat.dtype, device=flat.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1
            grads = _grad(flat, params, False, basis, batched=True)
            rows.append(torch.cat([g.reshape(count, -1) for g in grads], dim=1))
        jacobian = torch.cat(rows).detach().cpu().double().numpy()

        def output_loss(z_flat: torch.Tensor) -> torch.Tensor:
            pieces, offset = [], 0
            for z in leaves:
                pieces.append(z_flat[offset : offset + z.numel()].view_as(z))
                offset += z.numel()
            packed = keras.tree.pack_sequence_as(y_pred, pieces)
            return compat.compiled_loss(model, y, packed, sample_weight)

        hessian = torch.autograd.functional.hessian(output_loss, flat.detach())
    return jacobian, np.asarray(hessian.detach().cpu().double().numpy())
