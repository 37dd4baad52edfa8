"""The pieces of the papers' training recipes, shared by the examples.

- `CoupledSGD`: SGD with PyTorch-style L2 weight decay, the paper's
  optimizer (Keras' own ``weight_decay`` is decoupled, see below);
- learning-rate schedules as functions ``(epoch, history) -> lr``
  (`cosine`, `step_decay`, `plateau_decay`), for
  `keras_seht.experiments.runner.run_training`;
- `parse_method`: ``"seht-d+dropout"`` -> the regularizers to combine;
  `penalties`: the ``compile(seht=[...])`` list of a method, with the
  sharpness-aware methods' settings (`SAM_RHO`, `ASAM_RHO`,
  `GNP_EPSILON`, `GNP_STRENGTH`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import keras

from keras_seht._checks import check_int


@keras.saving.register_keras_serializable(package="keras_seht")
class CoupledSGD(keras.optimizers.SGD):
    r"""SGD whose weight decay is an L2 term of the gradient, as PyTorch's.

    Each update uses :math:`g + \lambda w` (:math:`\lambda` =
    ``l2_decay``) in place of the gradient :math:`g`, before momentum:
    the decay of ``torch.optim.SGD(weight_decay=λ)`` that the papers'
    recipes use, on every trainable variable. It equals adding
    :math:`\frac{\lambda}{2}\lVert w\rVert^2` to the loss, but leaves the
    loss, and so the Hessian the SEHT penalty estimates, untouched.
    Keras' own ``weight_decay`` argument is decoupled
    (:math:`w \leftarrow w - \eta\lambda w`, outside the momentum), which
    with momentum 0.9 decays about ten times less.

    Args:
        learning_rate, momentum, nesterov: As `keras.optimizers.SGD`.
        l2_decay: :math:`\lambda >= 0`.
        **kwargs: Other `keras.optimizers.SGD` arguments (clipping, ...).
    """

    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        l2_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            **kwargs,
        )
        if not (isinstance(l2_decay, (int, float)) and l2_decay >= 0):
            raise ValueError(
                f"`l2_decay` must be a number >= 0. Received: {l2_decay!r}"
            )
        self.l2_decay = float(l2_decay)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any):
        """SGD's update, with ``l2_decay * variable`` added to the gradient."""
        if self.l2_decay:
            gradient = keras.ops.add(
                gradient,
                keras.ops.multiply(
                    keras.ops.cast(variable, gradient.dtype), self.l2_decay
                ),
            )
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        """The optimizer's config, ``l2_decay`` included."""
        return {**super().get_config(), "l2_decay": self.l2_decay}


# ------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class Cosine:
    r"""Cosine annealing of the learning rate from ``base`` over ``epochs``.

    :math:`\eta_e = \frac{\eta_0}{2}(1 + \cos(\pi e / E))` at epoch
    ``e`` of ``E`` (PyTorch's ``CosineAnnealingLR`` stepped per epoch).
    """

    base: float
    epochs: int

    def __call__(self, epoch: int, history: dict[str, list]) -> float:
        """The learning rate at `epoch`."""
        return self.base * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


@dataclasses.dataclass(frozen=True)
class StepDecay:
    r"""Step decay: the rate times ``factor`` at each of the ``milestones``.

    :math:`\eta_0 \cdot` ``factor`` to the number of ``milestones``
    reached (``MultiStepLR``: 0.1 divided by 5 at epochs 60, 120, 160).
    """

    base: float
    milestones: tuple[int, ...]
    factor: float

    def __call__(self, epoch: int, history: dict[str, list]) -> float:
        """The learning rate at `epoch`."""
        reached = sum(epoch >= m for m in self.milestones)
        return self.base * self.factor**reached


@dataclasses.dataclass(frozen=True)
class PlateauDecay:
    """The classic word-language-model learning-rate rule.

    After an epoch whose ``monitor`` (validation loss) is not below the best
    so far, divide the learning rate by ``1 / factor`` (4). A function of the
    history, so a resumed run gets the same rates.
    """

    base: float
    factor: float
    monitor: str = "val_loss"

    def __call__(self, epoch: int, history: dict[str, list]) -> float:
        """The learning rate at `epoch`, from `history`'s ``monitor`` values."""
        values = history.get(self.monitor, [])[:epoch]
        lr, best = self.base, math.inf
        for value in values:
            if value < best:
                best = value
            else:
                lr *= self.factor
        return lr


def cosine(base: float, epochs: int) -> Cosine:
    """Cosine annealing from `base` to 0 over `epochs` epochs."""
    return Cosine(float(base), check_int("epochs", epochs))


def step_decay(
    base: float, milestones: Sequence[int], factor: float
) -> StepDecay:
    """`base` times `factor` per milestone epoch reached."""
    return StepDecay(float(base), tuple(int(m) for m in milestones), factor)


