"""The per-backend autodiff of SEHT, chosen by ``keras.config.backend()``.

Each backend module provides only autodiff: a ``StepRun`` (the
primitives of the one train step of `keras_seht.step`: the step context
of `keras_seht.context`, "differentiate this objective", the fallback
gradients, applying the optimizer) and a
``CurvatureProducts(model, x, y, sample_weight, training)`` class for the
diagnostics: ``hvp``, ``jvp``, ``vjp`` and ``output_hvp`` (with batched
``*_rows`` forms) at a fixed batch, from which `keras_seht.operators`
builds the Hessian and Gauss-Newton operators.
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
