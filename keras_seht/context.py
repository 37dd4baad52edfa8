r"""What a penalty reads in the train step: the plan and the step context.

A train step with penalties runs in two phases (`keras_seht.step`):

1. **Plan.** Before the forward pass, every penalty records in a
   `StepPlan` what it needs computed (`Penalty.plan`), drawing its random
   numbers there: a curvature estimator its probes :math:`\sigma_k`,
   ``Jacobian`` its output projections, ``GradientNorm`` a differentiable
   loss gradient. The random draws do not depend on the weights, so they
   are made once, outside every derivative.
2. **Values.** The backend runs the forward pass and builds a
   `StepContext` that computes, on request, the quantities below, all
   differentiable in the weights; each penalty computes its value from
   them (``Penalty.__call__(context)``), as a Keras ``Regularizer``
   computes ``__call__(x)``. The backend then differentiates the objective

   .. math::

       s L(w) + \sum_j \text{strength}_j \, \phi_j(s R_j(w)),

   where :math:`s` is the loss scale of a ``LossScaleOptimizer`` (1
   otherwise) and :math:`\phi_j` the penalty's ``objective_value``.

Every quantity of the context is one of the *scaled* loss
:math:`f = s L`, so the values penalties return are :math:`s R_j` (the
step divides by :math:`s` for the logs). A new penalty that needs only
these quantities is written in ``penalties.py`` alone; the backends
(``keras_seht/backend/``) implement the context once for every penalty.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from keras_seht.layout import WeightLayout


@dataclasses.dataclass
class DrawSpec:
    """What a penalty may read while it plans: the model and the batch.

    Attributes:
        layout: The trainable variables grouped by layer.
        seed: The model's ``seht_seed_generator``; every draw goes through
            it (so it advances once per draw, and JAX threads its state).
        dtype: The dtype of the trainable variables (of the probes).
        sparse: Whether the backend takes sparse probes (None for the
            variables a probe leaves at zero; eager torch).
        output_shape: ``() -> (B, C)``, the shape of the model's outputs
            flattened per sample (`penalties.flatten_outputs`); B may be a
            tensor (a dynamic batch).
    """

    layout: WeightLayout
    seed: Any
    dtype: Any
    sparse: bool
    output_shape: Callable[[], tuple[Any, int]]


@dataclasses.dataclass
class StepPlan:
    r"""What the backend computes in one step, collected from the penalties.

    Attributes:
        probes: The probes of the curvature estimator (``max_iter`` lists,
            one tensor per trainable variable; None entries are zero), or
            None without one.
        curvature: ``"hessian"`` or ``"gauss_newton"``: the matrix of
            `StepContext.quadratic_form`.
        epsilon: The finite-difference step of `perturbed_loss`, or None.
        input_cotangents: The projections :math:`V_k` of
            `StepContext.input_products`, or None.
        loss_gradient: Whether `StepContext.loss_gradient` is read (the
            backend then builds it for every variable, once).
        first_order_gradient: Whether ``loss_gradient(differentiable=False)``
            is read: the plain gradient, a constant of the objective.
        shifted_losses: Whether `StepContext.loss_at` is read (the
            backend then keeps the non-trainable values of before the
            forward pass for those stateless passes).
        forward_graph: Whether anything is differentiated at the weights
            themselves (False only for a lone antithetic estimator, whose
            update comes from the perturbed passes alone).
        constant_loss: Whether the loss at the weights enters the objective
            as a constant (the antithetic estimator: its objective
            :math:`L + \text{strength}\, t_\epsilon = \frac12 [L(w +
            \epsilon\sigma) + L(w - \epsilon\sigma)]` has no gradient of
            :math:`L(w)`).
    """

    probes: list[list[Any]] | None = None
    curvature: str = "hessian"
    epsilon: float | None = None
    input_cotangents: list[Any] | None = None
    loss_gradient: bool = False
    first_order_gradient: bool = False
    shifted_losses: bool = False
    forward_graph: bool = False
    constant_loss: bool = False

    def set_probes(
        self,
        probes: list[list[Any]],
        curvature: str = "hessian",
        epsilon: float | None = None,
    ) -> None:
        """Records a curvature estimator's probes (one estimator a step)."""
        if self.probes is not None:
            raise ValueError(
                "A `seht` list may hold at most one curvature estimator."
            )
        self.probes = probes
        self.curvature = curvature
        self.epsilon = epsilon


class StepContext(Protocol):
    """The quantities of one train step, differentiable in the weights.

    Implemented by each backend (``keras_seht/backend/<name>.py``); read by
    the penalties. Everything is that of the step's single training-mode
    forward pass (the same Dropout masks, BatchNorm batch statistics).

    Attributes:
        model: The model.
        x, y, sample_weight: The batch.
        scale: The loss scale :math:`s` (a scalar tensor; 1 without loss
            scaling).
        outputs: The model's outputs (``y_pred``).
        scaled_loss: :math:`f = s L`, the compiled loss (with
            ``model.losses``) scaled; a constant with
            ``plan.constant_loss``.
        weights: The trainable values :math:`w` the objective is
            differentiated at (one tensor per trainable variable).
        batch_size: The static batch size (None if it is dynamic).
    """

    model: Any
    x: Any
    y: Any
    sample_weight: Any
    scale: Any
    outputs: Any
    scaled_loss: Any
    weights: list[Any]
    batch_size: int | None

    def loss_gradient(
        self, differentiable: bool = True, part: tuple[int, int] | None = None
    ) -> list[Any]:
        r""":math:`\nabla_w f`, one tensor per trainable variable.

        ``differentiable=True``: itself differentiable (its derivative is a
        double backward). ``differentiable=False``: a constant of the
        objective (first-order autodiff only); with ``part=(start,
        stop)``, the gradient of the loss of that slice of the batch
        alone, from a stateless pass with the step's non-trainable state
        of before the forward pass.
        """

    def quadratic_form(self) -> Any:
        r"""The mean of :math:`\sigma_k^\top A \sigma_k` over the plan's probes.

        Exactly :math:`\frac1K \sum_k \sigma_k^\top A \sigma_k`, with
        :math:`A = \nabla^2_w f` (``"hessian"``) or
        :math:`A = J^\top (\nabla^2_z f) J` (``"gauss_newton"``).
        """

    def perturbed_loss(self) -> Any:
        r"""The summed losses at the two probe points, averaged over the probes.

        That is :math:`\frac1K \sum_k [f(w + \epsilon\sigma_k) + f(w -
        \epsilon\sigma_k)]` with the plan's ``epsilon``, from stateless
        passes with the step's non-trainable state.
        """

    def loss_at(
        self, shift: list[Any], part: tuple[int, int] | None = None
    ) -> Any:
        r"""The scaled loss at shifted weights, :math:`f(w + \delta)`.

        The shift :math:`\delta` is a constant (one tensor per trainable
        variable). Differentiable in :math:`w` (its gradient is
        :math:`\nabla f(w + \delta)`); a stateless pass with the step's
        non-trainable state of before the forward pass (the same Dropout
        masks and BatchNorm mode, whose statistics it does not update);
        with ``part=(start, stop)``, the loss of that slice of the batch.
        """

    def input_products(self) -> list[list[Any]]:
        r"""The gradients of the projected outputs with respect to the inputs.

        For each of the plan's ``input_cotangents`` :math:`V_k`, the
        gradients :math:`\partial \langle V_k, Z \rangle / \partial X`
        with respect to every floating-point input :math:`X` (unscaled:
        :math:`Z` is the outputs flattened per sample).
        """
