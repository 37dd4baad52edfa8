r"""Sharpness-aware minimization in ``compile(seht=...)``: SAM and ASAM.

SAM (Foret et al. 2021) minimizes the loss at the worst nearby point,
:math:`\max_{\lVert\epsilon\rVert \le \rho} L(w + \epsilon)`, with one
ascent step: for :math:`g = \nabla L(w)`,

.. math::

    \hat\epsilon = \rho \frac{g}{\lVert g \rVert}, \qquad
    \text{update direction} = \nabla L(w + \hat\epsilon),

:math:`\hat\epsilon` held constant (the second-order term of the chain
rule is dropped, as in the paper). ASAM (Kwon et al. 2021) makes the
neighbourhood scale-invariant with :math:`T_w = |w| + \eta`
(elementwise):

.. math::

    \hat\epsilon = \rho \frac{T_w^2\, g}{\lVert T_w\, g \rVert}.

In the train step SAM is a penalty whose objective replaces the loss's
own gradient (`Penalty.replaces_loss_gradient`): the loss at :math:`w`
enters as a constant and SAM's term carries :math:`\nabla L(w +
\hat\epsilon)` (a straight-through form whose value is
:math:`\lVert g\rVert`, logged as ``sam_gradient_norm``). The logged
loss, the metrics and BatchNorm's moving statistics come from the step's
pass at :math:`w`; the perturbed pass is stateless (same Dropout masks,
BatchNorm in training mode with the step's batch statistics, which it
does not store). Other penalties in the same ``seht`` list are evaluated
at :math:`w` and add their gradients there: ``[SAM(), SEHTD()]`` updates
along :math:`\nabla L(w + \hat\epsilon) + \text{strength}\,\nabla t(w)`.

References:
    Pierre Foret, Ariel Kleiner, Hossein Mobahi, Behnam Neyshabur.
    "Sharpness-Aware Minimization for Efficiently Improving
    Generalization." ICLR 2021, arXiv:2010.01412.

    Jungmin Kwon, Jeongseop Kim, Hyunseo Park, In Kwon Choi. "ASAM:
    Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks." ICML 2021, arXiv:2102.11600.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from keras_seht._checks import (
    check_bool,
    check_int,
    check_nonnegative,
    check_positive,
)
from keras_seht.penalties import Penalty

if TYPE_CHECKING:
    from keras_seht.context import DrawSpec, StepContext, StepPlan


def _norm(tensors: list[Any]) -> Any:
    """The Euclidean norm of a vector stored as a list of tensors."""
    return ops.sqrt(
        sum(ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors)
    )


def straight_through(value: Any, carrier: Any) -> Any:
    """`value`, with the gradient of `carrier` (whose value drops out)."""
    return value + (carrier - ops.stop_gradient(carrier))


@keras.saving.register_keras_serializable(package="keras_seht")
class SAM(Penalty):
    r"""Sharpness-aware minimization (SAM), or adaptive SAM (ASAM).

    See `keras_seht.sharpness` for the update. Each step costs two
    gradients: one at :math:`w` (which also gives the loss, the metrics
    and BatchNorm's statistics) and one at :math:`w + \hat\epsilon`. A zero
    gradient gives :math:`\hat\epsilon = 0`: the plain step.

    ASAM scales every trainable tensor, biases and BatchNorm parameters
    included, by :math:`T_w = |w| + \eta` (as davda54/sam, but with
    ASAM's :math:`\eta` so that zero weights still move; the authors' code
    leaves biases unscaled).

    m-sharpness: with ``micro_batch=m`` the batch is cut into micro-batches
    of ``m`` samples, each with its own :math:`g_i`, :math:`\hat\epsilon_i`
    and gradient at :math:`w + \hat\epsilon_i` (BatchNorm statistics of the
    micro-batch, as on one of Foret et al.'s accelerators); the update is
    their mean, and the logged ``sam_gradient_norm`` the mean of
    :math:`\lVert g_i\rVert`. The batch size must then be static and a
    multiple of ``m``. Costs about three passes per micro-batch set.

    Args:
        rho: The neighbourhood radius :math:`\rho` (> 0): 0.05 for SAM on
            CIFAR-10 (Foret et al.), 0.5 to 2.0 for ASAM (Kwon et al.).
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's :math:`\eta` (>= 0; 0.01 in Kwon et al.).
        micro_batch: Samples per micro-batch for m-sharpness, or None (the
            whole batch).

    Example:
    >>> SAM(rho=0.05)
    SAM(rho=0.05, adaptive=False, eta=0.01, micro_batch=None)
    >>> SAM.from_config(SAM(rho=1.0, adaptive=True).get_config()).adaptive
    True
    """

    log_name = "sam_gradient_norm"
    replaces_loss_gradient = True

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        micro_batch: int | None = None,
    ) -> None:
        super().__init__(strength=1.0)
        self.rho = check_positive("rho", rho)
        self.adaptive = check_bool("adaptive", adaptive)
        self.eta = check_nonnegative("eta", eta)
        self.micro_batch = (
            None
            if micro_batch is None
            else check_int("micro_batch", micro_batch)
        )

    def plan(self, plan: StepPlan, spec: DrawSpec) -> None:
        """Asks for the plain gradient at w and the perturbed pass."""
        super().plan(plan, spec)
        plan.shifted_losses = True
        plan.first_order_gradient = self.micro_batch is None

    def _parts(self, context: StepContext) -> list[tuple[int, int] | None]:
        """The micro-batches, as slices of the batch (or the whole)."""
        if self.micro_batch is None:
            return [None]
        size, m = context.batch_size, self.micro_batch
        if size is None:
            raise ValueError(
                f"`SAM(micro_batch={m})` needs a static batch size; this "
                "step was traced with a dynamic one. Use a batch size that "
                "divides the data (or `drop_remainder`)."
            )
        if size % m:
            raise ValueError(
                f"`micro_batch` must divide the batch size. Received: "
                f"micro_batch={m} for a batch of {size} samples."
            )
        return [(start, start + m) for start in range(0, size, m)]

    def perturbation(self, gradient: list[Any], weights: list[Any]) -> list:
        r""":math:`\hat\epsilon` for the gradient `g` at `weights` w."""
        g = [ops.cast(t, "float32") for t in gradient]
        if self.adaptive:
            scales = [
                ops.abs(ops.cast(ops.stop_gradient(w), "float32")) + self.eta
                for w in weights
            ]
            scaled = [s * t for s, t in zip(scales, g)]  # T g
        else:
            scales, scaled = [1.0] * len(g), g
        norm = _norm(scaled)
        # A zero gradient is no direction: the plain step, never NaN.
        factor = ops.where(norm > 0, self.rho / ops.maximum(norm, 1e-38), 0.0)
        return [
            ops.cast(factor * s * st, w.dtype)
            for s, st, w in zip(scales, scaled, weights)
        ]

    def __call__(self, context: StepContext) -> Any:
        r"""The value :math:`s\lVert g\rVert`, with the gradient at w + e."""
        norms, perturbed = [], []
        for part in self._parts(context):
            g = context.loss_gradient(differentiable=False, part=part)
            norms.append(_norm(g))
            shift = self.perturbation(g, context.weights)
            perturbed.append(ops.cast(context.loss_at(shift, part), "float32"))
        count = len(norms)
        norm = sum(norms) / count
        loss_at_shift = sum(perturbed) / count
        # The loss at w is a constant here (`replaces_loss_gradient`).
        return straight_through(norm, loss_at_shift)

    def loss_term(self, value: Any) -> Any:
        """SAM only steers the update: the logged loss is L(w)."""
        return 0.0

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialization."""
        return {
            "rho": self.rho,
            "adaptive": self.adaptive,
            "eta": self.eta,
            "micro_batch": self.micro_batch,
        }


@keras.saving.register_keras_serializable(package="keras_seht")
class ASAM(SAM):
    r"""Adaptive SAM (Kwon et al. 2021): `SAM` with ``adaptive=True``.

    Its default radius is Kwon et al.'s for CIFAR (0.5; they use 0.5 to
    2.0); see `SAM` for the update and the arguments.

    Example:
    >>> ASAM()
    ASAM(rho=0.5, eta=0.01, micro_batch=None)
    """

    def __init__(
        self,
        rho: float = 0.5,
        eta: float = 0.01,
        micro_batch: int | None = None,
    ) -> None:
        super().__init__(
            rho=rho, adaptive=True, eta=eta, micro_batch=micro_batch
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        del config["adaptive"]
        return config
