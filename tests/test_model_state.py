"""What a keras-seht model holds: Keras state, and its `seht` argument.

With ``seht=None`` a `keras_seht.Model` / `Sequential` holds exactly the
state of the plain Keras model (the same variables, the same state tree);
``compile(seht=...)`` adds one tracked seed generator, whose state the
train step advances on every backend (JAX threads it through its compiled
step). A ``seht`` argument that names no penalty, given to ``compile`` or
read from a tampered ``.keras`` file, raises ``ValueError`` before the
model changes.
"""

from __future__ import annotations

import json
import re
import zipfile

import keras
import numpy as np
import pytest
from conftest import make_data

import keras_seht
from keras_seht import SEHTD, SEHTH, regularizers

LOSS = "sparse_categorical_crossentropy"
D, K = 6, 3


def _sequential(cls):
    return cls(
        [
            keras.Input((D,)),
            keras.layers.Dense(5, activation="tanh", name="hidden"),
            keras.layers.Dense(K, activation="softmax", name="output"),
        ]
    )


def _functional(cls):
    inputs = keras.Input((D,))
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(K, activation="softmax", name="output")(h)
    return cls(inputs, outputs)


def _subclassed(cls):
    class Net(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(
                5, activation="tanh", name="hidden"
            )
            self.out = keras.layers.Dense(
                K, activation="softmax", name="output"
            )

        def call(self, x):
            return self.out(self.hidden(x))

    model = Net()
    model(np.zeros((1, D), "float32"))  # built: Keras locks its state
    return model


STYLES = {
    "sequential": (_sequential, keras_seht.Sequential, keras.Sequential),
    "functional": (_functional, keras_seht.Model, keras.Model),
    "subclassed": (_subclassed, keras_seht.Model, keras.Model),
}


def _pair(style):
    """The same model built with keras_seht's class and with Keras'."""
    build, ours, theirs = STYLES[style]
    return build(ours), build(theirs)


def _unnumbered(name):
    """`name` without Keras' uniquifying suffixes (``sgd_1`` -> ``sgd``)."""
    return "/".join(re.sub(r"_\d+$", "", part) for part in name.split("/"))


def _shapes(tree):
    if isinstance(tree, dict):
        return {_unnumbered(k): _shapes(v) for k, v in tree.items()}
    return tuple(tree.shape)


def _state(model):
    """Variable paths, and (once compiled) the state tree's shapes."""
    paths = [_unnumbered(v.path) for v in model.variables]
    if not model.compiled:  # get_state_tree reads the optimizer
        return paths
    return paths, _shapes(model.get_state_tree())


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable.value)


def _holds(variables, variable):
    return any(v is variable for v in variables)


# --------------------------------------------------------------------------
# seht=None: plain Keras state
# --------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_seht_none_state_is_plain_keras_state(style):
    model, plain = _pair(style)
    assert _state(model) == _state(plain)
    model.compile("sgd", LOSS, seht=None)
    plain.compile("sgd", LOSS)
    assert _state(model) == _state(plain)
    assert not hasattr(model, "seht_seed_generator")
    assert len(model.non_trainable_variables) == 0


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quan")
def test_seht_none_quantizes_like_plain_keras():
    model, plain = _pair("functional")
    for m in (model, plain):
        m.compile("sgd", LOSS)
        m.quantize("int8")
    assert _state(model) == _state(plain)


# --------------------------------------------------------------------------
# compile(seht=...): one tracked seed generator
# --------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_compile_with_seht_adds_one_seed_generator(style):
    model, plain = _pair(style)
    model.compile("sgd", LOSS, seht=SEHTH())
    generator = model.seht_seed_generator
    assert isinstance(generator, keras.random.SeedGenerator)
    # Tracked: among the state the JAX step threads through.
    assert _holds(model.non_trainable_variables, generator.state)
    assert len(model.variables) == len(plain.variables) + 1
    # Later compiles, with or without `seht`, reuse it.
    model.compile("sgd", LOSS, seht=SEHTD(p=0.1))
    assert model.seht_seed_generator is generator
    model.compile("sgd", LOSS)
    assert model.seht_seed_generator is generator
    assert len(model.variables) == len(plain.variables) + 1


