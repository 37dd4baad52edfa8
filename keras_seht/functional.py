"""The compiled loss as a pure function of the trainable weights.

Second- and third-order derivatives need the loss as a function of weight
*values* rather than of Keras variables. `stateless_loss` runs the forward
pass and ``model.compute_loss`` inside one ``keras.StatelessScope``, so
weight regularizers (``model.losses``) and activity regularizers see the
given values too. (Computing the loss outside the scope silently drops
their dependence on the weights: their derivative comes out zero.)
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from keras_seht import _keras_compat as compat


def as_tensors(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
    """Converts array-likes (NumPy, lists) to backend tensors."""

    def convert(value: Any) -> Any:
        if value is None:
            return None
        return keras.tree.map_structure(ops.convert_to_tensor, value)

    return convert(x), convert(y), convert(sample_weight)


def stateless_loss(
    model: keras.Model,
    trainable_values: Sequence[Any],
    non_trainable_values: Sequence[Any],
    x: Any,
    y: Any,
    sample_weight: Any = None,
    training: bool = False,
) -> tuple[Any, Any, list[Any]]:
    """Evaluates the compiled loss at the given weight values.

    Args:
        model: A compiled, built Keras model.
        trainable_values: One tensor per ``model.trainable_variables``.
        non_trainable_values: One per ``model.non_trainable_variables``.
        x: The batch's inputs, as backend tensors.
        y: The batch's targets, as backend tensors.
        sample_weight: The batch's sample weights (or None), as backend
            tensors.
        training: Forward pass in training mode (BatchNorm batch statistics,
            Dropout active).

    Returns:
        ``(loss, y_pred, new_non_trainable_values)``; no variable of the
        model is modified.
    """
    mapping = list(zip(model.trainable_variables, trainable_values))
    mapping += list(zip(model.non_trainable_variables, non_trainable_values))
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as s:
        if compat.call_has_training_arg(model):
            y_pred = model(x, training=training)
        else:
            y_pred = model(x)
        loss = compat.compute_loss(
            model, x, y, y_pred, sample_weight, training=training
        )
    updated = scope_values(
        s, model.non_trainable_variables, non_trainable_values
    )
    return loss, y_pred, updated


def scope_values(
    scope: keras.StatelessScope,
    variables: Sequence[Any],
    values: Sequence[Any],
) -> list[Any]:
    """The values of `variables` after `scope` ran.

    Those it assigned, else the values it started from.
    """
    updated = []
    for variable, value in zip(variables, values):
        new = scope.get_current_value(variable)
        updated.append(value if new is None else new)
    return updated


def shifted(values: Sequence[Any], probe: Sequence[Any], step: float) -> list:
    """``w + step * sigma``, one tensor per variable.

    A None entry of `probe` (a zero probe) leaves the value as it is.
    """
    return [
        v if s is None else v + ops.cast(s, v.dtype) * step
        for v, s in zip(values, probe)
    ]
