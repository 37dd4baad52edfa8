r"""Where ``curvature="gauss_newton"`` splits the loss: at the logits.

The generalized Gauss-Newton matrix :math:`G = J^\top H J` depends on
where the network is split into a "model" (differentiated once, through
:math:`J`) and a "loss" (differentiated twice, :math:`H`). Splitting at
the model's outputs :math:`p` is PSD for a loss convex in :math:`p`, but
for the usual Keras classifier, a final softmax (or sigmoid) followed by a
cross-entropy of probabilities (``from_logits=False``), it is not the
canonical Gauss-Newton matrix, which splits at the logits :math:`z`
(Schraudolph 2002; Martens 2020, where it equals the Fisher):

.. math::

    G = \sum_n W_n \, J_{z,n}^\top \Lambda_n J_{z,n}, \qquad
    \Lambda_n = c_n \bigl(\operatorname{diag}(p_n) - p_n p_n^\top\bigr)
    \ \text{(softmax)}, \qquad
    \Lambda_n = \tfrac{1}{C}\operatorname{diag}\bigl(p_n (1 - p_n)\bigr)
    \ \text{(sigmoid)},

with :math:`W_n` the weight the compiled loss gives sample :math:`n`
(reduction, ``sample_weight``, the output's loss weight), :math:`c_n =
\sum_i y_{n,i}` (after label smoothing; 1 for sparse labels) and :math:`C`
the number of sigmoid units that binary cross-entropy averages over.

The logits are never needed. With :math:`S = \operatorname{diag}(p) -
pp^\top` the softmax Jacobian, a probability tangent is :math:`u_p = S
u_z`, and since :math:`\mathbf{1}^\top S = 0`,

.. math::

    u_z^\top S u_z = \sum_i \frac{u_{p,i}^2}{p_i}
    \quad\Bigl(S\,\tfrac{u_p}{p} = u_p - p\,\mathbf{1}^\top u_p = u_p\Bigr);
    \qquad
    \text{sigmoid: } p(1-p)\,u_z^2 = \frac{u_p^2}{p(1-p)}.

So :math:`G` is exactly :math:`J_p^\top H_\psi J_p`, with :math:`J_p` the
Jacobian of the outputs the model returns and :math:`H_\psi` the Hessian,
at :math:`q = \bar p`, of the per-sample surrogates

.. math::

    \psi_n(q) = \frac{c_n}{2} \sum_i \frac{(q_i - \bar p_i)^2}{\bar p_i}
    \ \text{(softmax)}, \qquad
    \psi_n(q) = \frac{1}{C} \sum_i
    \frac{(q_i - \bar p_i)^2}{2\,\bar p_i (1 - \bar p_i)}
    \ \text{(sigmoid)},

reduced exactly as the compiled loss reduces its per-sample losses, where
:math:`\bar p` is the output itself held constant in :math:`q` (entries
with :math:`\bar p_i = 0`, or :math:`\bar p_i \in \{0, 1\}` for a sigmoid,
contribute 0: their :math:`u_{p,i}` vanishes). `gauss_newton_loss` returns
the sum of these surrogates and of the compiled loss of every other
output; the backends differentiate it twice in ``y_pred`` where they used
to differentiate the compiled loss.

An output qualifies (`output_kinds`) when the layer that produces it ends
in ``keras.activations.softmax`` (last axis) or ``sigmoid`` (the
``activation`` of ``Dense``, ``EinsumDense``, the convolutions, or
``Activation``; or ``keras.layers.Softmax(axis=-1)`` without a mask) and
its compiled loss is ``CategoricalCrossentropy`` or
``SparseCategoricalCrossentropy`` (softmax), or ``BinaryCrossentropy``
(sigmoid), as a class, string or function, with ``from_logits=False``,
``axis=-1`` and no ``ignore_class``, and the output carries no Keras mask.
Every other output (other losses, ``from_logits=True``, subclassed models
whose last operation cannot be seen) keeps the compiled loss's own
output Hessian. Where the probability cross-entropy's clipping to
:math:`[\epsilon, 1 - \epsilon]` is active the two splits differ; the
logit split ignores the clip.

This module reads Keras internals of the compiled loss (``CompileLoss``'s
flat losses, its build structures and its target alignment) and the
wrapped function of a ``LossFunctionWrapper``; it never calls the
compiled loss for the surrogates, which would update the per-output loss
trackers of a multi-output model.

References:
    Nicol N. Schraudolph. "Fast Curvature Matrix-Vector Products for
    Second-Order Gradient Descent." Neural Computation 14(7), 2002.

    James Martens. "New Insights and Perspectives on the Natural Gradient
    Method." JMLR 21(146), 2020.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import keras
from keras import ops

from keras_seht import _keras_compat as compat

#: What an output's final activation and loss pair up to.
SOFTMAX, SIGMOID = "softmax", "sigmoid"

_ACTIVATIONS = {
    keras.activations.softmax: SOFTMAX,
    keras.activations.sigmoid: SIGMOID,
}

#: Layers whose output is ``activation(...)``, the activation applied last.
_ACTIVATION_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "SeparableConv1D",
        "SeparableConv2D",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "Activation",
    )
)

#: The probability cross-entropies, their final activation and defaults.
_CROSS_ENTROPIES = {
    keras.losses.categorical_crossentropy: ("categorical", SOFTMAX),
    keras.losses.sparse_categorical_crossentropy: ("sparse", SOFTMAX),
    keras.losses.binary_crossentropy: ("binary", SIGMOID),
}
_WRAPPER_CALL = keras.losses.CategoricalCrossentropy.call


def _producer(tensor: Any) -> tuple[Any, Any] | None:
    """(layer, symbolic output) that produces `tensor`, through submodels."""
    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        layer = history.operation
        if not isinstance(layer, keras.Model):
            return layer, tensor
        try:
            outputs = list(layer.outputs)
        except (AttributeError, ValueError):  # subclassed: no graph
            return None
        if history.tensor_index >= len(outputs):
            return None
        tensor = outputs[history.tensor_index]
        history = getattr(tensor, "_keras_history", None)
    return None


def final_activation(tensor: Any) -> str | None:
    """``"softmax"``, ``"sigmoid"`` or None: the last op of a symbolic output.

    Args:
        tensor: A symbolic output of a functional model (``model.outputs``).

    Returns:
        The activation, if the producing layer applies softmax (last axis)
        or sigmoid last, and the output carries no Keras mask.
    """
    found = _producer(tensor)
    if found is None:
        return None
    layer, tensor = found
    if compat.get_keras_mask(tensor) is not None:
        return None
    for cls in _ACTIVATION_LAYERS:
        if isinstance(layer, cls) and type(layer).call is cls.call:
            return _ACTIVATIONS.get(getattr(layer, "activation", None))
    softmax = keras.layers.Softmax
    if isinstance(layer, softmax) and type(layer).call is softmax.call:
        axis = layer.axis
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        rank = len(tensor.shape)
        node = layer._inbound_nodes[tensor._keras_history.node_index]
        masked = node.arguments.kwargs.get("mask") is not None
        if not masked and len(axes) == 1 and axes[0] in (-1, rank - 1):
            return SOFTMAX
    return None


def loss_kind(loss: Any) -> tuple[str, str, float] | None:
    """(kind, activation, label smoothing) of a probability cross-entropy.

    Args:
        loss: A resolved ``keras.losses.Loss`` of the compiled loss.

    Returns:
        ``("categorical" | "sparse" | "binary", activation, smoothing)``
        when `loss` is a cross-entropy of probabilities over the last
        axis (no ``ignore_class``), else None.
    """
    fn = getattr(loss, "fn", None)
    if fn not in _CROSS_ENTROPIES or type(loss).call is not _WRAPPER_CALL:
        return None
    kwargs = dict(getattr(loss, "_fn_kwargs", {}))
    if kwargs.get("from_logits", False) or kwargs.get("axis", -1) != -1:
        return None
    if kwargs.get("ignore_class") is not None:
        return None
    kind, activation = _CROSS_ENTROPIES[fn]
    return kind, activation, float(kwargs.get("label_smoothing", 0.0) or 0.0)


class LogitSplitLoss(keras.losses.Loss):
    r"""The per-sample surrogate :math:`\psi_n` of the logit split.

    Called as ``loss(y_true, (q, p_bar), sample_weight)``: the base class
    reduces :math:`\psi_n(q)` with the replaced loss's ``reduction`` and
    ``sample_weight``, exactly as it reduces the cross-entropy. ``p_bar``
    is the reference output, a constant of :math:`q` (it may depend on the
    weights).

    Args:
        kind: ``"categorical"``, ``"sparse"`` or ``"binary"``.
        label_smoothing: The replaced loss's label smoothing (categorical).
        reduction: The replaced loss's reduction.
        dtype: The replaced loss's dtype.
    """

    def __init__(
        self,
        kind: str,
        label_smoothing: float = 0.0,
        reduction: Any = "sum_over_batch_size",
        dtype: Any = None,
    ) -> None:
        super().__init__(
            name=f"{kind}_logit_split", reduction=reduction, dtype=dtype
        )
        self.kind = kind
        self.label_smoothing = label_smoothing

    def call(self, y_true: Any, y_pred: Any) -> Any:
        r"""Per-sample :math:`\psi_n(q)`, shaped like the cross-entropy's."""
        q, p_bar = y_pred
        if self.kind == "binary":
            scale = p_bar * (1.0 - p_bar)
        else:
            scale = p_bar
        valid = scale > 0
        safe = ops.where(valid, scale, ops.ones_like(scale))
        terms = ops.where(
            valid, 0.5 * ops.square(q - p_bar) / safe, ops.zeros_like(q)
        )
        if self.kind == "binary":
            return ops.mean(terms, axis=-1)
        per_sample = ops.sum(terms, axis=-1)
        if self.kind == "categorical":
            smoothing = self.label_smoothing
            mass = ops.sum(ops.cast(y_true, q.dtype), axis=-1)
            per_sample = per_sample * (mass * (1.0 - smoothing) + smoothing)
        return per_sample