def plateau_decay(base: float, factor: float = 0.25) -> PlateauDecay:
    """The rate `base`, decayed by `factor` on plateaus of the validation loss.

    It is multiplied by `factor` after every epoch without a new best
    validation loss.
    """
    return PlateauDecay(float(base), float(factor))


# ---------------------------------------------------------------- methods

#: The regularizers a method name combines with ``+``.
COMPONENTS = (
    "seht-d",
    "seht-h",
    "jacobian",
    "confidence-penalty",
    "label-smoothing",
    "cutout",
    "mixup",
    "dropout",
    "dropblock",
    "sam",
    "asam",
    "gnp",
)

#: The sharpness-aware components: at most one per method (each sets the
#: update direction from a second gradient at shifted weights; GNP with
#: α = 1 is SAM).
SHARPNESS = ("sam", "asam", "gnp")

#: SAM's radius ρ: 0.05, Foret et al.'s for CIFAR-10 (ResNets and WRNs).
SAM_RHO = 0.05
#: ASAM's radius ρ: 0.5, Kwon et al.'s official CIFAR-10 command (1.0 for
#: CIFAR-100; the paper's range is 0.5 to 2.0).
ASAM_RHO = 0.5
#: GNP's finite-difference step r: Zhao et al.'s 0.01.
GNP_EPSILON = 0.01
#: GNP's strength. Zhao et al. fix α = λ/r = 0.8 for a penalty λ‖g‖;
#: `keras_seht.regularizers.GradientNorm` penalizes strength · ‖g‖², whose
#: update mixes the two gradients with α = 2 · strength · ‖g‖ / r. No
#: constant strength gives a constant α; 4e-3 = 0.8 · r / 2 gives α = 0.8
#: where ‖g‖ = 1, and α = 0.8 · ‖g‖ elsewhere (training logs ‖g‖² as
#: ``gradient_norm_sq``: rescale by 1/‖g‖ for the paper's α).
GNP_STRENGTH = 4e-3


def parse_method(method: str, allowed: Sequence[str] = COMPONENTS) -> set[str]:
    """The set of parts of `method`, a ``+``-joined name or ``"baseline"``.

    ``"baseline"`` -> ``set()``; ``"seht-d+dropout"`` -> ``{"seht-d",
    "dropout"}``. Unknown parts (not in `allowed`), a repeated part, both
    SEHT estimators or two of the sharpness-aware methods (`SHARPNESS`)
    raise a ValueError.
    """
    if method == "baseline":
        return set()
    parts = method.split("+")
    unknown = [p for p in parts if p not in allowed]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"Unknown method {method!r}: use 'baseline' or '+'-joined "
            f"parts from {', '.join(allowed)}."
        )
    if {"seht-d", "seht-h"} <= set(parts):
        raise ValueError(f"{method!r}: choose one of seht-d and seht-h.")
    sharpness = [p for p in parts if p in SHARPNESS]
    if len(sharpness) > 1:
        raise ValueError(
            f"{method!r}: choose one of {', '.join(SHARPNESS)} (each sets "
            f"the update from a gradient at shifted weights); got "
            f"{' and '.join(sharpness)}."
        )
    return set(parts)


def penalties(
    parts: set[str],
    strength: float,
    p: float,
    max_iter: int | None,
    *,
    sam_rho: float = SAM_RHO,
    asam_rho: float = ASAM_RHO,
    gnp_strength: float = GNP_STRENGTH,
) -> list[Any]:
    """The ``compile(seht=[...])`` list of a method's parts.

    SEHT-D(`p`, `max_iter` or 1), SEHT-H(`max_iter` or 5) at `strength`, the
    Jacobian penalty (n_proj 1, 0.01), the confidence penalty (0.1),
    SAM(`sam_rho`), ASAM(`asam_rho`, η 0.01) and GNP (``GradientNorm``
    with the finite difference, r = `GNP_EPSILON`, at `gnp_strength`).
    With SAM or ASAM the others' gradients are taken at w (see
    `keras_seht.sharpness`).
    """
    from keras_seht import ASAM, SAM, SEHTD, SEHTH
    from keras_seht.penalties import ConfidencePenalty, GradientNorm, Jacobian

    found: list[Any] = []
    if "seht-d" in parts:
        found.append(SEHTD(p=p, max_iter=max_iter or 1, strength=strength))
    if "seht-h" in parts:
        found.append(SEHTH(max_iter=max_iter or 5, strength=strength))
    if "jacobian" in parts:
        found.append(Jacobian(strength=0.01, n_proj=1))
    if "confidence-penalty" in parts:
        found.append(ConfidencePenalty(strength=0.1))
    if "sam" in parts:
        found.append(SAM(rho=sam_rho))
    if "asam" in parts:
        found.append(ASAM(rho=asam_rho))
    if "gnp" in parts:
        found.append(
            GradientNorm(
                strength=gnp_strength,
                method="finite_difference",
                epsilon=GNP_EPSILON,
            )
        )
    return found
