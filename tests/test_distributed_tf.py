"""Data-parallel SEHT under ``tf.distribute`` (TensorFlow backend only).

Each test runs a fresh Python with two logical CPU devices (the device
configuration must be set before TensorFlow starts, so never in the test
process itself) and a ``MirroredStrategy`` over them. With the same seed
every replica draws the same probe, so one step on a global batch under
the strategy must give the single-device step on that batch, to float32
round-off; see `keras_seht.backend.tensorflow.StepRun.all_reduce_mean`.

Round-off bound used throughout: a sum of :math:`n` float32 terms taken
in another order (per replica, then across replicas) differs by at most
about :math:`n \\varepsilon \\sum |\\text{terms}|` (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., Sec. 4.2), with
:math:`\\varepsilon` float32's machine epsilon.
"""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest
from conftest import run_script_result

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="tf.distribute runs under the TensorFlow backend only",
)

EPS = float(np.finfo(np.float32).eps)

_PRELUDE = """
import json
import keras
import numpy as np
import tensorflow as tf
import keras_seht

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
# One MirroredStrategy per process: TensorFlow numbers the collectives of
# every MirroredStrategy from the same keys, so a second one would clash
# with the first's.
MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert MIRRORED.num_replicas_in_sync == 2


def replicas(variable, strategy):
    # Every replica's copy of a variable.
    return [
        np.asarray(t).tolist()
        for t in strategy.experimental_local_results(variable.value)
    ]
"""

_STEP_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 4)).astype("float32")
    Y = rng.integers(0, 3, size=(16,)).astype("int32")
    ESTIMATORS = {
        "seht_h": lambda: keras_seht.SEHTH(max_iter=2, strength=1e-2),
        "seht_d": lambda: keras_seht.SEHTD(p=0.3, strength=1e-2),
    }


    def run(estimator, batchnorm, distributed, x, y, steps):
        keras.utils.set_random_seed(3)
        strategy = MIRRORED if distributed else tf.distribute.get_strategy()
        with strategy.scope():
            layers = [keras.Input((4,)), keras.layers.Dense(6)]
            if batchnorm is not None:
                layers.append(
                    keras.layers.BatchNormalization(
                        synchronized=batchnorm == "synchronized"
                    )
                )
            layers += [
                keras.layers.Activation("tanh"),
                keras.layers.Dense(3, activation="softmax"),
            ]
            model = keras_seht.Sequential(layers)
            model.compile(
                keras.optimizers.SGD(0.1),
                "sparse_categorical_crossentropy",
                seht=ESTIMATORS[estimator](),
            )
        history = model.fit(
            x, y, epochs=steps, batch_size=len(x), shuffle=False, verbose=0
        )
        return {
            "history": history.history,
            "weights": [
                np.asarray(v.value).tolist()
                for v in model.trainable_variables
            ],
            "state": {
                v.path.split("/")[-1]: replicas(v, strategy)
                for v in model.non_trainable_variables
            },
        }


    results = {}
    for estimator in ESTIMATORS:
        for batchnorm in (None, "synchronized", "local"):
            key = f"{estimator}-{batchnorm}"
            results[key] = {
                "single": run(estimator, batchnorm, False, X, Y, 3),
                "parallel": run(estimator, batchnorm, True, X, Y, 3),
            }
        # Local BatchNorm: one step per shard (replica k gets rows 8k..).
        results[f"{estimator}-shards"] = [
            run(estimator, "local", False, X[:8], Y[:8], 1),
            run(estimator, "local", False, X[8:], Y[8:], 1),
        ]
        results[f"{estimator}-local-1"] = run(
            estimator, "local", True, X, Y, 1
        )
    print("RESULT" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def step_results():
    return run_script_result(
        _STEP_SCRIPT, timeout=600, KERAS_BACKEND="tensorflow"
    )


def _assert_weights_close(actual, expected, terms):
    """Each weight to the round-off of `terms` reordered float32 terms."""
    for a, e in zip(actual, expected):
        a, e = np.asarray(a), np.asarray(e)
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=0, atol=terms * EPS * scale)


