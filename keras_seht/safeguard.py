r"""A safeguard that keeps the penalized update finite: `GradientBound`.

``model.compile(..., seht=..., seht_safeguard=GradientBound(1.0))``
bounds the penalties' share of every update relative to the plain loss
gradient. With :math:`g_L = \nabla_w L` the plain loss gradient and
:math:`g = \nabla_w [L + \sum_j \text{strength}_j \phi_j(R_j)]` the
gradient the step computes, the penalties' share is
:math:`g_P = g - g_L`, and the step applies

.. math::

    u = g_L + c\, g_P, \qquad
    c = \min\Bigl(1, \rho \frac{\lVert g_L \rVert}{\lVert g_P \rVert}\Bigr),

with :math:`\rho` = ``max_ratio`` and global L2 norms over all trainable
variables. Where :math:`c = 1` the update is :math:`g` itself, bit for
bit; otherwise :math:`\lVert u - g_L \rVert = \rho \lVert g_L \rVert`.

Why. The curvature penalty's gradient is a third derivative of the loss:
on ReLU and BatchNorm networks trained with momentum at a large
``strength`` it can grow without bound while the loss gradient stays
small, so that a few steps carry the weights to NaN (measured: exact
SEHT-H at strength 0.01 drove a small CNN's t to -2.8e8, then its
weights to NaN). Bounding :math:`\lVert g_P \rVert` by
:math:`\rho \lVert g_L \rVert` keeps each step within a factor
:math:`1 + \rho` of the plain step's length, and keeps the penalty's
direction: the update still descends the penalized objective wherever
the bound does not bind, and follows the penalty's direction, shortened,
where it does.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from keras_seht._checks import check_positive

__all__ = ["GradientBound", "deserialize", "get", "serialize"]


@keras.saving.register_keras_serializable(package="keras_seht")
class GradientBound:
    r"""Bounds the penalties' share of the update by the loss gradient's.

    With :math:`g_L` the plain loss gradient and :math:`g` the gradient
    of the penalized objective that the train step computes, the step
    applies

    .. math::

        u = g_L + c\,(g - g_L), \qquad
        c = \min\Bigl(1, \rho \frac{\lVert g_L \rVert}
            {\lVert g - g_L \rVert}\Bigr),

    :math:`\rho` = ``max_ratio``, global L2 norms over every trainable
    variable (float32). Where the bound does not bind (:math:`c = 1`) the
    update is exactly :math:`g`; where it binds, the penalties' share is
    scaled down to :math:`\rho \lVert g_L \rVert`. Under a loss-scaling
    optimizer both gradients carry the same scale, which cancels in
    :math:`c`. The training logs gain ``seht_bounded``, the share of
    the epoch's steps where :math:`c < 1`, and ``seht_bound_factor``,
    the mean of :math:`c` over those steps whose penalized update was
    used (not skipped for a NaN/Inf).

    It works for every penalty, those that replace the loss gradient
    (``SAM``, the antithetic estimator) included: :math:`g - g_L` is then
    the difference of their update to the plain loss gradient.

    Cost: the step needs :math:`g_L` besides :math:`g`. Where the step
    already has it (the forward-over-reverse Hessian products of SEHT-H
    on torch and of custom-gradient models on JAX, every TensorFlow step,
    SAM's first pass), that is free; otherwise it costs one plain forward
    and backward pass, small next to the third-order derivative of an
    exact SEHT step. Two global norms and a select are added to every
    step.

    When to use it: with large strengths or learning rates, or any run
    whose penalty may dominate the update (its log ``seht_trace``
    growing by orders of magnitude, or NaN weights). A bound that binds
    on most steps (``seht_bounded`` near 1) says the strength is larger
    than the loss gradient supports: ``max_ratio`` then sets the
    penalty's effective weight.

    Args:
        max_ratio: :math:`\rho`, the largest ratio of the penalties'
            update norm to the loss gradient's (a finite float > 0).

    Raises:
        ValueError: `max_ratio` is not a finite number > 0.

    Example:
    >>> import keras_seht
    >>> bound = keras_seht.GradientBound(max_ratio=0.5)
    >>> bound.max_ratio
    0.5
    >>> keras_seht.GradientBound.from_config(bound.get_config()) == bound
    True
    """

    def __init__(self, max_ratio: float = 1.0) -> None:
        self.max_ratio = check_positive("max_ratio", max_ratio)

    def factor(self, loss_norm: Any, penalty_norm: Any) -> tuple[Any, Any]:
        r""":math:`c` and whether the bound binds (:math:`c < 1`).

        Args:
            loss_norm: :math:`\lVert g_L \rVert` (a float32 scalar tensor).
            penalty_norm: :math:`\lVert g - g_L \rVert` (float32 scalar).

        Returns:
            ``(c, bound)``: :math:`c = \min(1, \rho \lVert g_L \rVert /
            \lVert g_P \rVert)` (1 where :math:`g_P = 0`) and the boolean
            :math:`\rho \lVert g_L \rVert < \lVert g_P \rVert`.
        """
        allowed = self.max_ratio * loss_norm
        bound = ops.less(allowed, penalty_norm)
        ratio = allowed / ops.maximum(penalty_norm, 1e-30)
        return ops.where(bound, ratio, ops.ones_like(ratio)), bound

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialization."""
        return {"max_ratio": self.max_ratio}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradientBound:
        """Re-creates the safeguard from `get_config`'s output."""
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and other.get_config() == self.get_config()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.max_ratio))

    def __repr__(self) -> str:
        return f"GradientBound(max_ratio={self.max_ratio!r})"


