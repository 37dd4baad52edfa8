r"""Step variants for sparse probes: which layers a compiled step carries.

SEHT-D draws each layer with probability :math:`\pi_l < 1`, so most steps'
probes :math:`\sigma` are zero on most layers, and :math:`\sigma^\top H
\sigma` is the same function whether or not the zero layers carry
forward-mode tangents. An eager step (torch) leaves them out every step;
a compiled step has one static program, so a backend that compiles keeps
a few programs, *variants*, and picks one per step from the step's probe
support (which variables a probe touches): JAX on the host
(`keras_seht.backend.jax.SparseTrainStep`), TensorFlow in the graph
(``tf.switch_case``).

A variant is named by its *tangent set*, a superset of the probed
variables (so it computes the step exactly):

* ``"layers b+"``: every variable of the layers from ``b`` on, where
  ``b`` is the start of the bucket holding the lowest probed hidden layer
  (the hidden layers, all but the output layer, in model order, cut into
  at most `MAX_HIDDEN_VARIANTS` runs of about equal length);
* ``"output layer"``: the output layer's variables, when no hidden layer
  is probed (most SEHT-D steps at small p);
* ``"no probe"``: none (t = 0), when even the output layer may be left
  out (``include_output_layer=False``).

A drawn layer's forward-mode pass (and the reverse pass through it) then
starts at its bucket instead of at the input; the bucket's width is what
the bound on the number of compiled programs costs.
"""

from __future__ import annotations

from typing import Any, Sequence

from keras_seht.estimators import CurvatureEstimator
from keras_seht.layout import WeightLayout

#: The most hidden-layer buckets (compiled variants besides the
#: output-layer-only and probe-free ones).
MAX_HIDDEN_VARIANTS = 4
#: Models with fewer weight-bearing layers keep one compiled step: their
#: variants would cost more compile time than they save.
MIN_VARIANT_LAYERS = 8


def layer_probabilities(
    penalties: Sequence[Any], layout: WeightLayout
) -> list[float] | None:
    r"""The probability that the step's probes touch each layer.

    From the one exact curvature estimator among `penalties` (its
    ``layer_probabilities``, SEHT-D's :math:`\pi_l`); None where there is
    none, or where it draws every layer (SEHT-H) or approximates (its
    smoothed methods evaluate the loss at :math:`w \pm \epsilon\sigma`,
    whatever the support).
    """
    estimators = [p for p in penalties if isinstance(p, CurvatureEstimator)]
    if len(estimators) != 1 or estimators[0].method != "exact":
        return None
    probabilities = getattr(estimators[0], "layer_probabilities", None)
    if probabilities is None:
        return None
    return [float(pi) for pi in probabilities(layout)]


def sparse_layers(penalties: Sequence[Any], layout: WeightLayout) -> bool:
    """Whether a compiled step should run in variants (see the module).

    True where the exact curvature estimator leaves some layer out with
    positive probability and the model has at least `MIN_VARIANT_LAYERS`
    weight-bearing layers.
    """
    if layout.num_layers < MIN_VARIANT_LAYERS:
        return False
    probabilities = layer_probabilities(penalties, layout)
    return probabilities is not None and min(probabilities) < 1.0


def buckets(layout: WeightLayout) -> list[int]:
    """The first layer of each hidden-layer bucket (ascending, from 0).

    The hidden layers (all but the output layer), in model order, cut
    into at most `MAX_HIDDEN_VARIANTS` runs of about equal length.

    Example:
    >>> from keras_seht import WeightLayout
    >>> layout = WeightLayout(((1,),) * 10, tuple((i,) for i in range(10)),
    ...                       tuple(str(i) for i in range(10)))
    >>> buckets(layout)
    [0, 2, 4, 6]
    """
    return bucket_starts(layout.num_layers)


def bucket_starts(num_layers: int) -> list[int]:
    """`buckets` of a model with `num_layers` weight-bearing layers."""
    hidden = num_layers - 1
    count = max(1, min(MAX_HIDDEN_VARIANTS, hidden))
    return sorted({(j * hidden) // count for j in range(count)})


def variant_of(
    layout: WeightLayout, support: Sequence[Any]
) -> tuple[str, frozenset[int]]:
    """The variant ``(name, tangent set)`` for one step's probe support.

    Args:
        layout: The model's `WeightLayout`.
        support: For each trainable variable, whether a probe is nonzero
            on it.

    Returns:
        The variant's name and its tangent set (indices of trainable
        variables), a superset of the probed variables.
    """
    owner = layout.layer_of()
    drawn = {owner[i] for i, touched in enumerate(support) if touched}
    hidden = sorted(drawn - {layout.output_layer})
    if hidden:
        start = max(b for b in buckets(layout) if b <= hidden[0])
        layers = set(range(start, layout.num_layers))
        name = f"layers {start}+"
    elif drawn:
        layers = {layout.output_layer}
        name = "output layer"
    else:
        layers = set()
        name = "no probe"
    tangents = frozenset(i for i, o in enumerate(owner) if o in layers)
    return name, tangents


def all_variants(
    penalties: Sequence[Any], layout: WeightLayout
) -> list[tuple[str, frozenset[int]]]:
    """Every variant a model's steps can pick: ``(name, tangent set)``.

    The output-layer one, one per bucket, and the probe-free one where the
    output layer is drawn with probability below 1.
    """
    owner = layout.layer_of()
    supports = [[o == layout.output_layer for o in owner]]
    supports += [[o == start for o in owner] for start in buckets(layout)]
    probabilities = layer_probabilities(penalties, layout)
    if probabilities is not None and probabilities[layout.output_layer] < 1:
        supports.append([False] * len(owner))
    return [variant_of(layout, support) for support in supports]