def test_built_subclassed_model_stays_locked_after_compile():
    model, _ = _pair("subclassed")
    lock = "cannot add new elements of state"
    with pytest.raises(ValueError, match=lock):
        model.extra = keras.Variable(1.0)
    model.compile(keras.optimizers.SGD(0.1), LOSS, seht=SEHTH())
    assert _holds(
        model.non_trainable_variables, model.seht_seed_generator.state
    )
    with pytest.raises(ValueError, match=lock):
        model.extra = keras.Variable(1.0)
    x, y = make_data(n=8, d=D, k=K)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["seht_trace"])


class _BatchTraces(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.traces: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.traces.append(float(logs["seht_trace"]))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_fit_advances_the_seed_state(style):
    """Fresh probes every step of a compiled loop (JAX's included)."""
    model, _ = _pair(style)
    # A zero learning rate: only the probes can change the trace.
    model.compile(keras.optimizers.SGD(0.0), LOSS, seht=SEHTH())
    before = _numpy(model.seht_seed_generator.state)
    traces = _BatchTraces()
    x, y = make_data(n=24, d=D, k=K)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[traces])
    assert not np.array_equal(_numpy(model.seht_seed_generator.state), before)
    assert len(set(traces.traces)) == 3


@pytest.mark.parametrize("style", ["sequential", "subclassed"])
def test_seht_compile_after_a_plain_fit(style):
    """The generator arrives after a plain step was compiled and run."""
    model, _ = _pair(style)
    x, y = make_data(n=24, d=D, k=K)
    model.compile(keras.optimizers.SGD(0.0), LOSS)
    model.fit(x, y, batch_size=8, verbose=0)
    model.compile(keras.optimizers.SGD(0.0), LOSS, seht=SEHTH())
    traces = _BatchTraces()
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[traces])
    assert len(set(traces.traces)) == 3


@pytest.mark.parametrize("seht", [None, SEHTD(p=0.1)], ids=["none", "sehtd"])
@pytest.mark.parametrize("style", ["sequential", "functional"])
def test_save_load_keeps_the_state(style, seht, tmp_path):
    model, plain = _pair(style)
    model.compile("sgd", LOSS, seht=seht)
    plain.compile("sgd", LOSS)
    model.save(tmp_path / "model.keras")
    plain.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    plain_loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert type(loaded) is type(model)
    assert loaded.seht == seht
    if seht is None:
        assert _state(loaded) == _state(plain_loaded)
        assert not hasattr(loaded, "seht_seed_generator")
    else:
        generator = loaded.seht_seed_generator
        assert _holds(loaded.non_trainable_variables, generator.state)
        count = len(plain_loaded.variables) + 1
        assert len(loaded.variables) == count
    x, y = make_data(n=8, d=D, k=K)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    loaded.train_on_batch(x, y)


# --------------------------------------------------------------------------
# A `seht` that names no penalty
# --------------------------------------------------------------------------

BOGUS = {
    "class_name": "Bogus",
    "config": {},
    "registered_name": "keras_seht>Bogus",
}

NOT_PENALTIES = [
    BOGUS,
    {"module": "no.such.module", "class_name": "Bogus", "config": {}},
    {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {"units": 2},
        "registered_name": "Dense",
    },
    {"class_name": "__numpy__", "config": {"value": [1], "dtype": "int32"}},
    {"class_name": None, "config": {}},
    {"class_name": 3, "config": {}},
]
NOT_PENALTY_IDS = ["bogus", "module", "dense", "numpy", "none", "int"]


@pytest.mark.parametrize("config", NOT_PENALTIES, ids=NOT_PENALTY_IDS)
def test_registry_rejects_configs_of_no_penalty(config):
    with pytest.raises(ValueError, match="`seht`"):
        regularizers.get(config)
    with pytest.raises(ValueError, match="`seht`"):
        regularizers.get([SEHTD(), config])


