"""The public API: argument validation, `compile(seht=...)`, the registry,
save/load round trips and the package metadata.

Backend-agnostic: runs unchanged under KERAS_BACKEND=torch, jax and
tensorflow.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import compile_plain, make_data, tanh_mlp

import keras_seht
from keras_seht import SEHTD, SEHTH, regularizers
from keras_seht.estimators import CurvatureEstimator

ROOT = pathlib.Path(__file__).resolve().parents[1]

NON_DEFAULT = [
    SEHTH(max_iter=3, strength=0.02),
    SEHTD(
        p=0.05,
        max_iter=2,
        strength=0.01,
        layer_p=0.5,
        include_output_layer=False,
        unbiased=True,
    ),
]


def _ids(estimators):
    return [type(e).__name__ for e in estimators]


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------

P_RANGE = r"`p` must be in the interval \(0, 0\.5\]"
LAYER_P_RANGE = r"`layer_p` must be in the interval \(0, 1\]"
MAX_ITER_RANGE = r"`max_iter` must be an integer >= 1"
STRENGTH_RANGE = r"`strength` must be a finite number >= 0"

# (Loops rather than parametrization: conftest's per-test clear_session
# costs ~0.5 s, and these checks are pure Python.)


def test_sehtd_p_range():
    for p in [0, 0.0, -0.1, 0.6, 1.0, math.nan, math.inf, "abc", None]:
        with pytest.raises(ValueError, match=P_RANGE):
            SEHTD(p=p)
    for p in [1e-6, 0.01, 0.5, np.float32(0.25)]:
        assert SEHTD(p=p).p == pytest.approx(float(p))


def test_sehtd_layer_p_range():
    for layer_p in [0, -0.5, 1.01, 2, math.nan, "x"]:
        with pytest.raises(ValueError, match=LAYER_P_RANGE):
            SEHTD(p=0.05, layer_p=layer_p)
    for layer_p in [1e-3, 0.5, 1, 1.0]:
        assert SEHTD(p=0.05, layer_p=layer_p).layer_p == float(layer_p)


@pytest.mark.parametrize("cls", [SEHTH, SEHTD])
def test_max_iter_range(cls):
    for max_iter in [0, -1, 1.5, 2.0, True, "3", None]:
        with pytest.raises(ValueError, match=MAX_ITER_RANGE):
            cls(max_iter=max_iter)
    assert cls(max_iter=1).max_iter == 1
    estimator = cls(max_iter=np.int64(4))
    assert estimator.max_iter == 4 and type(estimator.max_iter) is int


@pytest.mark.parametrize("cls", [SEHTH, SEHTD])
def test_strength_range(cls):
    for strength in [-1e-3, -1, math.nan, math.inf, -math.inf, "x", None]:
        with pytest.raises(ValueError, match=STRENGTH_RANGE):
            cls(strength=strength)
    assert cls(strength=0).strength == 0.0
    assert cls(strength=2).strength == 2.0


def test_sehtd_bool_flags_validated():
    for name in ["include_output_layer", "unbiased"]:
        with pytest.raises(ValueError, match=f"`{name}` must be a bool"):
            SEHTD(**{name: "yes"})


def test_error_messages_show_received_value():
    with pytest.raises(ValueError, match=r"Received: p=0\.6"):
        SEHTD(p=0.6)
    with pytest.raises(ValueError, match=r"Received: layer_p=0"):
        SEHTD(layer_p=0)
    with pytest.raises(ValueError, match=r"Received: max_iter=0"):
        SEHTH(max_iter=0)
    with pytest.raises(ValueError, match=r"Received: strength=-1"):
        SEHTH(strength=-1)


UNKNOWN = r"Unknown `seht` name: 'nope'.*'seht_d', 'seht_h'"


def test_registry_rejects_bad_identifiers():
    with pytest.raises(ValueError, match=UNKNOWN):
        regularizers.get("nope")
    with pytest.raises(ValueError, match=UNKNOWN):
        regularizers.deserialize({"class_name": "nope", "config": {}})
    with pytest.raises(ValueError, match=UNKNOWN):
        regularizers.get({"class_name": "nope", "p": 0.1})
    with pytest.raises(ValueError, match="needs a 'class_name' key"):
        regularizers.get({"p": 0.05})
    with pytest.raises(ValueError, match="Could not build a `seht`"):
        regularizers.get({"class_name": "SEHTD", "q": 0.05})
    # Values inside a config dict are validated like constructor arguments.
    with pytest.raises(ValueError, match=P_RANGE):
        regularizers.get({"class_name": "seht_d", "config": {"p": 0.9}})
    for identifier in [3, 0.01, object(), keras.layers.Dense]:
        with pytest.raises(ValueError, match="Could not interpret the `seht`"):
            regularizers.get(identifier)


def test_compile_unknown_name():
    model = tanh_mlp()
    with pytest.raises(ValueError, match=UNKNOWN):
        compile_plain(model, seht="nope")
    assert not model.compiled


def test_seht_needs_trainable_weights():
    frozen = keras_seht.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, trainable=False),
            keras.layers.Dense(3, activation="softmax", trainable=False),
        ]
    )
    assert frozen.built and not frozen.trainable_variables
    with pytest.raises(ValueError, match="no trainable weights"):
        compile_plain(frozen, seht=SEHTD(p=0.05))
    # Plain Keras training of a frozen model is still allowed.
    compile_plain(frozen, seht=None)
    assert frozen.seht is None

    model = tanh_mlp()
    model.trainable = False
    with pytest.raises(ValueError, match="no trainable weights"):
        compile_plain(model, seht="seht_h")

    # Not built at compile time: the check happens in the train step.
    unbuilt = keras_seht.Sequential(
        [keras.layers.Dense(3, activation="softmax", trainable=False)]
    )
    compile_plain(unbuilt, seht=SEHTD(p=0.05))
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="no trainable weights"):
        unbuilt.fit(x, y, epochs=1, verbose=0)


def test_fit_unbuilt_model():
    # No Input: built by fit itself, as subclassed models usually are.
    model = keras_seht.Sequential(
        [
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    compile_plain(model, seht=SEHTH(strength=0.01))
    assert not model.built
    x, y = make_data(n=16)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["seht_trace"]).all()


# --------------------------------------------------------------------------
# compile(seht=...) accepts every documented form
# --------------------------------------------------------------------------

ACCEPTED = [
    (SEHTD(p=0.05), SEHTD(p=0.05)),
    (SEHTH(max_iter=2), SEHTH(max_iter=2)),
    ("seht_h", SEHTH()),
    ("seht_d", SEHTD()),
    ("SEHTD", SEHTD()),
    ("SEHTH", SEHTH()),
    (SEHTD, SEHTD()),
    (SEHTH, SEHTH()),
    (regularizers.serialize(SEHTD(p=0.05)), SEHTD(p=0.05)),
    (regularizers.serialize(SEHTH(max_iter=4)), SEHTH(max_iter=4)),
    ({"class_name": "SEHTD", "p": 0.05}, SEHTD(p=0.05)),
    ({"class_name": "seht_h", "max_iter": 5}, SEHTH(max_iter=5)),
    (
        {"class_name": "seht_d", "config": {"p": 0.05, "max_iter": 2}},
        SEHTD(p=0.05, max_iter=2),
    ),
    ({"class_name": "SEHTH", "config": {}}, SEHTH()),
]


def test_compile_accepts_every_form():
    model = tanh_mlp()
    for seht, expected in ACCEPTED:
        compile_plain(model, seht=seht)
        assert isinstance(model.seht, CurvatureEstimator), seht
        assert model.seht == expected, seht
        if isinstance(seht, CurvatureEstimator):
            assert model.seht is seht
        assert regularizers.get(seht) == expected, seht
    compile_plain(model, seht=None)
    assert model.seht is None


def test_compile_none_and_recompile():
    model = compile_plain(tanh_mlp(), seht=None)
    assert model.seht is None
    x, y = make_data(n=8)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "seht_trace" not in history.history

    compile_plain(model, seht="seht_d")
    assert model.seht == SEHTD()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "seht_trace" in history.history
    assert np.isfinite(history.history["seht_trace"]).all()

    compile_plain(model)  # the default is seht=None
    assert model.seht is None
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "seht_trace" not in history.history


def test_evaluate_logs_have_no_seht_entries():
    model = compile_plain(tanh_mlp(), seht=SEHTH(), metrics=["accuracy"])
    x, y = make_data(n=8)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert not any(k.startswith("seht_") for k in logs), logs
    assert set(logs) == {"loss", "accuracy"}


# --------------------------------------------------------------------------
# Registry round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", NON_DEFAULT, ids=_ids(NON_DEFAULT))
def test_registry_round_trip(estimator):
    config = regularizers.serialize(estimator)
    assert isinstance(config, dict) and "class_name" in config
    restored = regularizers.deserialize(config)
    assert restored == estimator and restored is not estimator
    assert restored.get_config() == estimator.get_config()
    # JSON-safe, as `model.save` needs.
    restored = regularizers.deserialize(json.loads(json.dumps(config)))
    assert restored == estimator
    assert regularizers.get(config) == estimator


@pytest.mark.parametrize("estimator", NON_DEFAULT, ids=_ids(NON_DEFAULT))
def test_keras_saving_round_trip(estimator):
    config = keras.saving.serialize_keras_object(estimator)
    config = json.loads(json.dumps(config))
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(estimator)
    assert restored == estimator
    assert keras.saving.get_registered_object(
        f"keras_seht>{type(estimator).__name__}"
    ) is type(estimator)


@pytest.mark.parametrize("estimator", NON_DEFAULT, ids=_ids(NON_DEFAULT))
def test_from_config_round_trip(estimator):
    restored = type(estimator).from_config(estimator.get_config())
    assert restored == estimator
    assert hash(restored) == hash(estimator)
    assert repr(restored) == repr(estimator)


def test_sehtd_default_layer_p_follows_p():
    estimator = SEHTD(p=0.05)
    assert estimator.layer_p == 0.05
    assert estimator.get_config()["layer_p"] is None
    assert regularizers.deserialize(
        regularizers.serialize(estimator)
    ).layer_p == pytest.approx(0.05)


def test_estimators_of_different_classes_differ():
    assert SEHTH() != SEHTD()
    assert SEHTD(p=0.01) != SEHTD(p=0.05)
    assert SEHTD(p=0.05) == SEHTD(p=0.05)


# --------------------------------------------------------------------------
# Save / load round trips
# --------------------------------------------------------------------------


def _plain_sequential():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _functional(cls):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return cls(inputs, outputs)


BUILDERS = {
    "sequential": tanh_mlp,
    "functional": lambda: _functional(keras_seht.Model),
    "wrap_sequential": lambda: keras_seht.wrap(_plain_sequential()),
    "wrap_functional": lambda: keras_seht.wrap(_functional(keras.Model)),
}


def _check_round_trip(model, path, x, y):
    """Saves, loads, and checks the loaded model against `model`."""
    model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded) is type(model)
    assert loaded.seht == model.seht
    if model.seht is not None:
        assert loaded.seht is not model.seht
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )
    steps = int(model.optimizer.iterations)
    assert int(loaded.optimizer.iterations) == steps

    history = loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert ("seht_trace" in history.history) == (model.seht is not None)
    for values in history.history.values():
        assert np.isfinite(values).all()
    assert int(loaded.optimizer.iterations) == 2 * steps
    return loaded


@pytest.mark.parametrize(
    "kind",
    [
        "sequential",
        # The other model types differ in their (backend-independent)
        # configs only; "sequential" runs the loaded model's SEHT step on
        # every backend (single_backend: see conftest).
        *(
            pytest.param(kind, marks=pytest.mark.single_backend)
            for kind in list(BUILDERS)[1:]
        ),
    ],
)
def test_save_load_round_trip(kind, tmp_path):
    x, y = make_data(n=16)
    model = BUILDERS[kind]()
    assert isinstance(model, (keras_seht.Model, keras_seht.Sequential))
    estimator = SEHTD(p=0.05, strength=0.01, layer_p=0.5, unbiased=True)
    compile_plain(model, seht=estimator, metrics=["accuracy"])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    _check_round_trip(model, tmp_path / "m.keras", x, y)


def test_save_load_without_seht(tmp_path):
    x, y = make_data(n=8)
    model = compile_plain(tanh_mlp(), seht=None)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    loaded = _check_round_trip(model, tmp_path / "m.keras", x, y)
    assert loaded.seht is None


# A subclassed keras_seht.Model, saved and loaded in a fresh process: see
# test_subclass_after_functional_use for why not in this one.
SUBCLASS_SCRIPT = """
import json, sys
import keras, numpy as np
import keras_seht