def _assert_logs_close(actual, expected, terms):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.maximum(1.0, np.abs(expected))
    assert np.all(np.abs(actual - expected) <= terms * EPS * scale), (
        actual,
        expected,
    )


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["seht_h", "seht_d"])
@pytest.mark.parametrize("batchnorm", [None, "synchronized"])
def test_mirrored_steps_match_single_device(step_results, estimator, batchnorm):
    # Without BatchNorm, or with synchronized=True (global batch moments),
    # three steps under MirroredStrategy are the single-device steps on the
    # global batch: weights, logged loss and seht_trace.
    result = step_results[f"{estimator}-{batchnorm}"]
    single, parallel = result["single"], result["parallel"]
    steps, batch = 3, 16
    n = sum(np.asarray(w).size for w in single["weights"])
    # Each step's update sums `batch` per-sample terms; three steps.
    _assert_weights_close(parallel["weights"], single["weights"], steps * batch)
    _assert_logs_close(
        parallel["history"]["loss"], single["history"]["loss"], batch
    )
    # t = sum over the n weights of sigma_i (H sigma)_i.
    _assert_logs_close(
        parallel["history"]["seht_trace"],
        single["history"]["seht_trace"],
        n,
    )
    # The guard's inputs are global: the logged flags are the same.
    for key in ("seht_negative_fraction", "seht_skipped", "seht_step_skipped"):
        assert parallel["history"][key] == single["history"][key], key


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["seht_h", "seht_d"])
def test_seed_state_stays_in_sync(step_results, estimator):
    # Both replicas' SEHT seed generators advance alike, step after step,
    # and as the single-device one does: every replica draws the same probe.
    for batchnorm in (None, "synchronized", "local"):
        result = step_results[f"{estimator}-{batchnorm}"]
        single = result["single"]["state"]["seed_generator_state"]
        parallel = result["parallel"]["state"]["seed_generator_state"]
        assert parallel == [single[0], single[0]], (batchnorm, parallel)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["seht_h", "seht_d"])
def test_synchronized_batchnorm_statistics_match_single_device(
    step_results, estimator
):
    # synchronized=True: the moving statistics are those of the global
    # batch, identical on both replicas.
    result = step_results[f"{estimator}-synchronized"]
    batch = 16
    for name in ("moving_mean", "moving_variance"):
        (single,) = result["single"]["state"][name]
        for copy in result["parallel"]["state"][name]:
            _assert_weights_close([copy], [single], batch)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["seht_h", "seht_d"])
def test_local_batchnorm_is_the_mean_of_shard_steps(step_results, estimator):
    # synchronized=False (Keras' default), as plain Keras on TensorFlow:
    # each replica normalizes with its own shard's moments, so one SGD step
    # is the mean of the single-device steps on each shard (the same probe),
    # the logs are the means of the shard logs, and each replica keeps its
    # own shard's moving statistics (replica 0's are read and saved).
    shards = step_results[f"{estimator}-shards"]
    parallel = step_results[f"{estimator}-local-1"]
    batch = 8
    mean_weights = [
        (np.asarray(a) + np.asarray(b)) / 2
        for a, b in zip(shards[0]["weights"], shards[1]["weights"])
    ]
    _assert_weights_close(parallel["weights"], mean_weights, 2 * batch)
    n = sum(np.asarray(w).size for w in mean_weights)
    for key, terms in (("loss", batch), ("seht_trace", n)):
        mean = (shards[0]["history"][key][0] + shards[1]["history"][key][0]) / 2
        _assert_logs_close(parallel["history"][key], [mean], terms)
    for name in ("moving_mean", "moving_variance"):
        copies = parallel["state"][name]
        for copy, shard in zip(copies, shards):
            _assert_weights_close([copy], shard["state"][name], batch)


