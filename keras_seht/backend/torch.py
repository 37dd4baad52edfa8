"""SEHT autodiff on the PyTorch backend: the step's primitives.

The step's logic lives in `keras_seht.step`; this module gives it eager
PyTorch autodiff. One forward pass, one graph-building backward for
g = dL/dw over the variables a penalty reads it for (with a SEHT-D probe,
only the drawn layers: autograd prunes everything below the first), an
HVP h = d(g . sigma)/dw per probe, and ONE backward of
s L + sum_j strength_j phi_j(s R_j) for the update: the loss's share
rides along the penalties' (they meet at the same activations), and the
loss gradient g is never recomputed.

With a loss-scaling optimizer (``LossScaleOptimizer`` under
``mixed_float16``, or ``loss_scale_factor``) the scaled loss s * L is
differentiated, as in Keras' own step, so that small float16 gradients do
not underflow: g, t and dt/dw all come out scaled by s, the optimizer
unscales the update, and the step divides the logged values by s.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Sequence

import keras
import torch

from keras_seht import _keras_compat as compat
from keras_seht import distributed, functional, output_split, step
from keras_seht.context import StepPlan
from keras_seht.penalties import flatten_outputs, float_inputs


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
    rows = (grad_outputs.shape[0],) if batched else ()
    if not output.requires_grad:
        grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
    else:
        # A batched backward falls back to a loop for ops without batching
        # rules, and says so.
        quiet = (
            warnings.catch_warnings() if batched else contextlib.nullcontext()
        )
        with quiet:
            if batched:
                warnings.simplefilter("ignore")
            grads = torch.autograd.grad(
                output,
                list(inputs),
                grad_outputs=grad_outputs,
                create_graph=create_graph,
                retain_graph=retain_graph or create_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
    return [
        torch.zeros(rows + tuple(p.shape), device=p.device, dtype=p.dtype)
        if g is None
        else g
        for g, p in zip(grads, inputs)
    ]


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
    H_z u is the derivative of the Gauss-Newton output loss's gradient
    (`output_split.gauss_newton_loss`: the compiled loss, split at the
    logits for softmax/sigmoid cross-entropy outputs) along u, taken at a
    copy of the outputs so that only the loss (not u, which reaches the
    outputs through saved activations) is differentiated. Its reference
    point is the outputs themselves, so H_z stays differentiable in w.
    """
    outputs = keras.tree.flatten(y_pred)
    dummies = [torch.zeros_like(z, requires_grad=True) for z in outputs]
    jacobian_t_v = _grad(_dot(dummies, outputs), params, create_graph=True)
    copies = [z.clone() for z in outputs]
    output_loss = output_split.gauss_newton_loss(
        model,
        y,
        keras.tree.pack_sequence_as(y_pred, copies),
        sample_weight,
        reference=y_pred,
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


class _KnownGradient(torch.autograd.Function):
    """A value whose gradients with respect to `params` are known already.

    ``apply(value, *params, *gradients)`` returns `value`; its backward
    sends ``upstream * gradients[i]`` to ``params[i]``. The perturbed
    passes of the smoothed methods are each differentiated as soon as they
    ran (one pass's graph alive at a time); this joins their sum to the
    step's objective, which is then differentiated as a whole.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *tensors: torch.Tensor) -> Any:
        ctx.count = len(tensors) // 2
        ctx.save_for_backward(*tensors[ctx.count :])
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> Any:
        grads = [upstream * g for g in ctx.saved_tensors]
        return (None, *grads, *([None] * ctx.count))


def _perturbed_losses(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    params: Sequence[torch.Tensor],
    probes: Sequence[Sequence[torch.Tensor | None]],
    epsilon: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    """mean_k [f(w + e s_k) + f(w - e s_k)], f = s L, with its gradient.

    Each pass runs statelessly with the model's current non-trainable
    values (call it before the step's stateful forward pass: the passes
    then see the step's own seeds and BatchNorm statistics) and is
    differentiated at once, so one pass's graph is alive at a time (peak
    memory as a plain step's).
    """
    non_trainable = [v.value for v in model.non_trainable_variables]
    x, y, sample_weight = functional.as_tensors(x, y, sample_weight)
    value = torch.zeros((), dtype=scale.dtype, device=scale.device)
    gradients = [torch.zeros_like(p) for p in params]
    for probe in probes:
        for shift in (epsilon, -epsilon):
            shifted = functional.shifted(params, probe, shift)
            loss = functional.stateless_loss(
                model, shifted, non_trainable, x, y, sample_weight, True
            )[0]
            scaled = loss * scale.to(loss.dtype) / len(probes)
            grads = _grad(scaled, params, False, retain_graph=False)
            for g, d in zip(gradients, grads):
                g.add_(d)
            value = value + scaled.detach()
    return _KnownGradient.apply(value, *params, *gradients)


def _watch_inputs(x: Any) -> tuple[Any, list[torch.Tensor]]:
    """`x` with its float leaves replaced by leaf tensors that need grad."""
    flat = keras.tree.flatten(x)
    leaves = []
    for i in float_inputs(x):
        flat[i] = torch.as_tensor(flat[i]).detach().requires_grad_(True)
        leaves.append(flat[i])
    return keras.tree.pack_sequence_as(x, flat), leaves


class _Context:
    """The step context (`keras_seht.context.StepContext`), eagerly.

    The forward pass runs at construction; the loss gradient, the
    quadratic forms and the input products are computed when a penalty
    first asks for them.
    """

    def __init__(self, run: StepRun, plan: StepPlan) -> None:
        model = run.model
        self.model, self.y = model, run.y
        self.sample_weight, self.scale = run.sample_weight, run.scale
        self._plan, self._params = plan, run.params
        self._pair = None
        if plan.epsilon is not None:
            self._pair = _perturbed_losses(
                model,
                run.x,
                run.y,
                run.sample_weight,
                run.params,
                plan.probes or [],
                plan.epsilon,
                run.scale,
            )
        self.weights = run.params
        self.batch_size = step.static_batch_size(run.x)
        # Before the stateful forward pass: `loss_at` sees the step's own
        # seeds and BatchNorm statistics (cloned: they change in place).
        self._non_trainable = [
            v.value.clone() if plan.shifted_losses else v.value
            for v in model.non_trainable_variables
        ]
        x, self._leaves = run.x, list[torch.Tensor]()
        if plan.input_cotangents is not None:
            x, self._leaves = _watch_inputs(x)
        self.x = x
        graph = plan.forward_graph or plan.first_order_gradient
        self._graph_freed = False
        self._first_order: list[torch.Tensor] | None = None
        with contextlib.nullcontext() if graph else torch.no_grad():
            if compat.call_has_training_arg(model):
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
            model.zero_grad()
            loss = compat.compute_loss(
                model, x, run.y, y_pred, run.sample_weight, True
            )
        self.outputs, self.loss = y_pred, loss
        self.live_loss = loss * run.scale.to(loss.dtype)
        self.scaled_loss = (
            self.live_loss.detach() if plan.constant_loss else self.live_loss
        )
        self._gradients: dict[tuple[int, ...], list[torch.Tensor]] = {}

    def _gradient_over(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The graph-connected loss gradient over `indices`, built once."""
        key = tuple(indices)
        if key not in self._gradients:
            params = [self._params[i] for i in key]
            self._gradients[key] = _grad(self.live_loss, params, True)
        return self._gradients[key]

    def _probed(self) -> list[int]:
        """The variables whose gradient the step builds.

        All with a `loss_gradient` request, else those a probe touches.
        """
        everything = list(range(len(self._params)))
        if self._plan.loss_gradient:
            return everything
        probes = self._plan.probes or []
        return [i for i in everything if any(s[i] is not None for s in probes)]

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """The loss gradient (see `keras_seht.context.StepContext`)."""
        everything = tuple(range(len(self._params)))
        if differentiable:
            if part is not None:
                raise ValueError("A part's loss gradient is a constant.")
            return self._gradient_over(everything)
        if part is not None:
            loss = self._loss_of(self._params, part)
            grads = _grad(loss, self._params, False, retain_graph=False)
            return [g.detach() for g in grads]
        if everything in self._gradients:
            return [g.detach() for g in self._gradients[everything]]
        if self._first_order is None:
            # The forward graph is freed here unless the objective or a
            # penalty differentiates through it later.
            keep = self._plan.forward_graph
            grads = _grad(
                self.live_loss, self._params, False, retain_graph=keep
            )
            self._first_order = [g.detach() for g in grads]
            self._graph_freed = not keep
        return self._first_order

    def _loss_of(
        self, params: Sequence[torch.Tensor], part: tuple[int, int] | None
    ) -> torch.Tensor:
        """The scaled loss at `params` on the batch (or its slice `part`)."""
        batch = functional.as_tensors(self.x, self.y, self.sample_weight)
        if part is not None:
            start, stop = part
            batch = keras.tree.map_structure(
                lambda t: None if t is None else t[start:stop], batch
            )
        loss = functional.stateless_loss(
            self.model, params, self._non_trainable, *batch, training=True
        )[0]
        return loss * self.scale.to(loss.dtype)

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """f(w + shift), differentiated at once (one graph alive at a time)."""
        params = self._params
        shifted = functional.shifted(params, [s.detach() for s in shift], 1.0)
        loss = self._loss_of(shifted, part)
        grads = _grad(loss, params, False, retain_graph=False)
        return _KnownGradient.apply(loss.detach(), *params, *grads)

    def quadratic_form(self) -> torch.Tensor:
        probes = self._plan.probes or []
        params = self._params
        if self._plan.curvature == "gauss_newton":
            everything = range(len(params))
            return gauss_newton_estimate(
                self.model,
                self.y,
                self.outputs,
                self.sample_weight,
                params,
                [_densify(s, params, everything) for s in probes],
                self.scale,
            )
        touched = self._probed()
        if not touched:  # no layer drawn: t = 0 exactly
            return torch.zeros_like(self.live_loss)
        return probe_estimate(
            self._gradient_over(touched),
            [params[i] for i in touched],
            [_densify(s, params, touched) for s in probes],
            True,
        )

    def perturbed_loss(self) -> torch.Tensor:
        if self._pair is None:
            raise ValueError("The step's plan has no finite-difference step.")
        return self._pair

    def input_products(self) -> list[list[torch.Tensor]]:
        z = flatten_outputs(self.outputs)
        return [
            _grad(torch.sum(v.to(z.dtype) * z), self._leaves, True)
            for v in self._plan.input_cotangents or []
        ]


def _model_state(model: keras.Model) -> list[Any]:
    """The model's non-trainable float variables (BatchNorm statistics).

    Seed-generator states (integers) are left out: they advance alike on
    every worker.
    """
    return [
        v
        for v in model.non_trainable_variables
        if keras.backend.is_float_dtype(v.dtype)
    ]


def _metric_variables(model: keras.Model) -> list[Any]:
    """The state variables of the metrics the step updates locally.

    Those of the compiled metrics and losses (and any other metric of the
    model), not the ``loss`` and ``seht_*`` trackers: the step feeds
    those the workers' means already.
    """
    skip = {id(compat.loss_tracker(model))}
    skip.update(id(t) for t in getattr(model, "_seht_trackers", None) or ())
    found: dict[int, Any] = {}
    for metric in model.metrics:
        if id(metric) not in skip:
            for v in metric.variables:
                found.setdefault(id(v), v)
    return list(found.values())


class StepRun:
    """The primitives of one eager train step (`keras_seht.step.StepRun`).

    Probes are sparse: the step leaves the variables of undrawn layers out
    of every derivative.

    With several workers (`keras_seht.distributed`), `all_reduce_mean`
    averages the step's gradients, values and loss, and `apply` makes the
    metrics and the BatchNorm statistics global (see `apply`).
    """

    sparse_probes = True

    def __init__(self, model: keras.Model, data: Any) -> None:
        self.model = model
        self.x, self.y, self.sample_weight = (
            keras.utils.unpack_x_y_sample_weight(data)
        )
        self.trainable = model.trainable_weights[:]
        self.params = [v.value for v in self.trainable]
        first = self.params[0]
        one = torch.ones((), dtype=first.dtype, device=first.device)
        self.scale = torch.as_tensor(model.optimizer.scale_loss(one)).detach()
        self._context: _Context | None = None
        self._objective: Any = None
        self._unneeded: list[torch.Tensor] | None = None
        self.workers = distributed.world_size()
        self._state: list[Any] = []
        self._state_before: list[torch.Tensor] = []
        if self.workers > 1:
            # Before the forward pass, which moves the BatchNorm statistics.
            self._state = _model_state(model)
            self._state_before = [v.value.clone() for v in self._state]

    def all_reduce_mean(self, tensors: Any) -> Any:
        """The mean over the workers of a structure of tensors.

        One ``torch.distributed.all_reduce`` per dtype over a flattened
        buffer (`keras_seht.distributed.all_reduce_mean`). `tensors`
        itself (no work) with one worker, and for the placeholder zeros
        that `loss_gradients` returns where it was not needed (every
        worker decided so alike).
        """
        if self.workers == 1 or tensors is self._unneeded:
            return tensors
        flat = keras.tree.flatten(tensors)
        return keras.tree.pack_sequence_as(
            tensors, distributed.all_reduce_mean(flat)
        )

    def differentiate(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[Any], tuple[list[Any], Any]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass and the objective's gradient; see `StepRun`."""
        plan = make_plan(lambda: step.output_shape(self.model, self.x))
        self._context = _Context(self, plan)
        values, self._objective = evaluate(self._context)
        self.x = self._context.x
        return self._context.loss.detach(), [v.detach() for v in values]

    def objective_gradients(self, finite: Any) -> list[torch.Tensor]:
        """The objective's gradient g; see `StepRun.objective_gradients`.

        Not computed (NaN) where `finite` is False. Its backward frees the
        forward graph.
        """
        context = self._context
        assert context is not None  # differentiate ran
        if not bool(finite):
            return [torch.full_like(p, float("nan")) for p in self.params]
        objective = context.scaled_loss
        if self._objective is not None:  # None without penalties
            objective = objective + self._objective
        grads = _grad(objective, self.params, False, retain_graph=False)
        context._graph_freed = True
        return grads

    def loss_gradients(self, needed: Any = None) -> list[torch.Tensor]:
        """The plain loss gradient g_L; see `StepRun.loss_gradients`.

        The context's own where it has it (the graph-connected gradient
        of every variable, or the first-order one); else a backward of the
        step's forward graph (kept for the objective's backward), or, with
        no graph left, of a stateless forward pass.
        """
        params = self.params
        if needed is not None and not bool(needed):
            self._unneeded = [torch.zeros_like(p) for p in params]
            return self._unneeded
        context = self._context
        assert context is not None
        everything = tuple(range(len(params)))
        if everything in context._gradients:
            return [g.detach() for g in context._gradients[everything]]
        if context._first_order is not None:
            return context._first_order
        loss = context.live_loss
        if not loss.requires_grad or context._graph_freed:  # no graph left
            nt = [v.value for v in self.model.non_trainable_variables]
            loss = (
                self.scale
                * functional.stateless_loss(
                    self.model,
                    params,
                    nt,
                    self.x,
                    self.y,
                    self.sample_weight,
                    True,
                )[0]
            )
            return _grad(loss, params, False, retain_graph=False)
        return [g.detach() for g in _grad(loss, params, False)]

    def apply(
        self,
        gradients: list[torch.Tensor],
        total: Any,
        values: list[Any],
        guard: step.Guard,
    ) -> Any:
        r"""Applies the optimizer, trackers and metrics; see `StepRun.apply`.

        With :math:`K` workers, then one ``all_reduce`` (sum) of this
        step's changes :math:`\Delta_k` of the compiled metrics' state
        variables and of the model's non-trainable float variables
        (`_model_state`): a metric variable becomes :math:`v +
        \sum_k \Delta_k` (metric states are sums over samples, so the
        metrics are those of the global batch, exactly), a BatchNorm
        statistic :math:`v + \frac1K \sum_k \Delta_k` (the same on
        every worker; for a moving mean, the single-process update on the
        global batch). A variable the step left alone keeps its value
        bit for bit (:math:`\Delta_k = 0`).
        """
        context = self._context
        assert context is not None
        model = self.model
        step.update_trackers(model, self.x, total, values, guard)
        if guard.applied is None or bool(guard.applied):
            with torch.no_grad():
                model.optimizer.apply(gradients, self.trainable)
        self._context = self._objective = None
        if self.workers == 1:
            return model.compute_metrics(
                self.x, self.y, context.outputs, self.sample_weight
            )
        metrics = _metric_variables(model)
        metrics_before = [v.value.clone() for v in metrics]
        model.compute_metrics(
            self.x, self.y, context.outputs, self.sample_weight
        )
        self._add_changes(metrics, metrics_before)
        return model.get_metrics_result()

    def _add_changes(self, metrics: list[Any], before: list[Any]) -> None:
        """Adds the workers' summed changes of the metrics (`apply`).

        And their mean changes of the model's state, and of a metric
        variable declared with ``aggregation="mean"``.
        """
        variables = metrics + self._state
        before = before + self._state_before
        averaged = [
            i >= len(metrics) or getattr(v, "aggregation", "sum") == "mean"
            for i, v in enumerate(variables)
        ]
        with torch.no_grad():
            changes = [v.value - b for v, b in zip(variables, before)]
            summed = distributed.all_reduce_sum(changes)
            for v, b, d, mean in zip(variables, before, summed, averaged):
                v.assign(b + (d / self.workers if mean else d).to(b.dtype))


# --------------------------------------------------------------------------
# Diagnostics: curvature products at a fixed batch (keras_seht.operators)
# --------------------------------------------------------------------------


def _flat(
    tensors: Sequence[torch.Tensor], rows: int | None = None
) -> torch.Tensor:
    """Concatenation of flattened tensors (keeping `rows` leading rows)."""
    if rows is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


class CurvatureProducts:
    r"""Curvature products of the compiled loss at a fixed batch.

    One forward pass, statelessly at copies of the current weights
    (``functional.stateless_loss``: no variable, BatchNorm statistic or
    seed of the model changes), whose graph every product reuses. With
    :math:`L(w)` the compiled loss (with ``model.losses``), :math:`z(w)`
    every output entry of the batch flattened (:math:`M` of them) and
    :math:`\ell(z)` the loss given to ``compile``:

    - ``hvp(v)`` :math:`= \nabla_w^2 L\,v`, reverse over reverse;
      ``hvp_rows(V)`` the same for each row of a (k, n) flat ``V``
      (``is_grads_batched``);
    - ``jvp(v)`` :math:`= Jv \in \mathbb{R}^M`, :math:`J = \partial z /
      \partial w`, as the derivative in :math:`u` of :math:`(J^\top u)
      \cdot v` (two reverse passes, no forward mode needed);
    - ``vjp(u)`` :math:`= J^\top u`; ``vjp_rows(U)`` for each row of
      a (k, M) ``U``, flat (k, n);
    - ``output_hvp(u)`` :math:`= \nabla_z^2 \ell\,u` at :math:`z(w)`;
      ``output_hvp_rows(U)`` for each row of a (k, M) ``U``. Softmax and
      sigmoid outputs with a probability cross-entropy are split at the
      logits (`keras_seht.output_split`): there :math:`\ell` is the
      surrogate whose Hessian gives the canonical Gauss-Newton matrix.

    Weight-space vectors are lists of tensors, one per trainable
    variable; batched ones, and output-space ones, flat tensors.
    """

    def __init__(
        self,
        model: keras.Model,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        training: bool = False,
    ) -> None:
        self._model = model
        self._y = y
        self._sample_weight = sample_weight
        self.params = [
            v.value.detach().clone().requires_grad_(True)
            for v in model.trainable_variables
        ]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with torch.enable_grad():
            self._loss, self._y_pred, _ = functional.stateless_loss(
                model, self.params, non_trainable, x, y, sample_weight, training
            )
            self._outputs = _flat(keras.tree.flatten(self._y_pred))
        self.num_outputs = int(self._outputs.numel())
        self._grads: list[torch.Tensor] | None = None
        self._dummy: torch.Tensor | None = None
        self._transposed: list[torch.Tensor] | None = None
        self._z: torch.Tensor | None = None
        self._output_grad: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        """The loss L(w) at the frozen weights."""
        return float(self._loss.detach())

    def _gradient(self) -> list[torch.Tensor]:
        """The gradient g = dL/dw, differentiable (made on first use)."""
        if self._grads is None:
            with torch.enable_grad():
                self._grads = _grad(self._loss, self.params, True)
        return self._grads

    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v = d(g . v)/dw, one tensor per variable."""
        grads = self._gradient()
        with torch.enable_grad():
            dot = sum(torch.sum(g * v) for g, v in zip(grads, vectors))
            assert isinstance(dot, torch.Tensor)
            out = _grad(dot, self.params, False)
        return [o.detach() for o in out]

    def hvp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, n): row b is H v_b for row v_b of `rows`, flattened."""
        flat = _flat(self._gradient())
        with torch.enable_grad():
            out = _grad(flat, self.params, False, rows, batched=True)
        return _flat(out, rows.shape[0]).detach()

    def jvp(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """J v, (M,): d/du of (J^T u) . v, linear in u."""
        if self._transposed is None:
            with torch.enable_grad():
                self._dummy = torch.zeros_like(
                    self._outputs, requires_grad=True
                )
                self._transposed = _grad(
                    self._outputs, self.params, True, self._dummy
                )
        assert self._dummy is not None
        with torch.enable_grad():
            dot = sum(
                torch.sum(t * v) for t, v in zip(self._transposed, vectors)
            )
            assert isinstance(dot, torch.Tensor)
            (out,) = _grad(dot, [self._dummy], False)
        return out.detach()

    def vjp(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        """J^T u, one tensor per variable."""
        u = cotangent.to(self._outputs.dtype)
        with torch.enable_grad():
            out = _grad(self._outputs, self.params, False, u)
        return [o.detach() for o in out]

    def vjp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, n): row b is J^T u_b for row u_b of `rows`, flattened."""
        u = rows.to(self._outputs.dtype)
        with torch.enable_grad():
            out = _grad(self._outputs, self.params, False, u, batched=True)
        return _flat(out, rows.shape[0]).detach()

    def _output_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, d ell / dz), differentiable in the leaf z (made once)."""
        if self._z is None or self._output_grad is None:
            leaves = keras.tree.flatten(self._y_pred)
            z = self._outputs.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                pieces, offset = [], 0
                for leaf in leaves:
                    pieces.append(z[offset : offset + leaf.numel()])
                    pieces[-1] = pieces[-1].view_as(leaf)
                    offset += leaf.numel()
                packed = keras.tree.pack_sequence_as(self._y_pred, pieces)
                reference = keras.tree.map_structure(
                    lambda t: t.detach(), self._y_pred
                )
                loss = output_split.gauss_newton_loss(
                    self._model, self._y, packed, self._sample_weight, reference
                )
                (self._output_grad,) = _grad(loss, [z], True)
            self._z = z
        return self._z, self._output_grad

    def output_hvp(self, u: torch.Tensor) -> torch.Tensor:
        """H_z u, (M,)."""
        z, grad = self._output_gradient()
        with torch.enable_grad():
            (out,) = _grad(grad, [z], False, u.to(z.dtype))
        return out.detach()

    def output_hvp_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, M): row b is H_z u_b for row u_b of `rows`."""
        z, grad = self._output_gradient()
        u = rows.to(z.dtype)
        with torch.enable_grad():
            (out,) = _grad(grad, [z], False, u, batched=True)
        return out.detach()
