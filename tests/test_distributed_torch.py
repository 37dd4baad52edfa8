"""keras_seht.distributed: data-parallel SEHT on the torch backend.

The multi-worker tests start 2 ``gloo`` workers on the CPU. The fast ones
fork the test process (the workers then need no second import of Keras
and torch: a fraction of a second each); the slow ones start fresh
interpreters with ``torchrun`` (``python -m torch.distributed.run``), as
a user does.

Tolerances come from float32 round-off: the workers' mean of two
half-batch gradients and the one-process gradient on the whole batch sum
the same per-sample terms in another order, so they differ by a few
float32 ulps of each sample's term; `_tolerance` allows
``samples * eps32`` times the magnitude involved.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
import warnings

import keras
import numpy as np
import pytest

import keras_seht
from keras_seht import _io, distributed
from keras_seht.data.pipeline import ArrayDataset
from keras_seht.distributed import ShardedDataset, shard

TORCH = keras.config.backend() == "torch"
needs_torch = pytest.mark.skipif(
    not TORCH, reason="torch.distributed workers (the torch backend)"
)

EPS32 = float(np.finfo("float32").eps)
WORKERS = 2
HALF = 8  # samples per worker and step
STEPS = 3
LR = 0.1


def _tolerance(samples, magnitude):
    """float32 round-off of a sum of `samples` terms of `magnitude`."""
    return samples * EPS32 * max(float(magnitude), 1.0)


# --------------------------------------------------------------------------
# Sharding (any backend, one process)
# --------------------------------------------------------------------------


def test_shard_gives_contiguous_equal_parts():
    x = np.arange(20.0).reshape(10, 2)
    y, w = np.arange(10), np.linspace(0, 1, 10)
    parts = [shard(x, y, w, rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(parts[0][1], np.arange(5))
    np.testing.assert_array_equal(parts[1][0], x[5:])
    np.testing.assert_array_equal(parts[1][2], w[5:])
    assert shard(x, rank=0, world_size=1) is not None
    np.testing.assert_array_equal(shard(x, rank=0, world_size=1), x)
    # Nested inputs: every array split alike.
    nested = shard({"a": x, "b": y}, y, rank=1, world_size=2)
    np.testing.assert_array_equal(nested[0]["b"], y[5:])


def test_shard_remainder_raises_or_is_dropped():
    x, y = np.arange(11.0), np.arange(11)
    with pytest.raises(ValueError, match="drop_remainder=True"):
        shard(x, y, rank=0, world_size=2)
    xs, ys = shard(x, y, rank=1, world_size=2, drop_remainder=True)
    np.testing.assert_array_equal(ys, [5, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="fewer samples than workers"):
        shard(x[:1], rank=0, world_size=2)


def test_shard_bad_arguments():
    x = np.arange(4.0)
    with pytest.raises(ValueError, match="rank"):
        shard(x, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        shard(x, rank=0, world_size=0)
    with pytest.raises(ValueError, match="as many rows"):
        shard(x, np.arange(3), rank=0, world_size=2)
    with pytest.raises(ValueError, match="drop_remainder"):
        shard(x, drop_remainder="yes", rank=0, world_size=2)


def test_sharded_dataset_splits_every_batch():
    x, y = np.arange(21.0), np.arange(21)
    data = ArrayDataset(x, y, batch_size=6, shuffle=True, seed=3)
    parts = [ShardedDataset(data, rank=r, world_size=2) for r in range(2)]
    assert len(parts[0]) == len(data) == 4
    for i in range(3):
        halves = np.concatenate([p[i][1] for p in parts])
        np.testing.assert_array_equal(halves, data[i][1])
    # The last batch holds 21 - 18 = 3 samples.
    with pytest.raises(ValueError, match="do not divide"):
        parts[0][3]
    dropped = ShardedDataset(data, drop_remainder=True, rank=1, world_size=2)
    np.testing.assert_array_equal(dropped[3][1], data[3][1][1:2])
    # set_epoch is the wrapped data set's: the next epoch's order.
    before = parts[0][0][1].copy()
    parts[0].set_epoch(1)
    assert data.epoch == 1
    assert not np.array_equal(parts[0][0][1], before)


def test_sharded_dataset_bad_arguments():
    with pytest.raises(ValueError, match="PyDataset"):
        ShardedDataset([(np.zeros(2), np.zeros(2))], rank=0, world_size=2)
    data = ArrayDataset(np.zeros(4), np.zeros(4), batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardedDataset(data, rank=3, world_size=2)
    with pytest.raises(ValueError, match="fewer than"):
        ShardedDataset(data, rank=0, world_size=8)[0]


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup_from_environment() == 1
    assert distributed.rank() == 0
    assert distributed.world_size() == 1
    assert distributed.is_chief()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup_from_environment() == 1
    with pytest.raises(ValueError, match="timeout"):
        distributed.setup_from_environment(timeout=0)


@needs_torch
def test_incomplete_environment_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        distributed.setup_from_environment()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK must be in 0..1"):
        distributed.setup_from_environment()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.setup_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.setup_from_environment()


def test_only_the_chief_writes(tmp_path, monkeypatch):
    backend = keras.config.backend()
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (1, 2))
    assert not distributed.is_chief()
    _io.write_json(str(tmp_path / "a.json"), {"a": 1})
    _io.write_npz(str(tmp_path / "b.npz"), np.zeros(2))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (0, 2))
    _io.write_json(str(tmp_path / "a.json"), {"a": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}


def test_runner_refuses_what_it_cannot_split(tmp_path, monkeypatch):
    from keras_seht.experiments import runner

    backend = keras.config.backend()
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (0, 2))
    x, y = np.zeros((8, 6), "float32"), np.zeros(8, "int32")
    kwargs = dict(
        epochs=1,
        output_dir=str(tmp_path),
        experiment="e",
        method="m",
        seed=0,
        config={},
        evaluate=lambda model, history: {},
    )
    with pytest.raises(ValueError, match="PyDataset"):
        runner.run_training(_mlp("seht_h"), (x, y), **kwargs)
    if TORCH:
        plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        plain.compile(optimizer="sgd", loss="mse")
        with pytest.raises(ValueError, match="keras_seht.Model"):
            runner.run_training(plain, ArrayDataset(x, y, 4), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_report_prints_and_writes_on_the_chief_only(tmp_path, capsys):
    from keras_seht.experiments import report

    backend = keras.config.backend()
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (1, 2))
        assert report.main([str(runs)]) == 0
        captured = capsys.readouterr()
        assert captured.out == captured.err == ""
        with pytest.raises(SystemExit):  # bad arguments: on every worker
            report.main([str(runs), "--no-such-option"])
    capsys.readouterr()
    # The chief reads the (here: missing) runs and says so.
    assert report.main([str(runs)]) == 1
    assert "No results.json found" in capsys.readouterr().err
    assert list(runs.iterdir()) == []


def test_language_model_recipe_refuses_several_workers(tmp_path, monkeypatch):
    from keras_seht.experiments import language_model

    backend = keras.config.backend()
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (0, 2))
    argv = ["--smoke", "--output-dir", str(tmp_path / "runs")]
    with pytest.raises(RuntimeError, match="one process, not 2"):
        language_model.main(argv)  # before the corpus is loaded
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(distributed._RANK_AND_SIZE, backend, lambda: (0, 1))
    language_model.check_single_process()


def test_plain_model_alone_takes_keras_own_step(monkeypatch):
    """seht=None with one worker: Keras' train step, not the shared one."""
    from keras_seht import step

    def refuse(*args):
        raise AssertionError("the shared step ran")

    monkeypatch.setattr(step, "train_step", refuse)
    model = _mlp("plain")
    x, y = _data(1)
    model.fit(x, y, batch_size=len(x), verbose=0)
    assert model.seht is None and not hasattr(model, "seht_seed_generator")