@dataclasses.dataclass
class _Term:
    """One loss of the compiled loss: where it reads, what replaces it."""

    path: tuple[Any, ...]
    loss: Any
    weight: Any
    index: int | None  # the flat output it reads (None: several)
    surrogate: LogitSplitLoss | None


_PLANS: Any = weakref.WeakKeyDictionary()


def _resolve(path: tuple[Any, ...], obj: Any) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def output_kinds(model: keras.Model) -> list[str | None]:
    """The final activation of each flat output (None where unseen).

    Args:
        model: A Keras model.

    Returns:
        One entry per ``keras.tree.flatten`` leaf of the model's outputs:
        ``"softmax"``, ``"sigmoid"`` or None; an empty list for a model
        without a functional graph (subclassed).
    """
    try:
        outputs = list(model.outputs)
    except (AttributeError, ValueError):
        return []
    return [final_activation(t) for t in outputs]


def _plan(model: keras.Model) -> list[_Term] | None:
    """The compiled loss's terms, or None if no output qualifies. Cached."""
    compile_loss = model._compile_loss
    try:
        cached = _PLANS.get(model)
    except TypeError:  # not weakly referenceable
        cached = None
    if cached is not None and cached[0]() is compile_loss:
        return cached[1]
    structure = compile_loss._y_pred_build_structure
    count = len(keras.tree.flatten(structure))
    indices = keras.tree.pack_sequence_as(structure, list(range(count)))
    kinds = output_kinds(model)
    terms, qualifies = [], False
    for path, loss, weight, _ in compile_loss._flat_losses:
        index = _resolve(path, indices)
        index = index if isinstance(index, int) else None
        surrogate = None
        found = loss_kind(loss)
        if (
            found is not None
            and index is not None
            and len(kinds) == count
            and kinds[index] == found[1]
        ):
            surrogate = LogitSplitLoss(
                found[0], found[2], loss.reduction, loss.dtype
            )
            qualifies = True
        terms.append(_Term(tuple(path), loss, weight, index, surrogate))
    plan = terms if qualifies else None
    try:
        _PLANS[model] = (weakref.ref(compile_loss), plan)
    except TypeError:
        pass
    return plan


