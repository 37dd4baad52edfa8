"""Every use of Keras internals, in one place.

keras-seht needs a handful of attributes that Keras does not export
publicly (how a model's ``call`` takes ``training``, the loss tracker that
``fit`` logs as ``loss``, the backward-compatible loss wrapper). They are
all read here, so a Keras upgrade that renames them breaks exactly one
module, and ``tests/test_keras_compat.py`` fails loudly when it does.

Written against the Keras 3.15 internals (``TESTED_KERAS``). CI runs the
tests with the Keras that ``pip`` installs (3.15 at the time of writing),
so ``pyproject.toml`` allows ``keras>=3.15,<4``: the floor is the lowest
Keras the suite is actually run with. (Keras 3.10 imports and mostly
works, but warns where 3.15 does not, e.g. on the input structure of a
reloaded functional model, and no CI job tests it.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras

#: Keras versions this module was written against (major, minor).
TESTED_KERAS = ((3, 15), (3, 15))

REQUIRED_MODEL_ATTRIBUTES = (
    "_call_has_training_arg",
    "_compute_loss",
    "_loss_tracker",
    "_tracker",
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


def compiled_loss(
    model: keras.Model, y: Any, y_pred: Any, sample_weight: Any
) -> Any:
    """The loss given to ``compile(loss=...)`` (without ``model.losses``)."""
    loss = getattr(model, "_compile_loss", None)
    if loss is None:
        raise ValueError(
            "`curvature='gauss_newton'` differentiates the loss given to "
            "`compile(loss=...)` with respect to the model's outputs, but "
            "this model was compiled without one."
        )
    return loss(y, y_pred, sample_weight)


def optimizer_slots(optimizer: Any) -> dict[str, list[Any]]:
    """The optimizer's per-variable slots (momentum, ...), by variable path.

    Keras names a slot made by ``add_variable_from_reference`` as
    ``f"{variable.path.replace('/', '_')}_{slot}"``; slots are matched to
    the model's trainable variables by that prefix and by shape.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer
        optimizer = inner
    references = getattr(optimizer, "_trainable_variables", None) or []
    slots: dict[str, list[Any]] = {}
    for reference in references:
        prefix = reference.path.replace("/", "_") + "_"
        slots[reference.path] = [
            v
            for v in optimizer.variables
            if v.name.startswith(prefix)
            and tuple(v.shape) == tuple(reference.shape)
        ]
    return slots


@contextlib.contextmanager
def unlocked_state(layer: keras.layers.Layer) -> Iterator[None]:
    """Lets a built layer or model take new state (a ``SeedGenerator``).

    Keras locks the state tracker of a built subclassed layer or model
    (``Layer._lock_state``; Functional and Sequential models stay
    unlocked), after which a new variable attribute raises ``ValueError``.
    Keras itself unlocks it around ``quantize`` and
    ``Layer._untrack_variable``; the lock is restored on exit.
    """
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()  # keeps Keras' message for later violations


def optimizer_variable_count(optimizer: Any) -> int | None:
    """How many trainable variables `optimizer` was built for.

    None if it is not built yet.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer
        optimizer = inner
    if not getattr(optimizer, "built", False):
        return None
    return len(getattr(optimizer, "_trainable_variables", []))


def loss_tracker(model: keras.Model) -> keras.metrics.Metric:
    """The ``Mean`` metric that ``fit`` logs as ``loss``."""
    return model._loss_tracker


def _exact_tf_moments(x: Any, axes: Any, keepdims: bool) -> Any:
    """``tf.nn.moments`` without its ``stop_gradient`` on the mean."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


@contextlib.contextmanager
def exact_tf_moments() -> Iterator[None]:
    """Makes BatchNormalization's batch moments twice differentiable (TF).

    Keras' TensorFlow backend computes batch moments with ``tf.nn.moments``,
    which takes the variance around ``stop_gradient(mean)``. That leaves
    the value and the first derivative unchanged (the dropped term is
    proportional to sum_i (x_i - mean) = 0), but drops a term of the
    *second* derivative, so Hessians through BatchNormalization in training
    mode come out wrong (measured: 0.5% off in sigma^T H sigma on a small
    Conv-BN net, against torch and JAX). Inside this context (active while
    keras-seht traces its TF functions) the moments are computed without
    the stop_gradient.
    """
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn._compute_moments
    tf_nn._compute_moments = _exact_tf_moments
    try:
        yield
    finally:
        tf_nn._compute_moments = original


def functional_class() -> type[Any]:
    """Keras' ``Functional`` model class (not exported publicly)."""
    from keras.src.models.functional import Functional

    return Functional


def is_functional_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``Model(*args, **kwargs)`` is a functional construction."""
    from keras.src.models.model import functional_init_arguments

    return bool(functional_init_arguments(args, kwargs))


def init_functional(
    model: keras.Model, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """What ``keras.Model.__init__`` does for functional arguments.

    Minus the rewrite of the class hierarchy (see ``keras_seht.model``).
    """
    from keras.src.models import model as model_lib

    model_lib.Trainer.__init__(model)
    functional_class().__init__(model, *args, **kwargs)


def get_keras_mask(x: Any) -> Any:
    """The Keras mask of tensor `x` (``mask_zero`` embeddings), or None.

    Keras >= 3.6 keeps it outside the tensor on some backends
    (``keras.src.backend.get_keras_mask``); older ones in ``_keras_mask``.
    """
    try:
        from keras.src.backend import get_keras_mask as keras_get_mask
    except ImportError:  # pragma: no cover - older Keras
        return getattr(x, "_keras_mask", None)
    return keras_get_mask(x)
