r"""Training penalties that ``compile(seht=...)`` adds to the loss.

A penalty is a scalar :math:`R(w)` that the train step adds to the compiled
loss as ``strength * R`` and differentiates exactly, on every backend:

.. math::

    \min_w \; L(w) + \sum_j \text{strength}_j \, R_j(w).

The SEHT curvature estimators (`keras_seht.SEHTH`, `keras_seht.SEHTD`)
are penalties; so are the paper's baselines defined here:

- `Jacobian`: the squared Frobenius norm of the input-output Jacobian
  (Hoffman et al. 2019);
- `ConfidencePenalty`: the negative entropy of the predicted distribution
  (Pereyra et al. 2017);
- `GradientNorm`: the squared norm of the loss gradient.

Each logs its value :math:`R` (before ``strength``) under `log_name`. A
penalty computes its own value, with backend-neutral ``keras.ops``, from
the quantities of the train step's `keras_seht.context.StepContext`
(``__call__``), after recording in the step's plan what it needs
(``plan``); the backends (``keras_seht/backend/``) do the autodiff, for
every penalty alike. Penalties are serializable Keras objects
(``get_config`` / ``from_config``).

References:
    Judy Hoffman, Daniel A. Roberts, Sho Yaida. "Robust Learning with
    Jacobian Regularization." arXiv:1908.02729, 2019.

    Gabriel Pereyra, George Tucker, Jan Chorowski, Lukasz Kaiser, Geoffrey
    Hinton. "Regularizing Neural Networks by Penalizing Confident Output
    Distributions." ICLR 2017 workshop, arXiv:1701.06548.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import keras
import numpy as np
from keras import ops

from keras_seht._checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_strength,
)

if TYPE_CHECKING:
    from keras_seht.context import DrawSpec, StepContext, StepPlan


class Penalty:
    """Base class of everything ``compile(seht=...)`` accepts.

    Writing your own: subclass, validate the arguments in ``__init__``
    (``keras_seht._checks``), implement ``__call__(context)`` returning
    :math:`s R` from the quantities of the step context
    (`keras_seht.context.StepContext`: the outputs, the scaled loss and
    its differentiable gradient, the curvature quadratic form, input
    products; every one of the loss scaled by :math:`s`, so multiply
    what you compute from the outputs by ``context.scale``), record in
    ``plan`` what of those you read and draw your random numbers there,
    return every constructor argument from ``get_config``, and register
    the class with ``keras.saving.register_keras_serializable``. Nothing
    in ``keras_seht/backend/`` changes.

    Args:
        strength: Multiplier of the penalty in the loss (>= 0).

    Example:
    >>> from keras_seht import SEHTD
    >>> [isinstance(p, Penalty) for p in (SEHTD(), GradientNorm())]
    [True, True]
    >>> GradientNorm(strength=0.1).get_config()["strength"]
    0.1
    """

    #: The key under which the train step logs the penalty's value R.
    log_name = "penalty"
    #: Whether R is a function of the loss gradient dL/dw (then the train
    #: step keeps that gradient differentiable: a double backward).
    needs_loss_gradient = False
    #: Whether R is a function of d(output)/d(input).
    needs_input_gradient = False
    #: Whether the penalty's objective replaces the loss's own gradient at
    #: the weights (SAM's update is grad L(w + e) alone; the antithetic
    #: estimator's is the mean of the perturbed gradients): the step then
    #: holds the loss at w as a constant. At most one penalty a step.
    replaces_loss_gradient = False

    def __init__(self, strength: float = 1e-3) -> None:
        self.strength = check_strength(strength)

    @property
    def needs_double_backward(self) -> bool:
        """Whether R's weight gradient needs second-order autodiff."""
        return self.needs_loss_gradient or self.needs_input_gradient

    def plan(self, plan: StepPlan, spec: DrawSpec) -> None:
        """Records in `plan` what the step computes for this penalty.

        Called once per step before the forward pass, where the random
        numbers a penalty needs are drawn (from ``spec.seed``). The default
        asks for the differentiable forward pass (and, with
        `needs_loss_gradient`, the loss gradient).
        """
        if self.replaces_loss_gradient:
            plan.constant_loss = True
        else:
            plan.forward_graph = True
        plan.loss_gradient = plan.loss_gradient or self.needs_loss_gradient

    def __call__(self, context: StepContext) -> Any:
        """The value s R of this step, differentiable in the weights."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `__call__(context)`."
        )

    def objective_value(self, value: Any) -> Any:
        """What enters the loss for a computed value R (R itself here)."""
        return value

    def loss_term(self, value: Any) -> Any:
        """The penalty's share of the logged ``loss`` for a value R.

        ``strength * objective_value(R)``, as Keras logs weight
        regularization; a penalty that only steers the update (SAM)
        returns 0.
        """
        return self.strength * self.objective_value(value)

    def get_config(self) -> dict[str, Any]:
        """The penalty's constructor arguments, for Keras serialization."""
        return {"strength": self.strength}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Penalty":
        """The penalty that a `get_config` result describes."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.__class__.__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.get_config() == other.get_config()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


def flatten_outputs(y_pred: Any) -> Any:
    """The model's outputs as one ``(batch, features)`` matrix.

    The feature count is static whenever the output shapes are (only the
    batch may be dynamic, as in a retraced TensorFlow step).
    """
    parts = []
    for t in keras.tree.flatten(y_pred):
        features = tuple(t.shape[1:])
        size = -1 if None in features else math.prod(features)
        parts.append(ops.reshape(t, (ops.shape(t)[0], size)))
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)


def float_inputs(x: Any) -> list[int]:
    """Positions, in ``keras.tree.flatten(x)``, of the floating inputs."""
    positions = [
        i
        for i, t in enumerate(keras.tree.flatten(x))
        if t is not None and "float" in keras.backend.standardize_dtype(t.dtype)
    ]
    if not positions:
        raise ValueError(
            "The `Jacobian` penalty differentiates the model's output with "
            "respect to its input, but the model has no floating-point input "
            "(integer inputs such as token ids have no derivative). Apply "
            "it to models with float inputs, or drop it from `seht`."
        )
    return positions


@keras.saving.register_keras_serializable(package="keras_seht")
class Jacobian(Penalty):
    r"""Jacobian regularization (Hoffman et al. 2019).

    For a batch of :math:`B` inputs :math:`X` and the model's outputs
    :math:`Z \in \mathbb{R}^{B \times C}` (every output, flattened per
    sample; the logits if the model outputs logits),

    .. math::

        R = \frac{1}{B} \Big\lVert \frac{\partial Z}{\partial X}
            \Big\rVert_F^2,

    the mean over the batch of :math:`\lVert J(x_i) \rVert_F^2`, where
    :math:`J(x_i)` is the Jacobian of sample :math:`i`'s output with
    respect to its input (exactly so when samples do not interact, i.e.
    without training-mode BatchNorm; otherwise the cross-sample derivatives
    count too). Estimated as in the paper with ``n_proj`` random
    projections: each row :math:`v_{k,i}` of :math:`V_k \in
    \mathbb{R}^{B\times C}` is uniform on the unit sphere, so
    :math:`E[C\, \mathrm{vec}(V_k)\mathrm{vec}(V_k)^\top] = I` and

    .. math::

        \hat R = \frac{C}{n_\text{proj} B} \sum_{k=1}^{n_\text{proj}}
            \Big\lVert \frac{\partial\, \langle V_k, Z\rangle}{\partial X}
            \Big\rVert^2, \qquad E[\hat R] = R.

    Each projection costs one vector-Jacobian product (a backward pass
    w.r.t. the input), itself differentiated for the weight gradient.
    ``exact=True`` uses the :math:`BC` one-hot projections instead and
    returns :math:`R` exactly (:math:`BC` backward passes: for tests and
    small models). The penalty is the sum over all floating-point inputs;
    ``sample_weight`` is not applied to it.

    Hoffman et al. write the penalty as :math:`\frac{\lambda_{JR}}{2}
    \lVert J\rVert_F^2`; here it is ``strength`` times the norm. The SEHT
    paper's baseline uses ``n_proj=1`` and 0.01.

    Args:
        strength: Multiplier of R in the loss.
        n_proj: Random projections per step (>= 1).
        exact: Compute R exactly (ignores ``n_proj``).

    Example:
    >>> Jacobian(strength=0.01, n_proj=1)
    Jacobian(strength=0.01, n_proj=1, exact=False)
    """

    log_name = "jacobian_norm"
    needs_input_gradient = True

    def __init__(
        self, strength: float = 0.01, n_proj: int = 1, exact: bool = False
    ) -> None:
        super().__init__(strength)
        self.n_proj = check_int("n_proj", n_proj)
        self.exact = check_bool("exact", exact)

    def projections(
        self, shape: Sequence[Any], dtype: Any = "float32", seed: Any = None
    ) -> tuple[list[Any], float]:
        r"""The projections :math:`V_k` for outputs `z` and their weight.

        Args:
            shape: ``(B, C)``, the shape of the output matrix
                (`flatten_outputs`); B may be a tensor (a dynamic batch).
            dtype: The output dtype.
            seed: A `keras.random.SeedGenerator` (advanced) or an int.

        Returns:
            ``(projections, weight)``: a list of ``(B, C)`` tensors and the
            factor with :math:`\hat R = \text{weight} \cdot \frac{1}{B}
            \sum_k \lVert \partial\langle V_k, Z\rangle/\partial X
            \rVert^2`.
        """
        batch, features = shape
        if not isinstance(features, (int, np.integer)):
            raise ValueError(
                "The `Jacobian` penalty needs model outputs of a static size "
                f"per sample; got a dynamic one ({features})."
            )
        if self.exact:
            if not isinstance(batch, (int, np.integer)):
                raise ValueError(
                    "`Jacobian(exact=True)` needs a static batch size; this "
                    "step was traced with an unknown one. Use the random "
                    "projections (exact=False) or a fixed batch size."
                )
            size = batch * features
            eye = np.eye(size, dtype="float32").reshape(size, batch, features)
            return [ops.cast(e, dtype) for e in eye], 1.0
        out = []
        for _ in range(self.n_proj):
            g = keras.random.normal(tuple(shape), dtype="float32", seed=seed)
            v = g / ops.sqrt(ops.sum(ops.square(g), axis=1, keepdims=True))
            out.append(ops.cast(v, dtype))
        return out, float(features) / self.n_proj

    def plan(self, plan: StepPlan, spec: DrawSpec) -> None:
        """Adds the step's random output projections to `plan`."""
        super().plan(plan, spec)
        shape = spec.output_shape()
        plan.input_cotangents = self.projections(shape, spec.dtype, spec.seed)[
            0
        ]

    def __call__(self, context: StepContext) -> Any:
        """The value s R, from the input products of the planned projections."""
        z = flatten_outputs(context.outputs)
        features = z.shape[1]
        weight = 1.0 if self.exact else float(features) / self.n_proj
        norm = self.norm_from_products(
            context.input_products(), weight, ops.shape(z)[0]
        )
        return ops.cast(norm, "float32") * ops.cast(context.scale, "float32")

    @staticmethod
    def norm_from_products(
        products: Sequence[Sequence[Any]], weight: float, batch_size: Any
    ) -> Any:
        r"""``weight / B * sum_k ||d<V_k, Z>/dX||^2`` from the products.

        Args:
            products: For each projection, the input gradients of
                :math:`\langle V_k, Z\rangle` (one per float input).
            weight: From `projections`.
            batch_size: B.
        """
        total = 0.0
        for grads in products:
            for g in grads:
                total = total + ops.sum(ops.square(ops.cast(g, "float32")))
        return total * (weight / ops.cast(batch_size, "float32"))

    def get_config(self) -> dict[str, Any]:
        """The penalty's constructor arguments, for Keras serialization."""
        return {
            "strength": self.strength,
            "n_proj": self.n_proj,
            "exact": self.exact,
        }