def test_registry_still_resolves_registered_penalties():
    config = regularizers.serialize(SEHTD(p=0.05))
    assert config["registered_name"] == "keras_seht>SEHTD"
    assert regularizers.deserialize(config) == SEHTD(p=0.05)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_bad_seht_leaves_an_uncompiled_model_unchanged(style):
    model, _ = _pair(style)
    state = _state(model)
    with pytest.raises(ValueError, match="`seht`"):
        model.compile("sgd", LOSS, seht=BOGUS)
    assert not model.compiled
    assert getattr(model, "optimizer", None) is None
    assert model.seht is None and model.seht_penalties == []
    assert model.get_compile_config() == {}
    assert not hasattr(model, "seht_seed_generator")
    assert _state(model) == state


@pytest.mark.parametrize("style", sorted(STYLES))
def test_bad_seht_keeps_the_previous_compile(style):
    model, _ = _pair(style)
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer, LOSS, seht=SEHTD(p=0.1))
    config = model.get_compile_config()
    generator = model.seht_seed_generator
    with pytest.raises(ValueError, match="`seht`"):
        model.compile("adam", "mse", seht=BOGUS)
    assert model.optimizer is optimizer
    assert model.seht == SEHTD(p=0.1)
    assert model.get_compile_config() == config
    assert model.seht_seed_generator is generator
    x, y = make_data(n=8, d=D, k=K)
    assert "seht_trace" in model.train_on_batch(x, y, return_dict=True)


def _tamper(path, seht):
    """Rewrites the `seht` entry of the compile config in a .keras file."""
    with zipfile.ZipFile(path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(entries["config.json"])
    assert "seht" in config["compile_config"]
    config["compile_config"]["seht"] = seht
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("seht", [BOGUS, [BOGUS]], ids=["dict", "list"])
def test_tampered_keras_file_raises_value_error(seht, tmp_path):
    model, _ = _pair("sequential")
    model.compile("sgd", LOSS, seht=SEHTD(p=0.1))
    path = tmp_path / "model.keras"
    model.save(path)
    assert keras.models.load_model(path).seht == SEHTD(p=0.1)
    _tamper(path, seht)
    with pytest.raises(ValueError, match="`seht`.*Bogus"):
        keras.models.load_model(path)


# --------------------------------------------------------------------------
# The probe seed stream survives save / load
# --------------------------------------------------------------------------


def _weights(model):
    return [_numpy(v) for v in model.trainable_variables]


@pytest.mark.parametrize("style", ["sequential", "functional"])
def test_training_continues_the_probe_stream_after_load(style, tmp_path):
    """1 epoch, save, load, 1 epoch == 2 epochs uninterrupted."""
    x, y = make_data(n=24, d=D, k=K)

    def fresh():
        keras.utils.set_random_seed(0)
        model, _ = _pair(style)
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            LOSS,
            seht=SEHTH(max_iter=2, strength=0.5),
        )
        return model

    fit = {"batch_size": 8, "shuffle": False, "verbose": 0}
    whole = fresh()
    whole.fit(x, y, epochs=2, **fit)
    first = fresh()
    first.fit(x, y, epochs=1, **fit)
    state = _numpy(first.seht_seed_generator.state)
    first.save(tmp_path / "model.keras")
    keras.utils.set_random_seed(123)  # the stream must not restart from here
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(
        _numpy(loaded.seht_seed_generator.state), state
    )
    loaded.fit(x, y, epochs=1, **fit)
    for got, want in zip(_weights(loaded), _weights(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weights_files_carry_the_probe_seed_state(tmp_path):
    model, _ = _pair("sequential")
    model.compile("sgd", LOSS, seht=SEHTH())
    x, y = make_data(n=8, d=D, k=K)
    model.train_on_batch(x, y)
    model.save_weights(tmp_path / "w.weights.h5")
    other, _ = _pair("sequential")
    other.compile("sgd", LOSS, seht=SEHTH())
    other.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(
        _numpy(other.seht_seed_generator.state),
        _numpy(model.seht_seed_generator.state),
    )
    plain, _ = _pair("sequential")  # seht=None: the entry is ignored
    plain.compile("sgd", LOSS)
    plain.load_weights(tmp_path / "w.weights.h5")
    assert not hasattr(plain, "seht_seed_generator")