@needs_torch
def test_synchronized_batchnorm_is_refused_under_torch_workers(monkeypatch):
    """Keras synchronizes BatchNorm under TensorFlow only: a clear error."""
    with pytest.raises(ValueError, match="synchronized"):
        keras.layers.BatchNormalization(synchronized=True)  # Keras' own
    model = _bn_model()
    batchnorm = next(
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    batchnorm.synchronized = True  # past Keras' check
    x, y = _data(1)
    monkeypatch.setitem(distributed._RANK_AND_SIZE, "torch", lambda: (0, 2))
    with pytest.raises(ValueError, match="synchronized=True"):
        model.fit(x, y, batch_size=len(x), verbose=0)
    monkeypatch.setitem(distributed._RANK_AND_SIZE, "torch", lambda: (0, 1))
    with pytest.raises(NotImplementedError, match="synchronized"):
        model.fit(x, y, batch_size=len(x), verbose=0)  # torch's moments


# --------------------------------------------------------------------------
# Two forked gloo workers
# --------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(target, rank, port, queue, kwargs):
    """A forked worker: joins the group, runs `target`, reports, exits."""
    import torch

    torch.set_num_threads(1)  # a forked OpenMP pool is not to be trusted
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORKERS),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        distributed.setup_from_environment(timeout=60)
        queue.put((rank, None, target(**kwargs)))
        torch.distributed.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))
    finally:
        queue.close()
        queue.join_thread()  # the report is sent before the exit
        os._exit(0)


