"""Argument checks and the experiment runner's guards (issue 23)."""

from __future__ import annotations

import json
import os
import stat
import warnings

import keras
import numpy as np
import pytest
from conftest import make_data, tanh_mlp

import keras_seht
from keras_seht import _io
from keras_seht.callbacks import CurvatureMonitor, HessianReinit
from keras_seht.data.pipeline import ArrayDataset
from keras_seht.experiments import runner

# --------------------------------------------------------------------------
# The runner: settings kept in the checkpoint, damaged files, file modes
# --------------------------------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    """Raises at the end of epoch `epoch`, before it is checkpointed."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _run(output_dir, config=None, callbacks=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.integers(0, 2, size=16)
    keras.utils.set_random_seed(0)
    model = keras_seht.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        seht=keras_seht.SEHTH(max_iter=1, strength=1e-3),
    )
    return runner.run_training(
        model,
        ArrayDataset(x, y, 8, seed=1),
        epochs=3,
        output_dir=str(output_dir),
        experiment="toy",
        method="seht-h",
        seed=0,
        config={"lr": 0.1} if config is None else config,
        evaluate=lambda model, history: {"loss": history["loss"][-1]},
        callbacks=list(callbacks),
        verbose=0,
    )


@pytest.fixture
def killed(tmp_path):
    """A run killed in its 2nd epoch: a checkpoint of epoch 1 is left."""
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, callbacks=[_Interrupt(1)])
    assert os.path.exists(tmp_path / runner.CHECKPOINT_FILE)
    return tmp_path


def test_checkpoint_keeps_the_settings(killed):
    meta, _ = runner.read_checkpoint(str(killed / runner.CHECKPOINT_FILE))
    assert meta["config"] == {"lr": 0.1}
    assert meta["backend"] == keras.config.backend()


def test_checkpoint_of_other_settings_is_refused_without_results(killed):
    os.remove(killed / runner.RESULTS_FILE)
    with pytest.raises(ValueError, match="checkpoint.*another configuration"):
        _run(killed, config={"lr": 0.5})
    assert _run(killed)["complete"]  # the same settings resume


def _rewrite_meta(path, **changes):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_checkpoint_of_another_backend_is_refused(killed):
    os.remove(killed / runner.RESULTS_FILE)
    _rewrite_meta(killed / runner.CHECKPOINT_FILE, backend="other")
    with pytest.raises(ValueError, match="other backend.*KERAS_BACKEND"):
        _run(killed)


def test_truncated_checkpoint_names_the_file(killed):
    path = killed / runner.CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checkpoint.npz.*Delete it"):
        _run(killed)


def test_truncated_results_names_the_file(killed):
    path = killed / runner.RESULTS_FILE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="results.json.*Delete it"):
        _run(killed)
    with pytest.raises(ValueError, match="results.json"):
        runner.load_results(str(killed))


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.single_backend
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    _io.write_json(str(tmp_path / "a.json"), {})
    _io.write_npz(str(tmp_path / "a.npz"), np.zeros(2))
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "a.npz") == 0o644
    os.umask(0o077)
    _io.write_json(str(tmp_path / "b.json"), {})
    assert _mode(tmp_path / "b.json") == 0o600


def test_run_outputs_honour_the_umask(killed, umask):
    assert _run(killed)["complete"]
    assert _mode(killed / runner.RESULTS_FILE) == 0o644


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def test_clip_negative_is_hessian_only():
    with pytest.raises(ValueError, match="clip_negative"):
        keras_seht.SEHTH(curvature="gauss_newton", clip_negative=True)
    with pytest.raises(ValueError, match="clip_negative"):
        keras_seht.SEHTD(curvature="gauss_newton", clip_negative=True)
    assert keras_seht.SEHTH(curvature="hessian", clip_negative=True)
    assert keras_seht.SEHTH(curvature="gauss_newton", clip_negative=False)


@pytest.mark.parametrize("strength", [0.6, 1e6])
def test_antithetic_refuses_an_absurd_step(strength):
    with pytest.raises(ValueError, match="strength.*antithetic"):
        keras_seht.SEHTH(method="antithetic", strength=strength)
    with pytest.raises(ValueError, match="strength.*antithetic"):
        keras_seht.SEHTD(method="antithetic", strength=strength)


