"""Data- and model-parallel SEHT steps on the JAX backend.

Under a ``keras.distribution`` the compiled step is one global program
over the global batch (``StepRun.all_reduce_mean`` is the identity), so
a data-parallel step on a global batch must give the single-worker step
on the same batch: the same update, logged ``loss`` and ``seht_trace``,
with every process drawing the same probe from the same seed state. The
multi-process and model-parallel runs start their own Python processes
(the device count and ``jax.distributed`` are fixed per process).

Tolerance: a data-parallel reduction regroups the sum over the global
batch of ``GLOBAL_BATCH`` float32 terms into per-device partial sums,
which changes the sum by at most ``(GLOBAL_BATCH - 1) * eps`` times the
sum of the magnitudes of its terms; ``ROUNDOFF`` bounds that, relative
to the largest magnitude of the compared quantity over the run (a stand-in
for the sum of the magnitudes of its terms, which the logs do not give).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import run_script_result

if keras.config.backend() != "jax":
    pytest.skip("JAX backend tests", allow_module_level=True)

from keras_seht.backend.jax import initialize_from_environment  # noqa: E402

GLOBAL_BATCH = 16
ROUNDOFF = GLOBAL_BATCH * float(np.finfo(np.float32).eps)
PROCESSES = 2
ESTIMATORS = ("SEHTH", "SEHTD")
#: Seconds a multi-process run may take before it counts as hung.
TIMEOUT = 300

# The model, the estimators and the batches every run below shares: three
# steps on finite global batches, then one whose sample 15 (in the last
# process's shard) is NaN, which every worker must skip alike.
_COMMON = textwrap.dedent(
    """
    import json
    import jax, keras, numpy as np
    import keras_seht

    GLOBAL_BATCH = %d

    def estimator(name):
        if name == "SEHTH":
            return keras_seht.SEHTH(max_iter=2, strength=1e-2)
        return keras_seht.SEHTD(p=0.3, layer_p=0.5, strength=1e-2)

    def batches(steps=3):
        rng = np.random.default_rng(0)
        for step in range(steps + 1):
            x = rng.normal(size=(GLOBAL_BATCH, 4)).astype("float32")
            y = rng.integers(0, 4, size=(GLOBAL_BATCH,)).astype("int32")
            if step == steps:
                x[GLOBAL_BATCH - 1, 0] = np.nan
            yield x, y

    def build(name):
        keras.utils.set_random_seed(3)
        model = keras_seht.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(4, activation="softmax"),
        ])
        model.compile(
            keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy",
            metrics=["accuracy"], seht=estimator(name),
        )
        return model

    def record(model, logs):
        seed = model.seht_seed_generator.state.value
        return {
            "logs": {k: float(v) for k, v in logs.items()},
            "weights": [np.asarray(w).tolist() for w in model.get_weights()],
            "seed": np.asarray(seed.addressable_data(0)).tolist(),
        }
    """
    % GLOBAL_BATCH
)

_WORKER_SCRIPT = _COMMON + textwrap.dedent(
    """
    from keras_seht.backend.jax import initialize_from_environment

    distribution = initialize_from_environment()
    rank, count = jax.process_index(), jax.process_count()
    assert len(jax.local_devices()) == 1, jax.local_devices()
    shard = slice(
        rank * GLOBAL_BATCH // count, (rank + 1) * GLOBAL_BATCH // count
    )
    result = {"rank": rank, "count": count, "devices": len(jax.devices())}
    for name in ("SEHTH", "SEHTD"):
        model = build(name)
        steps = []
        for x, y in batches():
            logs = model.train_on_batch(x[shard], y[shard], return_dict=True)
            steps.append(record(model, logs))
        result[name] = steps
    print("RESULT" + json.dumps(result))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment, one CPU device per process, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KERAS_DISTRIBUTION_", "JAX_"))
    }
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env.update(
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        OMP_NUM_THREADS="1",
        XLA_FLAGS=" ".join(flags),
    )
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _run_processes(count: int) -> list[dict]:
    """Runs `_WORKER_SCRIPT` as `count` processes of one JAX run."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT],
            env=_environment(
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES=str(count),
                JAX_PROCESS_ID=str(rank),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(count)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-4000:]
    return [_result(stdout) for stdout, _ in outputs]


@pytest.fixture(scope="module")
def process_runs() -> dict:
    """One single-process run on the global batches, one two-process run."""
    single = run_script_result(
        _WORKER_SCRIPT, timeout=TIMEOUT, **_environment()
    )
    workers = _run_processes(PROCESSES)
    return {"single": single, "workers": workers}


def _scale(values) -> float:
    """The largest finite magnitude among `values` (1 where there is none)."""
    finite = np.abs(np.asarray(values, "float64"))
    finite = finite[np.isfinite(finite)]
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _assert_steps_match(steps, reference) -> None:
    """Per step: the same logs, weights and seed state as `reference`.

    Each quantity within ``ROUNDOFF`` times its largest magnitude over the
    run: a per-sample sum with mixed signs (``seht_trace``) can cancel to
    far less than its terms, so its own value is no scale for its error.
    """
    assert len(steps) == len(reference)
    keys = reference[0]["logs"].keys()
    for key in keys:
        expected = [s["logs"][key] for s in reference]
        got = [s["logs"][key] for s in steps]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(
            got,
            expected,
            rtol=0,
            atol=ROUNDOFF * _scale(expected),
            err_msg=key,
        )
    for i in range(len(reference[0]["weights"])):
        expected = [s["weights"][i] for s in reference]
        np.testing.assert_allclose(
            [s["weights"][i] for s in steps],
            expected,
            rtol=0,
            atol=ROUNDOFF * _scale(expected),
            err_msg=f"weight {i}",
        )
    for k, (got, expected) in enumerate(zip(steps, reference)):
        assert got["logs"].keys() == keys
        assert got["seed"] == expected["seed"], k


@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_two_processes_match_one_process(process_runs, name):
    single, workers = process_runs["single"], process_runs["workers"]
    assert single["count"] == 1 and single["devices"] == 1
    assert [w["rank"] for w in workers] == list(range(PROCESSES))
    assert all(w["devices"] == PROCESSES for w in workers)
    first = workers[0][name]
    for worker in workers[1:]:
        # One global program: every process holds the same values, bit
        # for bit (weights, logs, and the seed state the probes come from;
        # compared as JSON, where NaN equals NaN).
        assert json.dumps(worker[name]) == json.dumps(first)
    _assert_steps_match(first, single[name])
    # The seed advanced at every step (fresh probes), in step on every
    # process (checked above).
    seeds = [s["seed"] for s in first]
    assert all(a != b for a, b in zip(seeds, seeds[1:]))
    # The NaN sample of the last process made every worker skip the step.
    *finite, nan_step = first
    assert all(s["logs"]["seht_step_skipped"] == 0.0 for s in finite)
    assert nan_step["logs"]["seht_step_skipped"] == 1.0
    assert nan_step["weights"] == finite[-1]["weights"]


_MODEL_PARALLEL_SCRIPT = _COMMON + textwrap.dedent(
    """
    def run(name, parallel):
        if parallel:
            mesh = keras.distribution.DeviceMesh(
                (1, 2), ["batch", "model"], devices=jax.devices()
            )
            layout_map = keras.distribution.LayoutMap(mesh)
            layout_map[".*dense.*/kernel"] = (None, "model")
            layout_map[".*dense.*/bias"] = ("model",)
            keras.distribution.set_distribution(
                keras.distribution.ModelParallel(
                    layout_map=layout_map, batch_dim_name="batch"
                )
            )
        else:
            keras.distribution.set_distribution(None)
        model = build(name)
        steps = []
        for x, y in batches():
            logs = model.train_on_batch(x, y, return_dict=True)
            steps.append(record(model, logs))
        shards = [
            [list(s.data.shape) for s in v.value.addressable_shards]
            for v in model.trainable_variables
        ]
        return {"steps": steps, "shards": shards}

    assert len(jax.devices()) == 2, jax.devices()
    print("RESULT" + json.dumps({
        name: {"single": run(name, False), "parallel": run(name, True)}
        for name in ("SEHTH", "SEHTD")
    }))
    """
)


@pytest.fixture(scope="module")
def model_parallel_runs() -> dict:
    flags = _environment()["XLA_FLAGS"]
    return run_script_result(
        _MODEL_PARALLEL_SCRIPT,
        timeout=TIMEOUT,
        **_environment(
            XLA_FLAGS=(
                flags + " --xla_force_host_platform_device_count=2"
            ).strip()
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_model_parallel_matches_single_device(model_parallel_runs, name):
    single = model_parallel_runs[name]["single"]
    parallel = model_parallel_runs[name]["parallel"]
    # Every kernel and bias is split over the two devices of "model".
    kernel_1, bias_1, kernel_2, bias_2 = parallel["shards"]
    assert kernel_1 == [[4, 3], [4, 3]] and bias_1 == [[3], [3]]
    assert kernel_2 == [[6, 2], [6, 2]] and bias_2 == [[2], [2]]
    assert single["shards"] == [[[4, 6]], [[6]], [[6, 4]], [[4]]]
    _assert_steps_match(parallel["steps"], single["steps"])
    *finite, nan_step = parallel["steps"]
    assert nan_step["logs"]["seht_step_skipped"] == 1.0
    assert nan_step["weights"] == finite[-1]["weights"]


def test_initialize_from_environment_without_coordinator_does_nothing():
    assert initialize_from_environment({}) is None
    assert initialize_from_environment({"JAX_NUM_PROCESSES": "2"}) is None
    assert keras.distribution.distribution() is None


@pytest.mark.parametrize(
    "environ, match",
    [
        (
            {"JAX_COORDINATOR_ADDRESS": "localhost:1234"},
            "JAX_NUM_PROCESSES.*JAX_PROCESS_ID",
        ),
        (
            {
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2",
                "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            },
            "KERAS_DISTRIBUTION_PROCESS_ID or JAX_PROCESS_ID",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1234",
                "JAX_NUM_PROCESSES": "0",
                "JAX_PROCESS_ID": "0",
            },
            r"JAX_NUM_PROCESSES must be an integer >= 1, got '0'",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1234",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "2",
            },
            r"JAX_PROCESS_ID must be an integer in \[0, 1\], got '2'",
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "localhost:1234",
                "JAX_NUM_PROCESSES": "two",
                "JAX_PROCESS_ID": "0",
            },
            "JAX_NUM_PROCESSES must be an integer",
        ),
        (
            {
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2",
                "JAX_COORDINATOR_ADDRESS": "b:2",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
            },
            "KERAS_DISTRIBUTION_JOB_ADDRESSES='a:1' and "
            "JAX_COORDINATOR_ADDRESS='b:2' disagree",
        ),
    ],
)
def test_initialize_from_environment_rejects_bad_settings(environ, match):
    with pytest.raises(ValueError, match=match):
        initialize_from_environment(environ)