def _loss_from_logits(model: keras.Model) -> bool | None:
    """``from_logits`` of the compiled loss, or None if it cannot be told."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        return False  # Keras' string losses take probabilities
    config = getattr(loss, "get_config", None)
    if config is not None:
        value = config().get("from_logits")
        if isinstance(value, bool):
            return value
    return None


@keras.saving.register_keras_serializable(package="keras_seht")
class ConfidencePenalty(Penalty):
    r"""Confidence penalty (Pereyra et al. 2017).

    Penalizes confident (low-entropy) predictions by adding

    .. math::

        R = -\frac{1}{N} \sum_{n} s_n H(p_n), \qquad
        H(p) = -\sum_c p_c \log p_c,

    to the loss, i.e. ``loss - strength * mean entropy``, where :math:`p_n`
    is the predicted distribution over the last axis of the model's output
    (so :math:`N` counts every position of a sequence model), :math:`s_n`
    the sample weight (1 without one). The logged ``negative_entropy`` is
    R. Costs one softmax; first-order, no double backward.

    Args:
        strength: :math:`\beta` in the paper (which tunes it in
            [0.1, 10] for classification).
        from_logits: Whether the model outputs logits. None (default): read
            it from the compiled loss (``from_logits`` of a Keras loss
            object; a string loss means probabilities), and raise a
            ValueError when that is impossible.

    Example:
    >>> ConfidencePenalty(strength=0.1, from_logits=True)
    ConfidencePenalty(strength=0.1, from_logits=True)
    """

    log_name = "negative_entropy"

    def __init__(
        self, strength: float = 0.1, from_logits: bool | None = None
    ) -> None:
        super().__init__(strength)
        self.from_logits = check_bool(
            "from_logits", from_logits, allow_none=True
        )

    def resolve_from_logits(self, model: keras.Model) -> bool:
        """`from_logits`, read from the compiled loss when it is None."""
        if self.from_logits is not None:
            return self.from_logits
        value = _loss_from_logits(model)
        if value is None:
            raise ValueError(
                "ConfidencePenalty could not tell whether the model outputs "
                f"logits from its loss {getattr(model, 'loss', None)!r}. Pass "
                "ConfidencePenalty(from_logits=True) or (from_logits=False)."
            )
        return value

    def __call__(self, context: StepContext) -> Any:
        """The value s R, from the step's outputs."""
        value = self.value(
            context.model, context.outputs, context.sample_weight
        )
        return value * ops.cast(context.scale, "float32")

    def value(
        self, model: keras.Model, y_pred: Any, sample_weight: Any = None
    ) -> Any:
        """R for the model's output `y_pred` (a single tensor)."""
        if not hasattr(y_pred, "shape"):
            raise ValueError(
                "ConfidencePenalty needs a model with a single output; got "
                f"{type(y_pred).__name__} outputs."
            )
        if self.resolve_from_logits(model):
            log_p = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        else:
            eps = keras.config.epsilon()
            probs = ops.cast(y_pred, "float32")
            probs = probs / ops.sum(probs, axis=-1, keepdims=True)
            log_p = ops.log(ops.clip(probs, eps, 1.0))
        negative_entropy = ops.sum(ops.exp(log_p) * log_p, axis=-1)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float32")
            while len(weight.shape) < len(negative_entropy.shape):
                weight = ops.expand_dims(weight, -1)
            negative_entropy = negative_entropy * weight
        return ops.mean(negative_entropy)

    def get_config(self) -> dict[str, Any]:
        """The penalty's constructor arguments, for Keras serialization."""
        return {"strength": self.strength, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="keras_seht")