@keras.saving.register_keras_serializable(package="keras_seht_tests")
class SubclassedMLP(keras_seht.Model):
    def __init__(self, hidden=5, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.classes = hidden, classes
        self.dense_1 = keras.layers.Dense(hidden, activation="tanh")
        self.dense_2 = keras.layers.Dense(classes, activation="softmax")

    def call(self, inputs):
        return self.dense_2(self.dense_1(inputs))

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden, classes=self.classes)
        return config


rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.integers(0, 3, size=(16,)).astype("int32")
model = SubclassedMLP(hidden=4)
model(x[:1])  # built before fit: see test_fit_unbuilt_model
estimator = keras_seht.SEHTH(max_iter=2, strength=0.01)
model.compile("sgd", "sparse_categorical_crossentropy", seht=estimator)
model.fit(x, y, batch_size=8, epochs=1, verbose=0)
model.save(sys.argv[1])
loaded = keras.models.load_model(sys.argv[1])
max_abs_diff = float(np.max(np.abs(
    loaded.predict(x, verbose=0) - model.predict(x, verbose=0))))
history = loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
print("RESULT" + json.dumps({
    "type": type(loaded).__name__,
    "hidden": loaded.hidden,
    "seht_equal": loaded.seht == model.seht,
    "max_abs_diff": max_abs_diff,
    "iterations": int(loaded.optimizer.iterations),
    "history": {k: [float(v) for v in vs]
                for k, vs in history.history.items()},
}))
"""


def test_save_load_subclassed_model(tmp_path):
    script = tmp_path / "subclass.py"
    script.write_text(SUBCLASS_SCRIPT)
    env = dict(
        os.environ,
        KERAS_BACKEND=keras.config.backend(),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path),
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.keras")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(
        ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")
    )
    result = json.loads(line[len("RESULT") :])
    assert result["type"] == "SubclassedMLP"
    assert result["hidden"] == 4
    assert result["seht_equal"]
    assert result["max_abs_diff"] < 1e-6
    assert result["iterations"] == 4  # 2 steps before saving, 2 after
    assert "seht_trace" in result["history"]
    assert np.isfinite(result["history"]["seht_trace"]).all()


class SubclassedSEHT(keras_seht.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.dense(inputs)


def test_subclass_after_functional_use():
    _functional(keras_seht.Model)  # functional use, as wrap() does too
    model = SubclassedSEHT()
    x, y = make_data(n=8)
    compile_plain(model, seht="seht_h")
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "seht_trace" in history.history
    assert keras_seht.Model.__bases__[-1] is keras.Model


@keras.saving.register_keras_serializable(package="keras_seht_tests")
class FunctionalTask(keras_seht.Model):
    """Built functionally inside __init__, like keras-hub's Task models."""

    def __init__(self, units=3, **kwargs):
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(units, activation="softmax")(inputs)
        super().__init__(inputs, outputs, **kwargs)
        self.units = units

    def get_config(self):
        return {"units": self.units, "name": self.name}


