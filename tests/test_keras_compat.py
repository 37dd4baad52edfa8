"""The Keras internals keras-seht relies on (``keras_seht/_keras_compat.py``).

Every function there reads a private Keras attribute. These tests check
each one against the installed Keras, so that an upgrade renaming or
changing one fails here, with a message saying what changed, instead of
deep inside a train step.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import types

import keras
import numpy as np
import pytest
from conftest import compile_plain, make_data, tanh_mlp

import keras_seht
from keras_seht import _keras_compat as compat

ROOT = pathlib.Path(__file__).resolve().parents[1]
L2 = 0.05


def _keras_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", keras.__version__)
    assert match, f"unparseable keras.__version__={keras.__version__!r}"
    return int(match.group(1)), int(match.group(2))


def _regularized_functional(cls=keras.Model):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(
        5,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(L2),
    )(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return cls(inputs, outputs)


class _WithTraining(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs, training=None):
        return self.dense(inputs)


class _WithoutTraining(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.dense(inputs)


def _models():
    return {
        "sequential": keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(3)]
        ),
        "functional": _regularized_functional(),
        "subclassed": _WithTraining(),
        "keras_seht.Sequential": tanh_mlp(),
    }


def _np(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), "float64")


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------


def test_installed_keras_is_a_tested_version():
    low, high = compat.TESTED_KERAS
    assert low <= high
    version = _keras_version()
    assert low <= version <= high, (
        f"Installed Keras {keras.__version__} is outside the range "
        f"keras_seht/_keras_compat.py declares as tested "
        f"({low[0]}.{low[1]} to {high[0]}.{high[1]}). Run this test file, "
        "then widen TESTED_KERAS (and pyproject.toml's comment) if it "
        "passes."
    )


def test_tested_range_agrees_with_pyproject():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    low, high = compat.TESTED_KERAS

    requirement = re.search(r'"keras>=(\d+)\.(\d+)(?:,<(\d+))?', text)
    assert requirement, "pyproject.toml: no `keras>=X.Y` dependency"
    minimum = (int(requirement.group(1)), int(requirement.group(2)))
    assert minimum == low, (
        f"pyproject.toml requires keras>={minimum[0]}.{minimum[1]} but "
        f"_keras_compat.TESTED_KERAS starts at {low[0]}.{low[1]}"
    )
    if requirement.group(3) is not None:
        assert int(requirement.group(3)) > high[0]

    comment = re.search(r"Tested with Keras (\d+)\.(\d+) to (\d+)\.(\d+)", text)
    assert comment, "pyproject.toml: no 'Tested with Keras A to B' comment"
    numbers = [int(g) for g in comment.groups()]
    assert ((numbers[0], numbers[1]), (numbers[2], numbers[3])) == (
        low,
        high,
    ), "pyproject.toml's tested-range comment disagrees with TESTED_KERAS"


# --------------------------------------------------------------------------
# check_model
# --------------------------------------------------------------------------


def test_required_attributes_exist():
    for kind, model in _models().items():
        missing = [
            name
            for name in compat.REQUIRED_MODEL_ATTRIBUTES
            if not hasattr(model, name)
        ]
        assert not missing, (
            f"Keras {keras.__version__} models ({kind}) lack the internals "
            f"keras-seht uses: {missing}; update keras_seht/_keras_compat.py"
        )
        compat.check_model(model)  # must not raise


def test_check_model_reports_missing_attributes():
    fake = types.SimpleNamespace(_compute_loss=None)
    with pytest.raises(RuntimeError) as info:
        compat.check_model(fake)
    message = str(info.value)
    assert keras.__version__ in message
    assert "_call_has_training_arg" in message
    assert "_loss_tracker" in message
    assert "'_compute_loss'" not in message
    low, high = compat.TESTED_KERAS
    assert str(low) in message and str(high) in message


def test_compile_runs_check_model():
    model = tanh_mlp()
    # A Keras without the internals: compile(seht=...) must refuse early.
    del model._loss_tracker
    if hasattr(model, "_loss_tracker"):  # a class attribute in this Keras
        pytest.skip("_loss_tracker cannot be removed from an instance")
    with pytest.raises(RuntimeError, match="_loss_tracker"):
        compile_plain(model, seht="seht_d")


# --------------------------------------------------------------------------
# call_has_training_arg
# --------------------------------------------------------------------------


def test_call_has_training_arg():
    with_training = _WithTraining()
    without_training = _WithoutTraining()
    assert compat.call_has_training_arg(with_training) is True
    assert compat.call_has_training_arg(without_training) is False
    for kind, model in _models().items():
        expected = "training" in inspect.signature(model.call).parameters
        assert compat.call_has_training_arg(model) is expected, kind
    # Sequential and functional models always take `training`.
    assert compat.call_has_training_arg(keras.Sequential([keras.Input((2,))]))
    assert compat.call_has_training_arg(_regularized_functional())


# --------------------------------------------------------------------------
# compute_loss
# --------------------------------------------------------------------------


def test_compute_loss_matches_model_compute_loss():
    model = _regularized_functional(keras_seht.Model)
    compile_plain(model)
    x, y = make_data(n=16)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    y_pred = model(x, training=True)

    for sample_weight in (None, weights):
        for training in (True, False):
            ours = compat.compute_loss(
                model, x, y, y_pred, sample_weight, training
            )
            theirs = model.compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
            np.testing.assert_allclose(_np(ours), _np(theirs), rtol=1e-6)

    # ... and is the compiled loss plus the weight regularizer.
    probs = _np(y_pred)
    crossentropy = -np.log(probs[np.arange(len(y)), y])
    kernel = _np(model.layers[1].kernel)
    expected = crossentropy.mean() + L2 * np.sum(kernel**2)
    loss = compat.compute_loss(model, x, y, y_pred, None, True)
    assert _np(loss).shape == ()
    np.testing.assert_allclose(_np(loss), expected, rtol=1e-5)
    weighted = compat.compute_loss(model, x, y, y_pred, weights, True)
    expected = np.mean(crossentropy * weights) + L2 * np.sum(kernel**2)
    np.testing.assert_allclose(_np(weighted), expected, rtol=1e-5)


class _OldStyleOverride(keras_seht.Model):
    """Overrides compute_loss without `training` (Keras < 3.3 style)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        return super().compute_loss(x, y, y_pred, sample_weight) + 1.0


