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
3. **Differentiate**: the backend returns the gradient of
   :math:`s L + \sum_j \text{strength}_j \phi_j(s R_j)`.
4. **Guard**: if a value is NaN/Inf the step applies the plain loss
   gradient instead (under a ``LossScaleOptimizer``: a non-finite gradient,
   so that the optimizer skips the step and lowers its scale, as for any
   overflow), and counts the step in ``seht_skipped``.
5. **Apply** the optimizer, update the loss and penalty trackers and the
   compiled metrics.

The backends (``keras_seht/backend/<name>.py``) provide a ``StepRun``
with the primitives: drawing under the backend's state handling, the
context, "differentiate this objective", the fallback gradients, and
applying the optimizer (statelessly under JAX). They name no penalty.
"""

from __future__ import annotations

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

    def update_seht_trackers(self, values: Any, finite: Any) -> None:
        """Records one step's penalty values and skip count."""


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

    def gradients(self, finite: Any, overflow: bool) -> list[Any]:
        """The update direction: the objective's or the plain loss gradient.

        The objective's gradient where `finite`, else the plain loss gradient
        (NaN-filled if `overflow`).
        """

    def apply(
        self, gradients: list[Any], total: Any, values: list[Any], finite: Any
    ) -> Any:
        """Applies the optimizer and updates the trackers and metrics.

        The trackers with `update_trackers`; returns what Keras' ``train_step``
        returns on this backend.
        """


def plan_step(
    model: SEHTModel,
    penalties: Sequence[Any],
    run: StepRun,
    output_shape: Callable[[], tuple[Any, int]],
) -> StepPlan:
    """Asks every penalty what to compute, drawing its random numbers."""
    plan = StepPlan()
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
    """Whether every value is finite (a boolean tensor)."""
    return ops.all(ops.isfinite(ops.stack(list(values))))


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
    gradients = run.gradients(finite, overflow)
    loss = ops.cast(loss, "float32")
    logged = loss
    for penalty, value in zip(penalties, values):
        logged = logged + penalty.loss_term(value)
    total = ops.where(finite, logged, loss)
    return run.apply(gradients, total, values, finite)


def update_trackers(
    model: SEHTModel, x: Any, total: Any, values: Sequence[Any], finite: Any
) -> None:
    """Updates the ``loss`` tracker and the penalty trackers.

    The ``loss`` tracker is weighted by the batch size; both are updated
    inside whatever state scope the backend runs them in.
    """
    compat.loss_tracker(model).update_state(total, sample_weight=batch_size(x))
    model.update_seht_trackers(values, finite)
