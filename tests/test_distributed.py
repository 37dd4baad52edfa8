"""keras_seht.distributed: the setup wiring of every backend, one process.

`setup_from_environment` dispatches to the backend's setup: torch's
``init_process_group``, TensorFlow's
`keras_seht.backend.tensorflow.strategy_from_environment` and JAX's
`keras_seht.backend.jax.initialize_from_environment`. These tests run
without a multi-process environment (each setup then does nothing) and
with the backend calls replaced by recording fakes; the real multi-worker
runs are in ``tests/test_distributed_{torch,tf,jax}.py``.
"""

from __future__ import annotations

import json
import sys
import types

import keras
import numpy as np
import pytest

import keras_seht.backend
from keras_seht import distributed
from keras_seht.data.pipeline import ArrayDataset

#: Every variable a backend's setup reads to find other workers.
ENVIRONMENT = (
    "WORLD_SIZE",
    "RANK",
    "TF_CONFIG",
    "JAX_COORDINATOR_ADDRESS",
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
)


@pytest.fixture
def alone(monkeypatch):
    """An environment that describes no other worker."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def _fake_backend_module(monkeypatch, name, **functions):
    """Replaces ``keras_seht.backend.<name>`` by a module of `functions`."""
    module = types.ModuleType(f"keras_seht.backend.{name}")
    for key, function in functions.items():
        setattr(module, key, function)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(keras_seht.backend, name, module, raising=False)


def test_every_backend_has_a_setup():
    assert set(distributed._SETUPS) == {"torch", "tensorflow", "jax"}


def test_setup_alone_is_one_worker(alone):
    imported = "tensorflow" in sys.modules
    assert distributed.setup_from_environment(timeout=5) == 1
    assert distributed.world_size() == 1 and distributed.is_chief()
    if keras.config.backend() != "tensorflow":
        # Never TensorFlow under another backend (it crashes torch).
        assert ("tensorflow" in sys.modules) == imported


def test_setup_dispatches_to_the_backend_with_the_timeout(monkeypatch):
    calls = []
    monkeypatch.setitem(
        distributed._SETUPS,
        keras.config.backend(),
        lambda timeout: calls.append(timeout) or 3,
    )
    assert distributed.setup_from_environment(timeout=7.5) == 3
    assert calls == [7.5]


def test_tensorflow_setup_installs_the_strategy(monkeypatch):
    """strategy_from_environment(timeout); the workers from TF_CONFIG."""
    calls = []

    def strategy_from_environment(timeout=None):
        calls.append(timeout)
        return object()  # a strategy

    _fake_backend_module(
        monkeypatch,
        "tensorflow",
        strategy_from_environment=strategy_from_environment,
    )
    config = {
        "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
        "task": {"type": "worker", "index": 1},
    }
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert distributed._SETUPS["tensorflow"](12.0) == 3
    assert calls == [12.0]
    # No strategy (no TF_CONFIG): one worker.
    _fake_backend_module(
        monkeypatch,
        "tensorflow",
        strategy_from_environment=lambda timeout=None: None,
    )
    monkeypatch.delenv("TF_CONFIG")
    assert distributed._SETUPS["tensorflow"](12.0) == 1


def test_jax_setup_initializes_and_counts_the_processes(monkeypatch):
    calls = []

    def initialize_from_environment(environ=None, set_distribution=True):
        calls.append((environ, set_distribution))
        return object()  # a DataParallel distribution

    _fake_backend_module(
        monkeypatch,
        "jax",
        initialize_from_environment=initialize_from_environment,
    )
    fake_jax = types.ModuleType("jax")
    fake_jax.process_count = lambda: 4
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    assert distributed._SETUPS["jax"](5.0) == 4
    # The process's environment, and the distribution set globally.
    assert calls == [(None, True)]
    _fake_backend_module(
        monkeypatch,
        "jax",
        initialize_from_environment=lambda **kwargs: None,
    )
    assert distributed._SETUPS["jax"](5.0) == 1


def test_tensorflow_keeps_the_data_whole(monkeypatch):
    """Under TensorFlow the strategy splits each batch: no sharding."""
    backend = keras.config.backend()
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (1, 2))
    monkeypatch.setattr(distributed, "_splits_batches_itself", lambda: True)
    x, y = np.arange(10.0), np.arange(10)
    whole = distributed.shard(x, y)
    np.testing.assert_array_equal(whole[0], x)
    np.testing.assert_array_equal(whole[1], y)
    data = ArrayDataset(x, y, batch_size=4, shuffle=False)
    np.testing.assert_array_equal(
        distributed.ShardedDataset(data)[0][1], data[0][1]
    )
    # Explicit ranks still split, on every backend.
    part = distributed.shard(x, y, rank=1, world_size=2)
    np.testing.assert_array_equal(part[1], y[5:])
    # Under torch and JAX each worker keeps its share.
    monkeypatch.setattr(distributed, "_splits_batches_itself", lambda: False)
    np.testing.assert_array_equal(distributed.shard(x, y)[1], y[5:])
    np.testing.assert_array_equal(
        distributed.ShardedDataset(data)[0][1], data[0][1][2:]
    )


def test_only_tensorflow_splits_batches_itself():
    expected = keras.config.backend() == "tensorflow"
    assert distributed._splits_batches_itself() == expected