def _run_workers(target, timeout=120, **kwargs):
    """``target(**kwargs)`` in each of 2 forked workers; their results."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    workers = [
        context.Process(
            target=_worker_main, args=(target, r, port, queue, kwargs)
        )
        for r in range(WORKERS)
    ]
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=timeout) for _ in workers]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    errors = [e for _, e, _ in results if e is not None]
    assert not errors, "\n".join(errors)
    return [r for _, _, r in sorted(results, key=lambda t: t[0])]


def _data(batches, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    n = batches * WORKERS * HALF
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, classes, size=n)
    return x, y


def _estimator(name):
    if name.startswith("seht_h"):
        return keras_seht.SEHTH(max_iter=2, strength=0.1)
    # Layers drawn with probability 1/2: some steps probe one layer,
    # some two (the sparse path leaves the others out of every backward).
    return keras_seht.SEHTD(p=0.25, layer_p=0.5, max_iter=2, strength=0.1)


def _mlp(estimator, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras_seht.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        seht=None if estimator == "plain" else _estimator(estimator),
        # A bound that binds: the update then mixes g and g_L, both
        # averaged over the workers.
        seht_safeguard=(
            keras_seht.GradientBound(max_ratio=1e-3)
            if estimator.endswith("bounded")
            else None
        ),
    )
    return model


def _state(model):
    seed = getattr(model, "seht_seed_generator", None)  # None: seht=None
    return {
        "weights": [keras.ops.convert_to_numpy(v) for v in model.variables],
        "seed": None
        if seed is None
        else keras.ops.convert_to_numpy(seed.state.value),
    }


def _fit_sharded(estimator, batches):
    """One worker: `batches` steps on its half of each global batch."""
    x, y = _data(batches)
    model = _mlp(estimator)
    data = ArrayDataset(x, y, batch_size=WORKERS * HALF, shuffle=False)
    history = model.fit(ShardedDataset(data), shuffle=False, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    return dict(_state(model), logs=logs)


@needs_torch
@pytest.mark.parametrize(
    "estimator", ["seht_h", "seht_d", "seht_h_bounded", "plain"]
)
def test_two_workers_take_the_one_process_steps(estimator):
    """The probe equivalence, step after step, and the seeds in sync.

    ``plain`` is a model compiled with ``seht=None``: its workers train
    through the shared step without penalties, so they too take the
    one-process steps (Keras' own step would not average them).
    """
    results = _run_workers(_fit_sharded, estimator=estimator, batches=STEPS)
    x, y = _data(STEPS)
    model = _mlp(estimator)
    data = ArrayDataset(x, y, batch_size=WORKERS * HALF, shuffle=False)
    history = model.fit(data, shuffle=False, verbose=0)
    expected = dict(_state(model), logs=history.history)
    if estimator.endswith("bounded"):
        assert expected["logs"]["seht_bounded"][-1] == 1.0  # it binds
    batch = WORKERS * HALF
    for got in results:
        # The probes' seed advanced alike on both workers and here.
        np.testing.assert_array_equal(got["seed"], expected["seed"])
        for w, e in zip(got["weights"], expected["weights"]):
            tol = _tolerance(STEPS * batch, np.max(np.abs(e)))
            np.testing.assert_allclose(w, e, rtol=0, atol=tol)
        for key in ("loss", "seht_trace", "accuracy", "seht_bounded"):
            if key not in expected["logs"]:
                continue
            value = expected["logs"][key][-1]
            tol = _tolerance(STEPS * batch, abs(value))
            assert got["logs"][key] == pytest.approx(value, abs=tol), key
    # Both workers hold the same weights, bit for bit.
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        np.testing.assert_array_equal(a, b)


def _bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, use_bias=False)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.Activation("tanh")(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = keras_seht.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss="sparse_categorical_crossentropy",
        seht=keras_seht.SEHTH(max_iter=1, strength=0.1),
    )
    return model


def _bn_step(x, y):
    model = _bn_model()
    history = model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    return dict(
        _state(model), logs={k: v[-1] for k, v in history.history.items()}
    )


def _bn_worker():
    x, y = _data(1)
    return _bn_step(*shard(x, y))


@needs_torch
def test_batchnorm_uses_local_statistics_and_averages_moving_ones():
    """One step with BatchNorm: the mean of the two local steps.

    Each worker normalizes with its own half-batch statistics; with plain
    SGD the update is then the mean of the two single-process updates on
    the halves (same probe), and the moving statistics are their mean
    too. That is not the one-process step on the whole batch.
    """
    results = _run_workers(_bn_worker)
    x, y = _data(1)
    halves = [_bn_step(*shard(x, y, rank=r, world_size=2)) for r in range(2)]
    whole = _bn_step(x, y)
    for got in results:
        for i, w in enumerate(got["weights"]):
            mean = (halves[0]["weights"][i] + halves[1]["weights"][i]) / 2
            tol = _tolerance(2 * HALF, np.max(np.abs(mean)))
            np.testing.assert_allclose(w, mean, rtol=0, atol=tol)
        for key in ("loss", "seht_trace"):
            mean = (halves[0]["logs"][key] + halves[1]["logs"][key]) / 2
            tol = _tolerance(2 * HALF, abs(mean))
            assert got["logs"][key] == pytest.approx(mean, abs=tol), key
    # Local statistics: not the whole-batch step (the gap is far above
    # round-off).
    gap = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(results[0]["weights"], whole["weights"])
    )
    assert gap > 100 * _tolerance(2 * HALF, 1.0)


def _poisoned_worker():
    """Worker 1's half holds an infinite input: its loss is not finite."""
    x, y = _data(1)
    x, y = shard(x, y)
    if distributed.rank() == 1:
        x = x.copy()
        x[0, 0] = np.inf
    model = _mlp("seht_h")

    def weights():
        return [
            keras.ops.convert_to_numpy(v) for v in model.trainable_variables
        ]

    before = weights()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=HALF, shuffle=False, verbose=0)
    return {
        "before": before,
        "after": weights(),
        "logs": {k: v[-1] for k, v in history.history.items()},
        "warnings": [str(w.message) for w in caught],
    }


