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

import contextlib
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
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """autograd.grad with zeros (not None) for inputs the output ignores.

    ``retain_graph=False`` for a graph's last backward: its saved tensors
    are then freed as the backward pass reaches them, which lowers the
    step's peak memory.
    """
    if not inputs:
        return []
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
        retain_graph=retain_graph or create_graph,
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
    """mean_k sigma_k^T H sigma_k from a graph-connected gradient.

    `grads`, `params` and each probe may cover a subset of the variables
    (those the probes touch).
    """
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


def _densify(
    probe: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    indices: Sequence[int],
) -> list[torch.Tensor]:
    """The probe's tensors at `indices`, zeros where it is None."""
    dense = []
    for i in indices:
        sigma = probe[i]
        dense.append(torch.zeros_like(params[i]) if sigma is None else sigma)
    return dense


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
    smoothed = estimator is not None and estimator.method != "exact"
    trainable = model.trainable_weights[:]
    params = [v.value for v in trainable]
    seed = model.seht_seed_generator
    one = torch.ones((), dtype=params[0].dtype, device=params[0].device)
    scale = torch.as_tensor(model.optimizer.scale_loss(one)).detach()
    sparse: list[list[torch.Tensor | None]] = []
    if estimator is not None:
        sparse = [
            estimator.sample_sparse_probes(
                model.seht_layout, seed=seed, dtype=params[0].dtype
            )
            for _ in range(estimator.max_iter)
        ]
    if smoothed:
        # Before the stateful forward pass: the perturbed passes then see
        # the step's own non-trainable state (seeds, BatchNorm statistics).
        pair_value, pair_grads = _perturbed_pairs(
            model, x, y, sample_weight, params, sparse, scale
        )
    leaves: list[torch.Tensor] = []
    if any(p.needs_input_gradient for p in penalties):
        x, leaves = _watch_inputs(x)
    # The antithetic method needs no gradient at w unless another penalty
    # is differentiated there.
    no_grad = smoothed and estimator.method == "antithetic"
    no_grad = no_grad and len(penalties) == 1
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        if compat.call_has_training_arg(model):
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        model.zero_grad()
        loss = compat.compute_loss(model, x, y, y_pred, sample_weight, True)
    scale = scale.to(loss.dtype)
    scaled_loss = loss * scale
    # The graph-building backward only reaches the variables whose
    # gradient a penalty reads (those a probe touches; all of them for
    # GradientNorm), and autograd prunes everything below the first of
    # them.
    if any(isinstance(p, GradientNorm) for p in penalties):
        touched = list(range(len(params)))
    elif needs_graph:
        touched = [
            i
            for i in range(len(params))
            if any(s[i] is not None for s in sparse)
        ]
    else:
        touched = []
    grads = _grad(scaled_loss, [params[i] for i in touched], True)
    scaled_values = []
    for penalty in penalties:
        if penalty is estimator and smoothed:
            # t_eps = (L(w + e s) + L(w - e s) - 2 L(w)) / e^2, scaled; its
            # gradient is assembled below from the passes' gradients.
            value = (pair_value - 2.0 * scaled_loss.detach()) / (
                estimator.step_epsilon**2
            )
        elif penalty is estimator:
            if estimator.curvature == "gauss_newton":
                indices = range(len(params))
                probes = [_densify(s, params, indices) for s in sparse]
                value = gauss_newton_estimate(
                    model, y, y_pred, sample_weight, params, probes, scale
                )
            else:
                probes = [_densify(s, params, touched) for s in sparse]
                sub_params = [params[i] for i in touched]
                if sub_params:
                    value = probe_estimate(grads, sub_params, probes, True)
                else:  # no layer drawn: t = 0 exactly
                    value = torch.zeros_like(scaled_loss)
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
        # One backward of L + sum_j strength_j R_j: the loss's share rides
        # along the penalties' (they meet at the same activations), so it
        # costs little more than the penalties' backward alone.
        loss_weight: float | torch.Tensor = 1.0
        pair_weight: float | torch.Tensor = 0.0
        if smoothed:
            # d/dw of strength * R(t_eps): the pairs' gradients weigh
            # strength R'(t) / e^2, the loss's -2 strength R'(t) / e^2
            # (so, antithetic, L + strength t_eps = (L+ + L-) / 2).
            index = penalties.index(estimator)
            t = scaled_values[index]
            slope = torch.as_tensor(
                estimator.strength, dtype=t.dtype, device=t.device
            )
            if estimator.clip_negative:
                slope = slope * (t > 0).to(t.dtype)
            pair_weight = slope / estimator.step_epsilon**2
            if estimator.method == "antithetic":
                loss_weight, pair_weight = 0.0, 0.5
            else:
                loss_weight = 1.0 - 2.0 * pair_weight
        objective = loss_weight * scaled_loss + sum(
            p.strength * p.objective_value(v)
            for p, v in zip(penalties, scaled_values)
            if not (smoothed and p is estimator)
        )
        gradients = _grad(objective, params, False, retain_graph=False)
        if smoothed:
            gradients = [
                g + pair_weight * pg for g, pg in zip(gradients, pair_grads)
            ]
        total = loss.detach() + sum(
            p.strength * p.objective_value(v) for p, v in zip(penalties, values)
        )
    elif isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
        # An overflow of the scaled HVP: a non-finite gradient makes the
        # optimizer skip the step and lower its scale, as for any overflow.
        gradients = [torch.full_like(p, float("nan")) for p in params]
        total = loss.detach()
    else:
        if not scaled_loss.requires_grad:  # antithetic: w had no graph
            nt = [v.value for v in model.non_trainable_variables]
            scaled_loss = (
                scale
                * functional.stateless_loss(
                    model, params, nt, x, y, sample_weight, training=True
                )[0]
            )
        gradients = _grad(scaled_loss, params, False, retain_graph=False)
        total = loss.detach()
    del grads, scaled_values

    first_input = next(i for i in keras.tree.flatten(x) if i is not None)
    batch_size = first_input.shape[0]
    compat.loss_tracker(model).update_state(total, sample_weight=batch_size)
    model.update_seht_trackers(values, finite)
    with torch.no_grad():
        model.optimizer.apply(gradients, trainable)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _perturbed_pairs(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor | None]],
    scale: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """mean_k [L(w + e s_k) + L(w - e s_k)] (scaled) and its gradient.

    Each pass runs statelessly with the model's current non-trainable
    values and is differentiated at once, so one pass's graph is alive at
    a time (peak memory as a plain step's).
    """
    epsilon = model.seht_estimator.step_epsilon
    non_trainable = [v.value for v in model.non_trainable_variables]
    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    value = torch.zeros((), dtype=scale.dtype, device=scale.device)
    gradients = [torch.zeros_like(p) for p in params]
    for probe in probes:
        for step in (epsilon, -epsilon):
            shifted = functional.shifted(params, probe, step)
            loss = functional.stateless_loss(
                model, shifted, non_trainable, x, y, sample_weight, True
            )[0]
            scaled = loss * scale.to(loss.dtype) / len(probes)
            grads = _grad(scaled, params, False, retain_graph=False)
            for g, d in zip(gradients, grads):
                g.add_(d)
            value = value + scaled.detach()
    return value, gradients


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