class GradientNorm(Penalty):
    r"""Gradient-norm penalty: the first-order cousin of SEHT.

    .. math::

        R = \lVert \nabla_w L(w) \rVert^2,

    the squared norm of the compiled loss's gradient with respect to all
    trainable weights (the penalty of Drucker & LeCun's double
    backpropagation, on the weights). Its gradient is :math:`2 H g`,
    :math:`g = \nabla L`, a Hessian-vector product.

    ``method="exact"`` (the default) differentiates R exactly: one double
    backward, like SEHT-H with one probe but deterministic, from the same
    differentiable gradient as the loss's own (combined with SEHT it costs
    one more HVP). ``method="finite_difference"`` is the gradient-norm
    penalty of Zhao, Zhang and Hu (GNP, 2022), opt-in: :math:`Hg` by a
    forward difference of two first-order gradients along :math:`\hat g =
    g / \lVert g\rVert` with step :math:`r` (``epsilon``),

    .. math::

        \nabla R \approx \frac{2\lVert g\rVert}{r}
            \big(\nabla L(w + r\hat g) - \nabla L(w)\big),

    so the update is :math:`(1 - \alpha)\nabla L(w) + \alpha\nabla L(w +
    r\hat g)` with :math:`\alpha = 2\,\text{strength}\,\lVert g\rVert / r`.
    Its error is :math:`O(r)` (the third derivative), and it needs no
    double backward (cuDNN RNNs, DDP hooks). Both methods penalize the
    *squared* norm, so ``strength`` means the same for both; GNP's
    :math:`\lambda \lVert g\rVert` with a fixed :math:`\alpha =
    \lambda / r` is this with ``strength`` :math:`= \lambda / (2\lVert g
    \rVert)`. With :math:`\alpha = 1` and :math:`r = \rho` the update is
    SAM's, :math:`\nabla L(w + \rho\hat g)` (`keras_seht.SAM`).

    Args:
        strength: Multiplier of R in the loss.
        method: ``"exact"`` or ``"finite_difference"``.
        epsilon: The step :math:`r` of ``"finite_difference"`` (default
            0.01; > 0); None for ``"exact"``.

    References:
        Yang Zhao, Hao Zhang, Xiuyuan Hu. "Penalizing Gradient Norm for
        Efficiently Improving Generalization in Deep Learning." ICML 2022,
        arXiv:2202.03599.

    Example:
    >>> GradientNorm(strength=0.01)
    GradientNorm(strength=0.01, method='exact', epsilon=None)
    >>> GradientNorm(method="finite_difference").epsilon
    0.01
    """

    log_name = "gradient_norm_sq"

    def __init__(
        self,
        strength: float = 0.01,
        method: str = "exact",
        epsilon: float | None = None,
    ) -> None:
        super().__init__(strength)
        self.method = check_choice(
            "method", method, ("exact", "finite_difference")
        )
        if method == "exact" and epsilon is not None:
            raise ValueError(
                "`epsilon` applies to method='finite_difference' only. "
                f"Received: epsilon={epsilon!r}, method='exact'"
            )
        if method == "finite_difference":
            epsilon = (
                0.01 if epsilon is None else check_positive("epsilon", epsilon)
            )
        self.epsilon = epsilon

    @property
    def needs_loss_gradient(self) -> bool:  # type: ignore[override]
        """Exact: R's gradient is a double backward of the loss gradient."""
        return self.method == "exact"

    def plan(self, plan: StepPlan, spec: DrawSpec) -> None:
        """The differentiable gradient, or the two first-order ones."""
        super().plan(plan, spec)
        if self.method == "finite_difference":
            plan.first_order_gradient = True
            plan.shifted_losses = True

    def __call__(self, context: StepContext) -> Any:
        r""":math:`s\lVert\nabla L\rVert^2 = \lVert\nabla (sL)\rVert^2 / s`."""
        scale = ops.cast(context.scale, "float32")
        exact = self.method == "exact"
        grads = context.loss_gradient(differentiable=exact)
        grads = [ops.cast(g, "float32") for g in grads]
        total = sum(ops.sum(ops.square(g)) for g in grads)
        if exact:
            return total / scale
        norm = ops.sqrt(total)
        safe = ops.maximum(norm, 1e-38)
        r = float(self.epsilon or 0.0)
        shift = [
            ops.cast(ops.where(norm > 0, r * g / safe, 0.0), w.dtype)
            for g, w in zip(grads, context.weights)
        ]
        difference = ops.cast(context.loss_at(shift), "float32") - ops.cast(
            context.scaled_loss, "float32"
        )
        slope = 2.0 * norm / (scale * r)
        carrier = slope * difference
        return total / scale + (carrier - ops.stop_gradient(carrier))

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialization."""
        return {
            "strength": self.strength,
            "method": self.method,
            "epsilon": self.epsilon,
        }