def test_functional_subclass_trains_and_round_trips(tmp_path):
    model = FunctionalTask()
    assert isinstance(model, keras_seht.Model)
    assert isinstance(model, keras_seht.model.FunctionalModel)
    compile_plain(model, seht=SEHTD(p=0.2))
    x, y = make_data(n=8)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "task.keras")
    loaded = keras.models.load_model(tmp_path / "task.keras")
    assert type(loaded) is FunctionalTask
    assert loaded.seht == model.seht
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        rtol=1e-6,
    )
    # Plain subclasses of keras_seht.Model still work afterwards.
    assert "seht_trace" in _fit_subclass()


def _fit_subclass():
    model = SubclassedSEHT()
    x, y = make_data(n=8)
    compile_plain(model, seht="seht_h")
    return model.fit(x, y, batch_size=8, epochs=1, verbose=0).history


def test_constant_hessian_trains():
    """Linear model + MSE: t does not depend on w (dt/dw = 0)."""
    model = keras_seht.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse", seht=SEHTH(max_iter=4))
    x = np.ones((4, 4), "float32")
    y = np.ones((4, 2), "float32")
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["seht_trace"]).all()
    # H = 1_5 1_5^T per output (inputs of ones): the exact trace is 2 * 5.
    np.testing.assert_allclose(keras_seht.exact_hessian_trace(model, x, y), 10)


