"""Which trainable variables belong to which layer.

SEHT-D draws whole layers, so the estimators need the model's trainable
variables grouped by the layer that owns them, in model order, with the
output layer (the last weight-bearing layer) marked. Grouping uses the
public ``Variable.path`` (``"model/dense_1/kernel"`` belongs to
``"model/dense_1"``), which Keras sets from the name scope of the layer that
created the variable, so nested models and layers are handled alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import keras


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """Trainable variables of a model, grouped by owning layer.

    Attributes:
        shapes: Shape of each trainable variable, in the order of
            ``model.trainable_variables``.
        groups: For each weight-bearing layer, in model order, the indices
            (into ``shapes``) of the variables it owns.
        names: A readable name for each group (the layer's path).

    Example:
    >>> from keras_seht import WeightLayout
    >>> layout = WeightLayout(
    ...     shapes=((4, 3), (3,), (3, 2)),
    ...     groups=((0, 1), (2,)),
    ...     names=("hidden", "output"),
    ... )
    >>> layout.num_layers, layout.output_layer, layout.num_weights
    (2, 1, 21)
    >>> layout.layer_of()
    [0, 0, 1]
    """

    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """Number of weight-bearing layers."""
        return len(self.groups)

    @property
    def output_layer(self) -> int:
        """Index of the output layer: the last weight-bearing layer."""
        return len(self.groups) - 1

    @property
    def num_weights(self) -> int:
        """Total number of trainable scalars."""
        total = 0
        for shape in self.shapes:
            size = 1
            for dim in shape:
                size *= int(dim)
            total += size
        return total

    def layer_of(self) -> list[int]:
        """For each variable, the index of the layer that owns it."""
        owner = [0] * len(self.shapes)
        for layer, indices in enumerate(self.groups):
            for i in indices:
                owner[i] = layer
        return owner


def _owner_path(variable: Any) -> str:
    path = getattr(variable, "path", None) or variable.name
    head, _, _ = path.rpartition("/")
    return head or path


def weight_layout(
    model_or_variables: keras.Model | Sequence[Any],
) -> WeightLayout:
    """Groups a model's trainable variables by the layer that owns them.

    Args:
        model_or_variables: A built Keras model, or a list of variables (in
            which case variables are grouped by their ``path``).

    Returns:
        A `WeightLayout`.

    Example:
    >>> import keras, keras_seht
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(2)])
    >>> layout = keras_seht.weight_layout(model)
    >>> layout.shapes
    ((4, 3), (3,), (3, 2), (2,))
    >>> layout.groups  # kernel and bias of each Dense layer
    ((0, 1), (2, 3))
    """
    if isinstance(model_or_variables, keras.Model):
        variables = list(model_or_variables.trainable_variables)
    else:
        variables = list(model_or_variables)
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for i, variable in enumerate(variables):
        owner = _owner_path(variable)
        if owner not in members:
            members[owner] = []
            order.append(owner)
        members[owner].append(i)
    return WeightLayout(
        shapes=tuple(tuple(int(d) for d in v.shape) for v in variables),
        groups=tuple(tuple(members[name]) for name in order),
        names=tuple(order),
    )