_GUARD_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=(32,)).astype("int32")
    x[12, 0] = np.inf  # the first batch's second half: replica 1 only


    def run(distributed):
        keras.utils.set_random_seed(3)
        strategy = MIRRORED if distributed else tf.distribute.get_strategy()
        with strategy.scope():
            model = keras_seht.Sequential([
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3, activation="softmax"),
            ])
            model.compile(
                keras.optimizers.SGD(0.1, momentum=0.9),
                "sparse_categorical_crossentropy",
                seht=keras_seht.SEHTH(max_iter=1, strength=1e-2),
            )
        initial = [np.asarray(v.value).tolist() for v in model.weights]
        skipped = model.train_on_batch(x[:16], y[:16], return_dict=True)
        after_skip = {
            "weights": [replicas(v, strategy) for v in model.weights],
            "iterations": replicas(model.optimizer.iterations, strategy),
        }
        history = model.fit(
            x[16:], y[16:], batch_size=16, shuffle=False, verbose=0
        )
        return {
            "initial": initial,
            "skipped": {k: float(v) for k, v in skipped.items()},
            "after_skip": after_skip,
            "history": history.history,
            "weights": [np.asarray(v.value).tolist() for v in model.weights],
        }


    print("RESULT" + json.dumps({"single": run(False), "parallel": run(True)}))
    """
)


@pytest.mark.slow
def test_non_finite_on_one_replica_skips_on_every_replica():
    # An inf input on replica 1 only: the guard decides on the all-reduced
    # values and gradients, so every replica skips the step (no weight,
    # no optimizer iteration changes), as the single device does on the
    # global batch; the next, finite step then matches the single device.
    result = run_script_result(
        _GUARD_SCRIPT, timeout=600, KERAS_BACKEND="tensorflow"
    )
    single, parallel = result["single"], result["parallel"]
    for run in (single, parallel):
        assert run["skipped"]["seht_step_skipped"] == 1.0
        for copies, initial in zip(
            run["after_skip"]["weights"], run["initial"]
        ):
            assert all(copy == initial for copy in copies)
        assert all(i == 0 for i in run["after_skip"]["iterations"])
    assert (
        parallel["skipped"]["seht_skipped"] == single["skipped"]["seht_skipped"]
    )
    _assert_weights_close(parallel["weights"], single["weights"], 16)
    _assert_logs_close(
        parallel["history"]["loss"], single["history"]["loss"], 16
    )


_DIGITS_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    from keras_seht.data import load_digits
    from keras_seht.experiments.demo import build_mlp

    (x, y), (x_test, y_test) = load_digits()


    def run(distributed):
        keras.utils.set_random_seed(0)
        strategy = MIRRORED if distributed else tf.distribute.get_strategy()
        with strategy.scope():
            model = build_mlp()
            model.compile(
                keras.optimizers.SGD(0.05, momentum=0.9),
                "sparse_categorical_crossentropy",
                metrics=["accuracy"],
                seht=keras_seht.SEHTD(p=0.05, strength=1e-3),
            )
        history = model.fit(
            x, y, epochs=EPOCHS, batch_size=64, shuffle=False, verbose=0
        )
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        return {"history": history.history, "test_accuracy": accuracy}


    print("RESULT" + json.dumps({"single": run(False), "parallel": run(True)}))
    """
)


@pytest.mark.slow
def test_digits_mlp_trains_alike_under_mirrored_strategy():
    # The demo's MLP on digits with SEHT-D, one process vs two replicas:
    # the same accuracy band. The band: two standard errors of the
    # difference of two test accuracies on n samples.
    epochs = 4
    result = run_script_result(
        "EPOCHS = %d\n" % epochs + _DIGITS_SCRIPT,
        timeout=600,
        KERAS_BACKEND="tensorflow",
    )
    single, parallel = result["single"], result["parallel"]
    n = 450
    p = single["test_accuracy"]
    band = 2 * np.sqrt(2 * p * (1 - p) / n)
    # Learned something: far above chance (1 in 10) by that same band.
    assert p > 0.1 + 10 * band, p
    assert abs(parallel["test_accuracy"] - p) <= band, (parallel, p, band)
    for key in ("loss", "seht_trace", "accuracy"):
        assert np.all(np.isfinite(parallel["history"][key])), key


def test_strategy_from_environment_without_tf_config(monkeypatch):
    import tensorflow as tf

    from keras_seht.backend import tensorflow as seht_tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert seht_tf.strategy_from_environment() is None
    assert not tf.distribute.has_strategy()
