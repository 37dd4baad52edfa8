"""Shared fixtures: small models and data, built fresh for every test.

The suite runs under whichever backend KERAS_BACKEND names (torch by
default); the README's test command runs it once per backend.

Tests marked ``single_backend`` check backend-independent logic (the
example scripts, the report, the command line, the data loaders): the
default run (``-m "not slow"``) runs them under one backend only,
``SINGLE_BACKEND`` (torch; set KERAS_SEHT_SINGLE_BACKEND to change it),
and counts them as ``slow`` under the others, so ``make test-all`` still
runs them everywhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_seht  # noqa: E402
from keras_seht.estimators import CurvatureEstimator  # noqa: E402

#: The backend whose default run includes the `single_backend` tests.
SINGLE_BACKEND = os.environ.get("KERAS_SEHT_SINGLE_BACKEND", "torch")


def _share_jax_compilations() -> None:
    """JAX: one compilation cache for the session's identical programs.

    Most of the JAX run's time is XLA compiling small train steps, and
    many tests build the same model on the same shapes: XLA's persistent
    cache (in a directory of this session alone, removed at exit) serves
    those from the first compile (measured on tests/test_training.py: 81
    of 423 compile requests). The programs, and so the results, are the
    same.
    """
    import atexit
    import shutil
    import tempfile

    import jax

    directory = tempfile.mkdtemp(prefix="keras_seht_jax_cache_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


if keras.config.backend() == "jax":
    _share_jax_compilations()


def pytest_report_header(config):
    return (
        f"keras backend: {keras.config.backend()}, keras {keras.__version__}"
        f"; single_backend tests run under {SINGLE_BACKEND}"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    if keras.config.backend() == SINGLE_BACKEND:
        return
    for item in items:
        if item.get_closest_marker("single_backend"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # free_memory=False: no gc.collect() per test, which costs 0.5-1 s
    # each (hundreds of thousands of objects once TensorFlow, torch and
    # matplotlib are loaded), a third of the suite's time; Python's own
    # collector still frees cyclic garbage as it builds up.
    keras.backend.clear_session(free_memory=False)
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


def run_script_result(script: str, timeout: int = 600, **env: str) -> dict:
    """Runs `script` in a fresh Python (its own Keras backend and flags),
    with `env` added to the environment, and returns the JSON it printed
    after ``RESULT``."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(
        ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")
    )
    return json.loads(line[len("RESULT") :])


STRENGTH = 0.1


class FixedProbes(CurvatureEstimator):
    """Returns the given probes, in turn (one per ``sample_probes`` call).

    A compiled step (JAX, TensorFlow) calls ``sample_probes`` while tracing
    only, ``max_iter`` times per trace, so the probes are constants of the
    step; cycling modulo ``len(probes)`` keeps their order in every trace.
    """

    def __init__(self, probes, strength=STRENGTH, **kwargs):
        super().__init__(max_iter=len(probes), strength=strength, **kwargs)
        self.probes = [
            [np.asarray(p, "float32") for p in probe] for probe in probes
        ]
        self._calls = 0

    def sample_probes(self, layout, seed=None, dtype="float32", sparse=False):
        probe = self.probes[self._calls % len(self.probes)]
        self._calls += 1
        assert [p.shape for p in probe] == list(layout.shapes)
        return [keras.ops.convert_to_tensor(p, dtype) for p in probe]

    def layer_weights(self, layout):
        return [1.0] * layout.num_layers


def rademacher_probe(shapes, rng, fill=None):
    """One float32 +-1 array per shape (all equal to `fill` if given)."""
    probe = []
    for shape in shapes:
        p = rng.choice([-1.0, 1.0], size=tuple(shape)).astype("float32")
        if fill is not None:
            p[...] = fill
        probe.append(p)
    return probe
