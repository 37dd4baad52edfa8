"""Shared fixtures: small models and data, built fresh for every test.

The suite runs under whichever backend KERAS_BACKEND names (torch by
default); the README's test command runs it once per backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_seht  # noqa: E402


def pytest_report_header(config):
    return f"keras backend: {keras.config.backend()}, keras {keras.__version__}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def make_data(n: int = 32, d: int = 6, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, k, size=(n,)).astype("int32")
    return x, y


def tanh_mlp(d: int = 6, k: int = 3, hidden: int = 5, **dense_kwargs):
    """A small tanh MLP ending in Dense + softmax (a keras_seht.Sequential)."""
    return keras_seht.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(hidden, activation="tanh", **dense_kwargs),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(k, activation="softmax"),
        ]
    )


def relu_mlp(d: int = 6, k: int = 3, hidden: int = 6):
    return keras_seht.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(k, activation="softmax"),
        ]
    )


def tiny_cnn(k: int = 3):
    """Conv + BatchNorm + tanh + pooling + Dense softmax, on 6x6x1 images."""
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, use_bias=False)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(k, activation="softmax")(h)
    return keras_seht.Model(inputs, outputs)


def image_data(n: int = 16, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    y = rng.integers(0, k, size=(n,)).astype("int32")
    return x, y


def compile_plain(model, **kwargs):
    kwargs.setdefault("optimizer", "sgd")
    kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    model.compile(**kwargs)
    return model