def _aligned_targets(compile_loss: Any, y_true: Any, y_pred: Any) -> Any:
    """`y_true` in the structure ``CompileLoss.call`` resolves paths in.

    The same normalization as Keras' ``CompileLoss.call`` (Keras 3.15),
    without its loss computation.
    """
    tree = keras.tree
    if not tree.is_nested(y_true) and not tree.is_nested(y_pred):
        return y_true
    try:
        tree.assert_same_structure(y_pred, y_true)
    except ValueError:
        if (
            not tree.is_nested(y_true)
            and hasattr(y_pred, "__len__")
            and len(y_pred) == 1
        ):
            y_true = [y_true]
        elif isinstance(y_pred, (list, tuple)) and isinstance(y_true, dict):
            if set(compile_loss.output_names) == set(y_true.keys()):
                y_true = [y_true[name] for name in compile_loss.output_names]
        try:
            y_true = tree.pack_sequence_as(y_pred, y_true)
        except Exception:
            try:
                tree.assert_same_paths(y_true, y_pred)
                y_true = tree.pack_sequence_as(y_pred, tree.flatten(y_true))
            except Exception:
                # The loss is defined on some outputs only.
                flat_true = tree.flatten(y_true)
                flat_loss = tree.flatten(compile_loss._user_loss)
                given = [i for i, f in enumerate(flat_loss) if f is not None]
                if len(flat_true) != len(given):
                    raise ValueError(
                        "y_true and y_pred have different structures."
                    )
                full: list[Any] = [None] * len(flat_loss)
                for value, i in zip(flat_true, given):
                    full[i] = value
                y_true = tree.pack_sequence_as(compile_loss._user_loss, full)
    try:
        tree.assert_same_structure(compile_loss._y_true_build_structure, y_true)
    except ValueError:
        y_true = tree.pack_sequence_as(
            compile_loss._y_true_build_structure, tree.flatten(y_true)
        )
    return y_true


