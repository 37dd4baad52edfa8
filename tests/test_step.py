"""The one train step (`keras_seht.step`): its shape and the defects it fixed.

Each defect test failed before its fix:

* freezing a layer after ``compile`` (no recompile): the step follows the
  change, as plain Keras does (it gave t = 0 on torch, or a shape error);
* a subclass whose ``train_step`` does not call the SEHT step: a warning,
  and the penalty logs are NaN, never a value that was not computed;
* the Gauss-Newton estimator on a multi-output model under JAX (it raised
  ``TypeError`` inside the compiled step and lost the in-memory model);
* an epoch whose steps were all skipped logs NaN (it logged 0.0), and the
  warning tells a non-finite loss from a non-finite penalty;
* a step whose plain loss gradient is NaN/Inf too is not applied at all
  (it applied the NaN gradient, and the weights became NaN).

The guard's other cases and the safeguard: ``tests/test_safeguard.py``.
"""

from __future__ import annotations

import ast
import pathlib
import warnings

import keras
import numpy as np
import pytest
from conftest import FixedProbes, make_data, rademacher_probe, tanh_mlp

import keras_seht
from keras_seht import penalties, regularizers
from keras_seht.estimators import SEHTD, SEHTH

BACKEND_DIR = pathlib.Path(keras_seht.__file__).parent / "backend"


def test_backends_name_no_penalty():
    """The backends hold autodiff only: their code names no penalty class
    (docstrings may still speak of a Jacobian)."""
    names = {"CurvatureEstimator", "SEHTD", "SEHTH"}
    for module in (penalties, regularizers):
        names |= {
            name
            for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, penalties.Penalty)
        }
    for path in sorted(BACKEND_DIR.glob("*.py")):
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.alias):
                used.add(node.name.split(".")[-1])
        assert not names & used, (path.name, sorted(names & used))


def _frozen_run(recompile, estimator):
    """Trains an epoch, freezes the first layer, trains another epoch
    (after compiling again if `recompile`); returns the second's logs."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = tanh_mlp()
    model.compile(
        keras.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        seht=estimator,
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.layers[0].trainable = False
    if recompile:
        model.compile(
            keras.optimizers.SGD(0.1),
            "sparse_categorical_crossentropy",
            seht=estimator,
        )
    frozen = [np.array(w) for w in model.layers[0].get_weights()]
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for before, after in zip(frozen, model.layers[0].get_weights()):
        np.testing.assert_array_equal(before, after)
    return history.history, model


@pytest.mark.parametrize(
    "estimator",
    [
        lambda: SEHTH(max_iter=2, strength=0.1),
        lambda: SEHTD(p=0.5, layer_p=1.0, strength=0.1),
    ],
    ids=["seht_h", "seht_d"],
)
def test_freezing_after_compile_is_followed(estimator):
    if keras.config.backend() == "jax":
        # Keras' JAX trainer needs a new compile (plain Keras fails too):
        # say so clearly.
        with pytest.raises(ValueError, match="compile the model again"):
            _frozen_run(False, estimator())
        return
    after, model = _frozen_run(False, estimator())
    before, _ = _frozen_run(True, estimator())
    assert len(model.seht_layout.shapes) == len(model.trainable_variables)
    assert after["seht_trace"][0] != 0.0
    for key in ("seht_trace", "loss"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5)


def test_freezing_before_the_first_fit_is_followed():
    """Between compile and the first step the layout is not cached yet:
    every backend (JAX included) follows the change."""
    keras.utils.set_random_seed(0)
    x, y = make_data(n=16)
    model = tanh_mlp()
    model.compile("sgd", "sparse_categorical_crossentropy", seht=SEHTH())
    model.layers[0].trainable = False
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["seht_trace"][0])
    assert len(model.seht_layout.shapes) == len(model.trainable_variables)


class PlainStepModel(keras_seht.Model):
    """Overrides `train_step` with Keras' own, skipping the SEHT step."""

    def train_step(self, *args):
        return keras.Model.train_step(self, *args)


def test_overridden_train_step_warns_and_logs_nan():
    x, y = make_data(n=16)
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, activation="softmax")(inputs)
    model = PlainStepModel(inputs, outputs)
    model.compile(
        "sgd", "sparse_categorical_crossentropy", seht=SEHTH(strength=1.0)
    )
    with pytest.warns(RuntimeWarning, match="overrides `train_step`"):
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isnan(history.history["seht_trace"][0])


def test_gauss_newton_on_a_multi_output_model():
    """sigma^T J^T H_z J sigma of a two-output model, from the dense
    factors at the step's weights; the model stays usable afterwards."""
    x, y = make_data(n=8)
    rng = np.random.default_rng(0)
    targets = [y, rng.normal(size=(8, 1)).astype("float32")]
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    logits = keras.layers.Dense(3, name="logits")(h)
    value = keras.layers.Dense(1, name="value")(h)
    model = keras_seht.Model(inputs, [logits, value])
    probe = rademacher_probe([v.shape for v in model.trainable_variables], rng)
    model.compile(
        keras.optimizers.SGD(0.0),
        [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"],
        seht=FixedProbes([probe], curvature="gauss_newton"),
    )
    jacobian, output_hessian = keras_seht.gauss_newton_factors(
        model, x, targets, training=True
    )
    u = jacobian @ np.concatenate([p.ravel() for p in probe]).astype("float64")
    logs = model.fit(x, targets, batch_size=8, verbose=0).history
    np.testing.assert_allclose(
        logs["seht_trace"][0], u @ output_hessian @ u, rtol=1e-4
    )
    assert len(model.get_weights()) == 6


def _nan_probe_run(x, y):
    model = tanh_mlp()
    model(x[:1])
    shapes = [v.shape for v in model.trainable_variables]
    probe = [np.full(s, np.nan, "float32") for s in shapes]
    model.compile(
        keras.optimizers.SGD(0.1),
        "sparse_categorical_crossentropy",
        seht=FixedProbes([probe]),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
        )
    messages = [str(w.message) for w in caught]
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    assert all(np.all(np.isfinite(w)) for w in weights)
    return history.history, messages


def test_an_epoch_of_skipped_steps_logs_nan():
    x, y = make_data(n=16)
    logs, messages = _nan_probe_run(x, y)
    assert logs["seht_skipped"] == [2.0]
    assert logs["seht_update_skipped"] == [0.0]
    assert logs["seht_step_skipped"] == [0.0]
    assert np.isnan(logs["seht_trace"][0])
    assert np.isfinite(logs["loss"][0])
    (message,) = [m for m in messages if "was NaN/Inf" in m]
    assert "applied the plain loss gradient" in message
    assert "`seht_skipped`" in message


def test_skip_warning_says_when_the_loss_was_not_finite():
    """The first batch has a NaN input: its loss gradient is NaN too, so
    that step is not applied (the weights stay finite) and a second
    warning names the reason; the second batch applies the plain loss
    gradient."""
    x, y = make_data(n=16)
    x[0, 0] = np.nan
    logs, messages = _nan_probe_run(x, y)
    assert not np.isfinite(logs["loss"][0])
    assert logs["seht_skipped"] == [2.0]
    assert logs["seht_step_skipped"] == [1.0]
    (message,) = [m for m in messages if "seht_step_skipped" in m]
    assert "loss gradient was NaN/Inf too" in message
    assert "not applied" in message