@needs_torch
def test_guard_decides_alike_on_every_worker():
    """A NaN on one worker skips the step on both (reduce, then decide)."""
    results = _run_workers(_poisoned_worker)
    for got in results:
        assert got["logs"]["seht_skipped"] == 1.0
        assert got["logs"]["seht_step_skipped"] == 1.0
        assert any("not applied" in w for w in got["warnings"])
        for a, b in zip(got["before"], got["after"]):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Whole runs: fresh interpreters (torchrun), the digits demo MLP
# --------------------------------------------------------------------------

EPOCHS = 4
TIMEOUT = 60  # the workers' collective timeout, seconds

#: A resumable digits run (`run_training`) of the demo's MLP with SEHT-D.
#: Worker 1 kills itself when epoch KILL_AT_EPOCH (0-based) begins.
RUN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys

    import keras_seht
    import keras
    from keras_seht import distributed

    distributed.setup_from_environment(timeout=float(sys.argv[2]))
    from keras_seht.data import load_digits
    from keras_seht.data.pipeline import ArrayDataset
    from keras_seht.experiments.demo import build_mlp
    from keras_seht.experiments.runner import run_training

    class Kill(keras.callbacks.Callback):
        def __init__(self, epoch):
            super().__init__()
            self.epoch = epoch

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == self.epoch:
                print("KILLED", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    BATCH = 32  # global: 2 workers x 16
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = load_digits()
    model = build_mlp()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        seht=keras_seht.SEHTD(p=0.05, strength=0.01),
    )
    kill = int(os.environ.get("KILL_AT_EPOCH", "-1"))
    callbacks = [Kill(kill)] if distributed.rank() == 1 else []
    results = run_training(
        model,
        ArrayDataset(x, y, batch_size=BATCH, seed=0, drop_remainder=True),
        epochs=int(sys.argv[3]),
        output_dir=sys.argv[1],
        experiment="digits",
        method="seht-d",
        seed=0,
        config={"epochs": int(sys.argv[3])},
        evaluate=lambda m, h: {
            "test_accuracy": m.evaluate(x_test, y_test, verbose=0)[1]
        },
        callbacks=callbacks,
        verbose=0,
    )
    print("RESULT" + json.dumps(
        {"rank": distributed.rank(), "workers": distributed.world_size(),
         "final": results["final"], "history": results["history"]}
    ), flush=True)
    """
)


def _result(stdout):
    line = next(s for s in stdout.splitlines() if s.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _script(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(RUN_SCRIPT)
    return str(path)


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KILL_AT_EPOCH"):
        env.pop(name, None)
    env.update(extra)
    return env


def _one_process(script, output_dir):
    proc = subprocess.run(
        [sys.executable, script, output_dir, str(TIMEOUT), str(EPOCHS)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


def _accuracy_band(accuracy, n):
    """4 standard errors of a difference of two accuracies on n samples."""
    return 4 * np.sqrt(2 * accuracy * (1 - accuracy) / n)


@needs_torch
@pytest.mark.slow
def test_torchrun_digits_run_matches_one_process(tmp_path):
    """torchrun, 2 workers: the accuracy of one process; one writer."""
    script = _script(tmp_path)
    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORKERS),
        script,
        str(out),
        str(TIMEOUT),
        str(EPOCHS),
    ]
    proc = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [
        json.loads(s[len("RESULT") :])
        for s in proc.stdout.splitlines()
        if s.startswith("RESULT")
    ]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["workers"] for r in results} == {WORKERS}
    # The workers hold the same weights: the same test accuracy.
    assert results[0]["final"] == results[1]["final"]
    one = _one_process(script, str(tmp_path / "one"))
    accuracy = one["final"]["test_accuracy"]
    got = results[0]["final"]["test_accuracy"]
    assert abs(got - accuracy) <= _accuracy_band(accuracy, 450)
    # It learned: far above chance (0.1, with 4 standard errors).
    assert accuracy > 0.1 + 4 * np.sqrt(0.1 * 0.9 / 450)
    # The same global batches and probes: every epoch's mean loss agrees
    # to the round-off of the steps so far (42 steps of 32 per epoch).
    losses = zip(one["history"]["loss"], results[0]["history"]["loss"])
    for epoch, (expected, value) in enumerate(losses, 1):
        tol = _tolerance(epoch * 42 * 32, expected)
        assert value == pytest.approx(expected, abs=tol), epoch
    # The chief wrote the results (and removed its checkpoint): nothing
    # else.
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["epochs_completed"] == EPOCHS
    print("test accuracy: one process", accuracy, "two workers", got)
    print("losses:", one["history"]["loss"], results[0]["history"]["loss"])


@needs_torch
@pytest.mark.slow
def test_killed_worker_stops_the_other_and_the_rerun_resumes(tmp_path):
    script = _script(tmp_path)
    out = tmp_path / "run"
    port = _free_port()

    def start(rank, **extra):
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORKERS),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **extra,
        )
        return subprocess.Popen(
            [sys.executable, script, str(out), str(TIMEOUT), str(EPOCHS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    workers = [start(r, KILL_AT_EPOCH="2") for r in range(WORKERS)]
    try:
        killed_out, _ = workers[1].communicate(timeout=900)
        killed_at = time.monotonic()
        chief_out, chief_err = workers[0].communicate(timeout=3 * TIMEOUT)
        stopped_after = time.monotonic() - killed_at
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert "KILLED" in killed_out
    assert workers[1].returncode == -signal.SIGKILL
    assert workers[0].returncode != 0
    assert "WorkerError" in chief_err and "a worker died" in chief_err
    assert stopped_after < TIMEOUT
    saved = json.loads((out / "results.json").read_text())
    assert saved["epochs_completed"] == 2 and not saved["complete"]
    assert (out / "checkpoint.npz").exists()

    port = _free_port()
    workers = [start(r) for r in range(WORKERS)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-4000:]
    assert f"Resuming {out} after epoch 2." in outputs[0][0]
    results = [_result(o) for o, _ in outputs]
    assert results[0]["final"] == results[1]["final"]
    assert len(results[0]["history"]["loss"]) == EPOCHS
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["epochs_completed"] == EPOCHS
    assert not (out / "checkpoint.npz").exists()
    print("stopped", stopped_after, "s after the kill")