def gauss_newton_loss(
    model: keras.Model,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    reference: Any,
) -> Any:
    r"""The loss whose Hessian in `y_pred` is the Gauss-Newton output Hessian.

    For every output that qualifies (see the module docstring) the
    compiled cross-entropy is replaced by its logit-split surrogate
    :math:`\psi` around `reference`; every other output keeps its
    compiled loss. Reduction, ``sample_weight`` and loss weights are those
    of the compiled loss. Without a qualifying output this is the compiled
    loss itself (``compile(loss=...)``, without ``model.losses``).

    Args:
        model: A compiled model.
        y: The targets.
        y_pred: The outputs to differentiate in (the model's structure).
        sample_weight: The sample weights, or None.
        reference: The outputs :math:`\bar p` (same structure and values
            as `y_pred`), held constant in `y_pred`; to differentiate the
            Hessian in the weights, pass the graph-connected outputs.

    Returns:
        A scalar whose Hessian in `y_pred` at `y_pred = reference` is
        :math:`H_\psi` for the split outputs and the compiled loss's
        output Hessian for the others.
    """
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None or not compile_loss.built:
        # Raises without a compiled loss; builds it otherwise.
        value = compat.compiled_loss(model, y, reference, sample_weight)
        if compile_loss is None or not compile_loss.built:
            return value
    plan = _plan(model)
    if plan is None:
        return compat.compiled_loss(model, y, y_pred, sample_weight)
    structure = compile_loss._y_pred_build_structure
    flat_pred = keras.tree.flatten(y_pred)
    flat_reference = keras.tree.flatten(reference)
    packed = keras.tree.pack_sequence_as(structure, flat_pred)
    targets = _aligned_targets(compile_loss, y, y_pred)
    total = None
    for term in plan:
        y_t = _resolve(term.path, targets)
        weights = sample_weight
        if sample_weight is not None and keras.tree.is_nested(sample_weight):
            weights = _resolve(term.path, sample_weight)
        if term.surrogate is not None and term.index is not None:
            pair = (flat_pred[term.index], flat_reference[term.index])
            value = term.surrogate(y_t, pair, weights)
        else:
            value = term.loss(y_t, _resolve(term.path, packed), weights)
        value = ops.cast(value, compile_loss.dtype)
        if term.weight is not None:
            value = value * term.weight
        total = value if total is None else total + value
    return total
