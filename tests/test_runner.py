"""keras_seht.experiments.runner: resumable runs and results.json."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

import keras_seht
from keras_seht.callbacks import CurvatureMonitor, HessianReinit
from keras_seht.data.pipeline import ArrayDataset, random_crop_flip
from keras_seht.experiments import runner

EPOCHS = 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4, 4, 1)).astype("float32")
    y = rng.integers(0, 3, size=48)
    return x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras_seht.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        seht=keras_seht.SEHTD(p=0.5, strength=1e-2),
    )
    return model


def _callbacks(x, y):
    return [
        HessianReinit(x, y, k=20, n_layers=1, every=2, batch_size=8, seed=1),
        CurvatureMonitor(x[:8], y[:8], trace_samples=2, eigen_iters=3),
    ]


class Interrupt(keras.callbacks.Callback):
    """Stands for a kill: raises at the end of epoch `epoch` (0-based),
    after training it but before the runner checkpoints it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _run(output_dir, extra_callbacks=(), config=None):
    x, y = _data()
    model = _model()

    def evaluate(model, history):
        return model.evaluate(x, y, verbose=0, return_dict=True)

    results = runner.run_training(
        model,
        ArrayDataset(x, y, 16, seed=2, augment=random_crop_flip(1)),
        epochs=EPOCHS,
        output_dir=str(output_dir),
        experiment="toy",
        method="seht-d",
        seed=0,
        config=config or {"epochs": EPOCHS, "lr": 0.1},
        evaluate=evaluate,
        validation_data=(x[:16], y[:16]),
        learning_rate=lambda epoch, history: 0.1 / (1 + epoch),
        callbacks=_callbacks(x, y) + list(extra_callbacks),
        verbose=0,
    )
    return model, results


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, shared by the tests that only read it or its
    folder (each run costs a compilation of the step under JAX and
    TensorFlow): (model, results, output folder)."""
    keras.backend.clear_session(free_memory=False)
    output_dir = tmp_path_factory.mktemp("straight")
    model, results = _run(output_dir)
    return model, results, output_dir


def test_resumed_run_equals_uninterrupted_run(tmp_path, straight):
    model, results, _ = straight
    assert results["complete"] and results["epochs_completed"] == EPOCHS
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", [Interrupt(1)])
    partial = runner.load_results(str(tmp_path / "killed"))
    assert partial["epochs_completed"] == 1 and not partial["complete"]
    assert os.path.exists(tmp_path / "killed" / runner.CHECKPOINT_FILE)
    keras.backend.clear_session()
    resumed_model, resumed = _run(tmp_path / "killed")
    assert resumed["complete"]
    history, again = results["history"], resumed["history"]
    assert set(history) == set(again)
    for key in history:
        if key != "epoch_time_s":
            np.testing.assert_array_equal(history[key], again[key], key)
    assert results["final"] == resumed["final"]
    for a, b in zip(model.variables, resumed_model.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    assert not os.path.exists(tmp_path / "killed" / runner.CHECKPOINT_FILE)


def test_results_file(straight):
    _, results, output_dir = straight
    with open(output_dir / runner.RESULTS_FILE) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert saved["format"] == runner.RESULTS_FORMAT
    assert saved["versions"]["backend"] == keras.config.backend()
    history = saved["history"]
    for key in ("loss", "val_accuracy", "seht_trace", "epoch_time_s"):
        assert len(history[key]) == EPOCHS, key
    assert history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert len(history["curvature_trace"]) == EPOCHS
    assert set(saved["final"]) == {"loss", "accuracy"}
    assert not saved["diverged"]
    assert saved["wall_time_s"] >= sum(history["epoch_time_s"]) * 0.999


def test_complete_run_is_not_trained_again(straight, capsys):
    _, first, output_dir = straight
    capsys.readouterr()
    _, second = _run(output_dir, [Interrupt(0)])  # would raise if trained
    assert second == json.loads(json.dumps(first))
    assert "already complete" in capsys.readouterr().out


def test_other_config_is_refused(straight):
    _, _, output_dir = straight
    with pytest.raises(ValueError, match="another configuration"):
        _run(output_dir, config={"epochs": EPOCHS, "lr": 0.5})


def test_checkpoint_of_another_model_is_refused(tmp_path):
    x, y = _data()
    model = _model()
    path = str(tmp_path / "ckpt.npz")
    runner.save_checkpoint(path, model, {"epoch": 1})
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.compile("sgd", "mse")
    with pytest.raises(ValueError, match="another model"):
        runner.load_checkpoint(path, other)


def test_diverged_run_stops_and_says_so(tmp_path, capsys):
    x, y = _data()
    model = _model()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    results = runner.run_training(
        model,
        ArrayDataset(np.where(x > 1, np.nan, x), y, 16),
        epochs=5,
        output_dir=str(tmp_path),
        experiment="toy",
        method="baseline",
        seed=0,
        config={},
        evaluate=lambda model, history: {"last": history["loss"][-1]},
        verbose=0,
    )
    assert results["diverged"] and results["complete"]
    assert results["epochs_completed"] == 1
    assert results["final"] == {"last": pytest.approx(np.nan, nan_ok=True)}
    assert "diverged" in capsys.readouterr().out
