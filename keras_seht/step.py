r"""The train step with penalties, once for every backend.

``compile(seht=...)`` makes a model train on

.. math::

    L(w) + \sum_j \text{strength}_j \, \phi_j(R_j(w)),

with :math:`R_j` each penalty's value and :math:`\phi_j` its
``objective_value`` (:math:`\max(t, 0)` with ``clip_negative``). One step:

1. **Plan** (`keras_seht.context`): every penalty draws its random numbers
   (the estimator's probes) and records what it needs.
2. **Values**: the backend runs one training-mode forward pass and gives
   a step context; every penalty computes :math:`s R_j` from it.
3. **Differentiate**: the backend returns the gradient :math:`g` of
   :math:`s L + \sum_j \text{strength}_j \phi_j(s R_j)`.
4. **Average** (data-parallel workers only, `keras_seht.distributed`):
   :math:`g`, the penalty values, the loss (and :math:`g_L` where the
   step has it) are replaced by their means over the workers, with one
   bucketed all-reduce, so that the guard below decides the same on
   every worker (a fallback :math:`g_L` is averaged when it is needed).
   Every worker draws the same probe, so the mean of the workers'
   :math:`g` is the gradient on the global batch.
5. **Guard**: if a penalty value is NaN/Inf (counted in ``seht_skipped``)
   or the update :math:`g` is (a NaN/Inf entry, or a float32 squared norm
   that overflows; counted in ``seht_update_skipped``), the step applies
   the plain loss gradient :math:`g_L` instead; if :math:`g_L` is not
   finite either, no step at all (weights and optimizer state unchanged;
   counted in ``seht_step_skipped``). Under a ``LossScaleOptimizer`` the
   fallback is a non-finite gradient instead, so that the optimizer skips
   the step and lowers its scale, as for any overflow.
6. **Safeguard** (``compile(seht_safeguard=...)``, `keras_seht.safeguard`):
   a finite :math:`g` becomes :math:`g_L + c\,(g - g_L)` with
   :math:`c = \min(1, \rho \lVert g_L \rVert / \lVert g - g_L \rVert)`
   (exactly :math:`g` where :math:`c = 1`).
7. **Apply** the optimizer, update the loss and penalty trackers and the
   compiled metrics.

The backends (``keras_seht/backend/<name>.py``) provide a ``StepRun``
with the primitives: drawing under the backend's state handling, the
context, "differentiate this objective" (:math:`g`), "the plain loss
gradient" (:math:`g_L`, reused where the step has it), and "apply or
skip" the optimizer (statelessly under JAX). They name no penalty.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, Sequence

import keras
from keras import ops

from keras_seht import _keras_compat as compat
from keras_seht.context import DrawSpec, StepContext, StepPlan
from keras_seht.layout import WeightLayout


class SEHTModel(Protocol):
    """What the step reads from the model.

    A compiled `keras_seht.Model` or `keras_seht.Sequential`
    (`keras_seht.model.SEHTTrainer`).
    """

    seht_seed_generator: Any
    trainable_variables: list[Any]
    optimizer: Any

    @property
    def seht_penalties(self) -> list[Any]:
        """The penalties of ``compile(seht=...)``."""

    @property
    def seht_layout(self) -> WeightLayout:
        """The trainable variables grouped by layer."""

    def check_trainable_weights(self) -> None:
        """Raises ValueError if nothing is trainable."""

    @property
    def seht_safeguard(self) -> Any:
        """The safeguard of ``compile(seht_safeguard=...)``, or None."""

    def update_seht_trackers(self, values: Any, guard: Guard) -> None:
        """Records one step's penalty values, skip counts and bound."""


@dataclasses.dataclass
class Guard:
    """What the guard and the safeguard decided in one step.

    Attributes:
        finite: Whether every penalty value was finite (a boolean tensor).
        update_finite: Whether the penalized update :math:`g` was used:
            `finite`, and :math:`g` has no NaN/Inf entry and a finite
            float32 squared norm.
        applied: Whether the optimizer step was applied (False only where
            the update, the plain loss gradient by then, was not finite);
            None where it always is (under a ``LossScaleOptimizer``, which
            skips non-finite steps itself).
        factor: The safeguard's :math:`c` (None without a safeguard).
        bound: Whether :math:`c < 1` (None without a safeguard).
    """

    finite: Any
    update_finite: Any
    applied: Any = None
    factor: Any = None
    bound: Any = None