def test_antithetic_accepts_steps_up_to_one():
    assert keras_seht.SEHTH(method="antithetic", strength=0.5).step_epsilon == 1
    with pytest.raises(ValueError, match="strength"):
        keras_seht.SEHTH(method="antithetic", strength=0.0)
    # The other methods keep any strength.
    assert keras_seht.SEHTH(strength=1e6).strength == 1e6


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"strength": "0.1"}, "strength"),
        ({"strength": True}, "strength"),
        ({"layer_p": True}, "layer_p"),
        ({"method": "finite_difference", "epsilon": True}, "epsilon"),
        ({"clip_negative": "no"}, "clip_negative"),
        ({"unbiased": "no"}, "unbiased"),
    ],
)
def test_estimator_arguments_of_the_wrong_type(kwargs, name):
    with pytest.raises(ValueError, match=name):
        keras_seht.SEHTD(**kwargs)


def _xy(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype("float32"), np.zeros(n, "int32")


@pytest.mark.parametrize("which", ["x", "y"])
def test_hessian_reinit_refuses_none_data(which):
    x, y = _xy()
    args = {"x": x, "y": y, which: None}
    with pytest.raises(ValueError, match=f"`{which}`.*None"):
        HessianReinit(args["x"], args["y"])


@pytest.mark.parametrize("which", ["x", "y"])
def test_hessian_reinit_refuses_scalars(which):
    x, y = _xy()
    args = {"x": x, "y": y, which: 3.0}
    with pytest.raises(ValueError, match=f"`{which}`.*sample axis"):
        HessianReinit(args["x"], args["y"])


@pytest.mark.parametrize("callback", [HessianReinit, CurvatureMonitor])
def test_diagnostic_callbacks_refuse_empty_data(callback):
    x, y = _xy(0)
    with pytest.raises(ValueError, match="`x`.*at least one sample"):
        callback(x, y)
    x, y = _xy()
    with pytest.raises(ValueError, match="`y`.*at least one sample"):
        callback(x, y[:0])
    with pytest.raises(ValueError, match="same number of samples"):
        callback(x, y[:3])


@pytest.mark.parametrize(
    "kwargs",
    [{"training": "no"}, {"reset_optimizer_state": "no"}, {"training": 1}],
)
def test_hessian_reinit_flags_must_be_bools(kwargs):
    x, y = _xy()
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        HessianReinit(x, y, **kwargs)


def test_curvature_monitor_training_must_be_a_bool():
    x, y = _xy()
    with pytest.raises(ValueError, match="training"):
        CurvatureMonitor(x, y, training="no")


# --------------------------------------------------------------------------
# No NumPy DeprecationWarning from the sparse probe draw
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, "generator", "numpy"])
def test_sparse_probe_draw_warns_nothing(seed):
    model = keras_seht.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    layout = keras_seht.weight_layout(model)
    if seed == "generator":
        seed = keras.random.SeedGenerator(1)
    elif seed == "numpy":
        seed = np.random.default_rng(0)
    estimator = keras_seht.SEHTD(p=0.3, layer_p=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        probes = estimator.sample_probes(layout, seed=seed, sparse=True)
    assert len(probes) == len(layout.shapes)


@pytest.mark.parametrize("force", ["no", 1, None])
def test_force_must_be_a_bool(force):
    """A force="no" must not run the exact path on a large model."""
    x, y = make_data(n=4)
    model = tanh_mlp()
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="force"):
        keras_seht.exact_hessian_trace(model, x, y, max_weights=1, force=force)


@pytest.mark.parametrize(
    "x_, y_, match",
    [
        (np.zeros((0, 6), "float32"), np.zeros((0,), "int32"), "`x`"),
        (None, np.zeros((4,), "int32"), "`x`"),
        (np.zeros((4, 6), "float32"), np.zeros((3,), "int32"), "`y`"),
    ],
)
def test_diagnostics_refuse_empty_or_mismatched_data(x_, y_, match):
    model = tanh_mlp()
    model.compile("sgd", "sparse_categorical_crossentropy")
    model(np.zeros((1, 6), "float32"))
    for fn in (
        keras_seht.exact_hessian_trace,
        keras_seht.hessian_trace,
        keras_seht.hessian_top_eigenvalue,
    ):
        with pytest.raises(ValueError, match=match):
            fn(model, x_, y_)