def serialize(safeguard: GradientBound) -> dict[str, Any]:
    """The Keras config dict of a safeguard.

    Example:
    >>> from keras_seht import safeguard
    >>> safeguard.serialize(safeguard.GradientBound(2.0))["config"]
    {'max_ratio': 2.0}
    """
    return keras.saving.serialize_keras_object(safeguard)


def deserialize(config: dict[str, Any]) -> GradientBound:
    """Re-creates a safeguard from `serialize`'s output.

    Also accepts the flat form ``{"class_name": "GradientBound",
    "max_ratio": 0.5}``.

    Raises:
        ValueError: naming `seht_safeguard`, when `config` does not
            describe a safeguard.

    Example:
    >>> from keras_seht import safeguard
    >>> bound = safeguard.GradientBound(0.5)
    >>> safeguard.deserialize(safeguard.serialize(bound)) == bound
    True
    """
    config = dict(config)
    name = config.get("class_name")
    if name not in ("GradientBound", "gradient_bound"):
        raise ValueError(
            "A `seht_safeguard` config dict must have class_name "
            f"'GradientBound'. Received: seht_safeguard={config!r}"
        )
    arguments = config.get("config")
    if arguments is None:
        arguments = {k: v for k, v in config.items() if k != "class_name"}
    if not isinstance(arguments, dict) or set(arguments) - {"max_ratio"}:
        raise ValueError(
            "A `seht_safeguard` config takes only 'max_ratio'. Received: "
            f"seht_safeguard={config!r}"
        )
    return GradientBound(**arguments)


def get(identifier: Any) -> GradientBound | None:
    """Resolves ``compile(seht_safeguard=...)``.

    Args:
        identifier: None (no safeguard), a `GradientBound`, a positive
            float (its ``max_ratio``), or a config dict (`serialize`).

    Returns:
        The safeguard, or None.

    Raises:
        ValueError: naming `seht_safeguard` (or `max_ratio` for a float
            that is not > 0), for anything else.

    Example:
    >>> from keras_seht import safeguard
    >>> safeguard.get(0.5)
    GradientBound(max_ratio=0.5)
    >>> safeguard.get(None) is None
    True
    """
    if identifier is None or isinstance(identifier, GradientBound):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, numbers.Real) and not isinstance(
        identifier, bool
    ):
        return GradientBound(max_ratio=float(identifier))
    raise ValueError(
        "`seht_safeguard` must be None, a keras_seht.GradientBound, a "
        "positive float (its max_ratio) or a config dict. Received: "
        f"seht_safeguard={identifier!r}"
    )
