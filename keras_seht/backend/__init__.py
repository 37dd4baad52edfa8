"""The per-backend autodiff of SEHT, chosen by ``keras.config.backend()``.

Each backend module provides ``train_step(model, data)`` and a
``HessianVectorProduct(model, x, y, sample_weight, training)`` class with
``__call__(vectors)``, ``quadratic_form(vectors)`` and ``diagonal()``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import keras

SUPPORTED_BACKENDS = ("torch", "jax", "tensorflow")


def get() -> ModuleType:
    """The SEHT implementation for the current Keras backend."""
    name = keras.config.backend()
    if name not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"keras-seht does not support the {name!r} Keras backend yet. "
            f"Supported backends: {', '.join(SUPPORTED_BACKENDS)}. Set "
            "KERAS_BACKEND before importing keras."
        )
    return importlib.import_module(f"keras_seht.backend.{name}")