class StepRun(Protocol):
    """One step's backend primitives (``backend/<name>.py``'s ``StepRun``).

    Attributes:
        x, y, sample_weight: The batch.
        scale: The loss scale s (a scalar tensor; set by `differentiate`).
        sparse_probes: Whether the backend takes sparse probes.
    """

    x: Any
    y: Any
    sample_weight: Any
    scale: Any
    sparse_probes: bool

    def differentiate(
        self,
        make_plan: Callable[[Callable[[], Any]], StepPlan],
        evaluate: Callable[[StepContext], tuple[list[Any], Any]],
    ) -> tuple[Any, list[Any]]:
        """One forward pass and the objective's gradient.

        Calls ``make_plan(output_shape)`` where random draws are allowed
        (before the forward pass, or after it where the model may still be
        unbuilt), runs the forward pass, builds the context, calls
        ``evaluate(context) -> (scaled values, objective)`` and
        differentiates ``s L + objective``. Returns the unscaled loss and
        the scaled values (for the logs and the guard).
        """

    def objective_gradients(self, finite: Any) -> list[Any]:
        """:math:`g`, the gradient of ``s L + objective`` (the update).

        Where `finite` is False (a non-finite penalty value) the backend
        may skip computing it: any value is then returned (it is not used).
        """

    def loss_gradients(self, needed: Any = None) -> list[Any]:
        """:math:`g_L`, the plain gradient of ``s L`` at the weights.

        Reused where the step computed it already; otherwise one plain
        backward pass (computed only where `needed` is True, zeros
        elsewhere; None: always). Called before `objective_gradients`
        when the step needs both.
        """

    # Optional: `all_reduce_mean(tensors) -> tensors` (`all_reduce_mean`
    # below), the mean over data-parallel workers of a structure of
    # tensors, returning `tensors` itself where there is one worker.

    def apply(
        self, gradients: list[Any], total: Any, values: list[Any], guard: Guard
    ) -> Any:
        """Applies the optimizer (unless ``guard.applied`` is False).

        Also updates the trackers (with `update_trackers`) and the
        metrics. Where ``guard.applied`` is False the weights and the
        optimizer's variables are left exactly as they were. Returns what
        Keras' ``train_step`` returns on this backend.
        """


def plan_step(
    model: SEHTModel,
    penalties: Sequence[Any],
    run: StepRun,
    output_shape: Callable[[], tuple[Any, int]],
) -> StepPlan:
    """Asks every penalty what to compute, drawing its random numbers.

    Without penalties (a ``seht=None`` model trained data-parallel), the
    plain loss gradient: a forward graph and nothing drawn.
    """
    plan = StepPlan()
    if not penalties:
        plan.forward_graph = True
        return plan
    trainable = model.trainable_variables
    spec = DrawSpec(
        layout=model.seht_layout,
        seed=model.seht_seed_generator,
        dtype=trainable[0].dtype,
        sparse=run.sparse_probes,
        output_shape=output_shape,
    )
    for penalty in penalties:
        penalty.plan(plan, spec)
    return plan


def objective(penalties: Sequence[Any], values: Sequence[Any]) -> Any:
    r""":math:`\sum_j \text{strength}_j \phi_j(v_j)`, None without penalties."""
    total = None
    for penalty, value in zip(penalties, values):
        term = penalty.strength * penalty.objective_value(value)
        total = term if total is None else total + term
    return total


def evaluate(penalties: Sequence[Any], context: StepContext) -> tuple:
    """Every penalty's s R from the context, and their objective."""
    values = [ops.cast(penalty(context), "float32") for penalty in penalties]
    return values, objective(penalties, values)


def all_finite(values: Sequence[Any]) -> Any:
    """Whether every value is finite (a boolean tensor; True for none)."""
    if not values:
        return ops.convert_to_tensor(True)
    return ops.all(ops.isfinite(ops.stack(list(values))))


def squared_norm(tensors: Sequence[Any]) -> Any:
    r""":math:`\sum_i \lVert t_i \rVert^2` in float32 (a scalar tensor).

    NaN if an entry is NaN, inf if one is infinite or the sum overflows.
    """
    total = None
    for t in tensors:
        term = ops.sum(ops.square(ops.cast(t, "float32")))
        total = term if total is None else total + term
    return total


