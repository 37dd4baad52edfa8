"""Every use of Keras internals, in one place.

keras-seht needs a handful of attributes that Keras does not export
publicly (how a model's ``call`` takes ``training``, the loss tracker that
``fit`` logs as ``loss``, the backward-compatible loss wrapper). They are
all read here, so a Keras upgrade that renames them breaks exactly one
module, and ``tests/test_keras_compat.py`` fails loudly when it does.

Tested with Keras 3.15 (see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import Any

import keras

#: Keras versions this module was written against (major, minor).
TESTED_KERAS = ((3, 10), (3, 15))

REQUIRED_MODEL_ATTRIBUTES = (
    "_call_has_training_arg",
    "_compute_loss",
    "_loss_tracker",
)


def check_model(model: keras.Model) -> None:
    """Raises a clear error if this Keras lacks what keras-seht uses."""
    missing = [a for a in REQUIRED_MODEL_ATTRIBUTES if not hasattr(model, a)]
    if missing:
        raise RuntimeError(
            "keras-seht relies on Keras internals that this Keras "
            f"({keras.__version__}) does not have: {missing}. keras-seht is "
            f"tested with Keras {TESTED_KERAS[0]}-{TESTED_KERAS[1]}; please "
            "report this at the keras-seht issue tracker."
        )


def call_has_training_arg(model: keras.Model) -> bool:
    """Whether ``model.call`` accepts a ``training`` argument."""
    return bool(model._call_has_training_arg)


def compute_loss(
    model: keras.Model,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    training: bool,
) -> Any:
    """``model.compute_loss``, for overrides with and without ``training``."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def loss_tracker(model: keras.Model) -> keras.metrics.Metric:
    """The ``Mean`` metric that ``fit`` logs as ``loss``."""
    return model._loss_tracker