def test_wrap_shares_layers_and_weights():
    base = _functional(keras.Model)
    wrapped = keras_seht.wrap(base)
    assert isinstance(wrapped, keras_seht.Model)
    assert wrapped.layers[-1] is base.layers[-1]
    x, _ = make_data(n=4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(wrapped(x)),
        keras.ops.convert_to_numpy(base(x)),
        rtol=1e-6,
    )
    assert keras_seht.wrap(wrapped) is wrapped
    sequential = _plain_sequential()
    wrapped = keras_seht.wrap(sequential)
    assert isinstance(wrapped, keras_seht.Sequential)
    assert wrapped.layers[-1] is sequential.layers[-1]


class _PlainSubclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.dense(inputs)


def test_wrap_rejects_subclassed_and_non_models():
    model = _PlainSubclassed()
    with pytest.raises(TypeError, match="Cannot wrap the subclassed model"):
        keras_seht.wrap(model)
    model(np.zeros((1, 6), "float32"))  # built, eagerly
    with pytest.raises(TypeError, match="Cannot wrap the subclassed model"):
        keras_seht.wrap(model)
    for obj in [keras.layers.Dense(3), "model", None]:
        with pytest.raises(TypeError, match="must be a keras.Model"):
            keras_seht.wrap(obj)