def entries_finite(tensors: Sequence[Any]) -> Any:
    """Whether every entry of every tensor is finite (a boolean tensor)."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors]))


def bounded_update(
    safeguard: Any, gradients: Sequence[Any], loss_gradients: Sequence[Any]
) -> tuple[list[Any], Any, Any]:
    r""":math:`g_L + c\,(g - g_L)`, the safeguard's update, with c and c < 1.

    :math:`c` comes from ``safeguard.factor(||g_L||, ||g - g_L||)``
    (`keras_seht.safeguard.GradientBound`); where :math:`c = 1` the update
    is `gradients` itself, bit for bit (a select, not a product).

    Args:
        safeguard: The ``compile(seht_safeguard=...)`` object.
        gradients: :math:`g`, one tensor per trainable variable.
        loss_gradients: :math:`g_L`, likewise.

    Returns:
        ``(update, c, c < 1)``.
    """
    shares = [
        g - ops.cast(gl, g.dtype) for g, gl in zip(gradients, loss_gradients)
    ]
    loss_norm = ops.sqrt(squared_norm(loss_gradients))
    share_norm = ops.sqrt(squared_norm(shares))
    factor, bound = safeguard.factor(loss_norm, share_norm)
    update = [
        ops.where(
            bound, ops.cast(gl, g.dtype) + ops.cast(factor, g.dtype) * p, g
        )
        for g, gl, p in zip(gradients, loss_gradients, shares)
    ]
    return update, factor, bound


def output_shape(model: Any, x: Any) -> tuple[Any, int]:
    """``(B, C)``: the model's outputs on `x`, flattened per sample.

    From the output spec: no forward pass.
    """

    def symbolic(t: Any) -> Any:
        if t is None:
            return None
        dtype = keras.backend.standardize_dtype(t.dtype)
        return keras.KerasTensor(tuple(t.shape), dtype=dtype)

    spec = model.compute_output_spec(keras.tree.map_structure(symbolic, x))
    features = sum(math.prod(t.shape[1:]) for t in keras.tree.flatten(spec))
    return batch_size(x), int(features)


def batch_size(x: Any) -> Any:
    """The batch size of `x` (a tensor in a traced TensorFlow step)."""
    first = next(i for i in keras.tree.flatten(x) if i is not None)
    return ops.shape(first)[0]


def static_batch_size(x: Any) -> int | None:
    """The batch size of `x` if it is static, else None."""
    first = next(i for i in keras.tree.flatten(x) if i is not None)
    size = first.shape[0]
    return None if size is None else int(size)


def all_reduce_mean(run: StepRun, tensors: Any) -> Any:
    r"""The mean of `tensors` (a structure) over the data-parallel workers.

    ``run.all_reduce_mean`` where the backend has it; it returns
    `tensors` itself (the same object) where there is nothing to reduce
    (one worker), and so does this function for a backend without it
    (JAX, whose sharded arrays make every quantity global already).
    """
    reduce = getattr(run, "all_reduce_mean", None)
    return tensors if reduce is None else reduce(tensors)


def train_step(run: StepRun, model: SEHTModel) -> Any:
    """One step of the regularized objective (``model.seht`` is set).

    Args:
        run: The backend's ``StepRun`` for this batch.
        model: The compiled keras-seht model.

    Returns:
        What the backend's Keras ``train_step`` returns (the logs; under
        JAX, the logs and the new state).
    """
    object.__setattr__(model, "_seht_step_ran", True)
    penalties = model.seht_penalties
    loss, scaled_values = run.differentiate(
        lambda shape: plan_step(model, penalties, run, shape),
        lambda context: evaluate(penalties, context),
    )
    scale = ops.cast(run.scale, "float32")
    values = [v / scale for v in scaled_values]
    finite = all_finite(values)
    overflow = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    safeguard = model.seht_safeguard
    if safeguard is not None:  # first: eager torch then keeps its graph
        loss_gradients = run.loss_gradients()
    gradients = run.objective_gradients(finite)
    shared = {"gradients": gradients, "values": values, "loss": loss}
    if safeguard is not None:
        shared["loss_gradients"] = loss_gradients
    reduced = all_reduce_mean(run, shared)
    parallel = reduced is not shared
    if parallel:
        # Data-parallel workers: the means, before the guard decides, so
        # that every worker decides (and updates) alike.
        gradients, values = reduced["gradients"], reduced["values"]
        loss = reduced["loss"]
        loss_gradients = reduced.get("loss_gradients")
        finite = all_finite(values)
    update_finite = ops.logical_and(
        finite, ops.isfinite(squared_norm(gradients))
    )
    guard = Guard(finite=finite, update_finite=update_finite)
    if safeguard is None:
        update = gradients
        if not overflow:  # the fallback; a loss-scaling one is NaN instead
            loss_gradients = run.loss_gradients(ops.logical_not(update_finite))
            if parallel:
                loss_gradients = all_reduce_mean(run, loss_gradients)
    else:
        update, guard.factor, guard.bound = bounded_update(
            safeguard, gradients, loss_gradients
        )
    if overflow:
        # A non-finite penalty or update under loss scaling is (almost
        # always) an overflow of the scaled derivatives: a non-finite
        # gradient makes the optimizer skip the step and lower the scale.
        fallback = [ops.full_like(g, float("nan")) for g in gradients]
    else:
        fallback = loss_gradients
    # Select, never multiply: 0 * NaN would still be NaN.
    update = [
        ops.where(update_finite, u, ops.cast(f, u.dtype))
        for u, f in zip(update, fallback)
    ]
    if not overflow:
        guard.applied = entries_finite(update)
    loss = ops.cast(loss, "float32")
    logged = loss
    for penalty, value in zip(penalties, values):
        logged = logged + penalty.loss_term(value)
    total = ops.where(finite, logged, loss)
    return run.apply(update, total, values, guard)


def update_trackers(
    model: SEHTModel, x: Any, total: Any, values: Sequence[Any], guard: Guard
) -> None:
    """Updates the ``loss`` tracker and the penalty trackers.

    The ``loss`` tracker is weighted by the batch size; both are updated
    inside whatever state scope the backend runs them in.
    """
    compat.loss_tracker(model).update_state(total, sample_weight=batch_size(x))
    model.update_seht_trackers(values, guard)