class _NewStyleOverride(keras_seht.Model):
    """Overrides compute_loss with `training`."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x, y, y_pred, sample_weight, training=training
        )
        return loss + (10.0 if training else 20.0)


def test_compute_loss_honours_overrides():
    x, y = make_data(n=8)

    def build(cls):
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(3, activation="softmax")(inputs)
        return compile_plain(cls(inputs, outputs))

    base = build(keras_seht.Model)
    y_pred = base(x)
    plain = _np(compat.compute_loss(base, x, y, y_pred, None, True))

    old = build(_OldStyleOverride)
    old.set_weights(base.get_weights())
    for training in (True, False):
        np.testing.assert_allclose(
            _np(compat.compute_loss(old, x, y, y_pred, None, training)),
            plain + 1.0,
            rtol=1e-6,
        )

    new = build(_NewStyleOverride)
    new.set_weights(base.get_weights())
    np.testing.assert_allclose(
        _np(compat.compute_loss(new, x, y, y_pred, None, True)),
        plain + 10.0,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _np(compat.compute_loss(new, x, y, y_pred, None, False)),
        plain + 20.0,
        rtol=1e-6,
    )


# --------------------------------------------------------------------------
# loss_tracker
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seht", [None, "seht_h"])
def test_loss_tracker_is_what_fit_logs(seht):
    model = tanh_mlp()
    compile_plain(model, seht=seht, metrics=["accuracy"])
    tracker = compat.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean)
    assert tracker.name == "loss"
    assert any(m is tracker for m in model.metrics)

    x, y = make_data(n=16)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert compat.loss_tracker(model) is tracker
    np.testing.assert_allclose(
        float(tracker.result()), history.history["loss"][-1], rtol=1e-5
    )
    # Keras weights each batch's loss by its size: 16 samples per epoch.
    assert float(tracker.count) == len(x)

    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(float(tracker.result()), logs["loss"])


def test_loss_tracker_before_compile():
    assert compat.loss_tracker(tanh_mlp()) is None


# --------------------------------------------------------------------------
# Backend-specific Keras APIs the train steps rely on
# --------------------------------------------------------------------------


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX trainer API")
def test_jax_compute_loss_and_updates_contract():
    # keras_seht/backend/jax.py calls this JAX-trainer method directly (not
    # through _keras_compat) and reads the unscaled loss from aux[0].
    model = _regularized_functional(keras_seht.Model)
    compile_plain(model)
    x, y = make_data(n=8)
    parameters = list(
        inspect.signature(model.compute_loss_and_updates).parameters
    )
    assert parameters == [
        "trainable_variables",
        "non_trainable_variables",
        "metrics_variables",
        "x",
        "y",
        "sample_weight",
        "training",
        "optimizer_variables",
    ]
    model.optimizer.build(model.trainable_variables)
    loss, aux = model.compute_loss_and_updates(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables],
        x,
        y,
        None,
        training=True,
        optimizer_variables=[v.value for v in model.optimizer.variables],
    )
    unscaled, y_pred, non_trainable, metrics = aux
    expected = compat.compute_loss(model, x, y, model(x), None, True)
    np.testing.assert_allclose(_np(unscaled), _np(expected), rtol=1e-6)
    np.testing.assert_allclose(_np(loss), _np(unscaled), rtol=1e-6)
    assert len(non_trainable) == len(model.non_trainable_variables)
    assert len(metrics) == len(model.metrics_variables)