# --------------------------------------------------------------------------
# Hessian diagnostics: argument checks
# --------------------------------------------------------------------------


def _big_model():
    # 100 * 200 + 200 = 20,200 trainable weights.
    model = keras_seht.Sequential(
        [keras.Input((100,)), keras.layers.Dense(200, activation="softmax")]
    )
    return compile_plain(model)


def test_exact_hessian_trace_refuses_large_models():
    model = _big_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 100)).astype("float32")
    y = np.array([0, 1], "int32")
    with pytest.raises(
        ValueError,
        match=r"20200 trainable weights, more than `max_weights`=20000"
        r".*force=True",
    ):
        keras_seht.exact_hessian_trace(model, x, y)
    with pytest.raises(ValueError, match="`max_weights`=20000"):
        keras_seht.hessian_diagonal(model, x, y)


def test_exact_hessian_trace_max_weights_and_force():
    model = compile_plain(tanh_mlp())  # 35 + 30 + 18 = 83 weights
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="83 trainable weights"):
        keras_seht.exact_hessian_trace(model, x, y, max_weights=10)
    forced = keras_seht.exact_hessian_trace(
        model, x, y, max_weights=10, force=True
    )
    assert forced == pytest.approx(
        keras_seht.exact_hessian_trace(model, x, y), rel=1e-6
    )
    assert math.isfinite(forced)


def test_hessian_trace_validates_samples():
    model = compile_plain(tanh_mlp())
    x, y = make_data(n=8)
    for samples in [0, -1, 1.5, True, "10", None]:
        with pytest.raises(ValueError, match="`samples` must be an integer"):
            keras_seht.hessian_trace(model, x, y, samples=samples)
    with pytest.raises(ValueError, match=UNKNOWN):
        keras_seht.hessian_trace(model, x, y, estimator="nope")
    with pytest.raises(ValueError, match="`method` must be 'exact'"):
        keras_seht.hessian_diagonal(model, x, y, method="bogus")


def test_hessian_functions_need_compiled_model():
    x, y = make_data(n=8)
    with pytest.raises(ValueError, match="must be compiled"):
        keras_seht.exact_hessian_trace(tanh_mlp(), x, y)
    with pytest.raises(ValueError, match="must be compiled"):
        keras_seht.hessian_trace(tanh_mlp(), x, y, samples=2)
    with pytest.raises(TypeError, match="must be a keras.Model"):
        keras_seht.hessian_trace("model", x, y, samples=2)


def test_hessian_trace_smoke():
    model = compile_plain(tanh_mlp())
    x, y = make_data(n=8)
    mean, std_error = keras_seht.hessian_trace(
        model, x, y, samples=3, seed=0, return_std_error=True
    )
    assert math.isfinite(mean) and math.isfinite(std_error)
    again = keras_seht.hessian_trace(model, x, y, samples=3, seed=0)
    assert again == pytest.approx(mean, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------
# Package metadata
# --------------------------------------------------------------------------


def test_all_names_exist():
    assert len(set(keras_seht.__all__)) == len(keras_seht.__all__)
    for name in keras_seht.__all__:
        assert hasattr(keras_seht, name), name
    for name in ["Model", "Sequential", "wrap", "SEHTD", "SEHTH"]:
        assert name in keras_seht.__all__
    for name in ["hessian_trace", "exact_hessian_trace", "regularizers"]:
        assert name in keras_seht.__all__
    assert "GradientBound" in keras_seht.__all__
    assert keras_seht.GradientBound is keras_seht.safeguard.GradientBound
    assert "distributed" in keras_seht.__all__
    for name in [
        "rank",
        "world_size",
        "is_chief",
        "setup_from_environment",
        "shard",
        "ShardedDataset",
        "WorkerError",
    ]:
        assert hasattr(keras_seht.distributed, name), name


def test_version_matches_pyproject():
    # A regex, not tomllib: the package supports Python 3.10.
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', text, re.M)
    match = re.search(
        r'^version\s*=\s*\{\s*attr\s*=\s*"([\w.]+)"\s*\}', text, re.M
    )
    assert match, "pyproject.toml: no [tool.setuptools.dynamic] version attr"
    module_name, _, name = match.group(1).rpartition(".")
    expected = getattr(importlib.import_module(module_name), name)
    assert keras_seht.__version__ == expected
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", keras_seht.__version__)
