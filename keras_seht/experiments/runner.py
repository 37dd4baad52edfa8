"""One training run of an example: resumable, reproducible, with results.

`run_training` trains a compiled model epoch by epoch and, after every
epoch, atomically writes

- ``checkpoint.npz``: every variable of the model (weights, BatchNorm
  statistics, seed-generator states, so Dropout and the SEHT probes too),
  every optimizer variable, the torch global RNG (which unseeded Dropout
  uses under torch), the state of callbacks that have ``get_state`` /
  ``set_state`` (`HessianReinit`, `CurvatureMonitor`), the epoch and the
  history so far;
- ``results.json`` with ``"complete": false``.

Run again with the same arguments after a kill and it resumes from the
last finished epoch. Every epoch is its own ``model.fit`` call on data
whose order and augmentation are a function of ``(seed, epoch)``
(`keras_seht.data.pipeline.ArrayDataset`), and the learning rate of an
epoch is a function of the epoch and the history, so a resumed run ends
with the same weights and history as an uninterrupted one.

When the last epoch is done it evaluates the model, writes the final
``results.json`` (``"complete": true``; the schema is in the comment on
`keras_seht.experiments.report.RESULTS_FORMAT`, which this module imports)
and deletes the checkpoint. A complete run is not trained again.

Data-parallel runs (``torchrun``; `keras_seht.distributed`): every worker
calls `run_training` alike; each trains on its share of every batch of
`train` (`keras_seht.distributed.ShardedDataset`), so the run takes the
global batches of a single-process run; only the chief (rank 0) writes
the checkpoint and the results and shows progress. After a worker dies
the others stop with `keras_seht.distributed.WorkerError`; starting
every worker again resumes from the last checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
import zipfile
from typing import Any, Callable, Sequence

import keras
import numpy as np

from keras_seht import distributed
from keras_seht._io import write_json, write_npz
from keras_seht.experiments.report import RESULTS_FILE, RESULTS_FORMAT
from keras_seht.version import __version__

CHECKPOINT_FILE = "checkpoint.npz"
#: Config keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("epochs", "verbose", "output_dir", "data_dir", "no_download")

Schedule = Callable[[int, dict[str, list]], float]


def versions() -> dict[str, str | None]:
    """Python, package and backend versions, for the results file."""
    backend_packages = {
        "torch": ["torch"],
        "jax": ["jax", "jaxlib"],
        "tensorflow": ["tensorflow", "tensorflow-cpu"],
    }.get(keras.config.backend(), [])
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": keras.config.backend(),
        "keras_seht": __version__,
    }
    for name in ["keras", "numpy"] + backend_packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def load_results(output_dir: str) -> dict[str, Any] | None:
    """The run's ``results.json``, or None when there is none.

    Raises:
        ValueError: The file is not valid JSON (e.g. truncated): the
            message names it and says what to do.
    """
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError too
        raise ValueError(
            f"{path} is truncated or corrupt ({e}). Delete it and run "
            f"again: a {CHECKPOINT_FILE} next to it, if any, is resumed; "
            "without one the run starts over."
        ) from e
    if not isinstance(results, dict):
        raise ValueError(
            f"{path} is not a results file (it holds no JSON object). "
            "Delete it and run again."
        )
    return results


# --------------------------------------------------------------- checkpoint


def _stateful(callbacks: Sequence[Any]) -> list[Any]:
    return [
        c
        for c in callbacks
        if hasattr(c, "get_state") and hasattr(c, "set_state")
    ]


def _torch_rng() -> Any:
    if keras.config.backend() != "torch":
        return None
    import torch

    return torch.get_rng_state().numpy()


class _TorchRNGAtTrainBegin(keras.callbacks.Callback):
    """Sets the torch global RNG when `fit` starts training.

    A model's first `fit` draws once from the torch RNG before training
    (its symbolic build opens a `torch.utils.data.DataLoader` iterator,
    which draws a base seed), so the state saved at the end of an epoch
    is restored here, after that draw, not when the checkpoint is read.
    """

    def __init__(self, state: np.ndarray) -> None:
        super().__init__()
        self.state = state

    def on_train_begin(self, logs: Any = None) -> None:
        import torch

        torch.set_rng_state(torch.from_numpy(np.asarray(self.state, "uint8")))


def _optimizer(model: keras.Model) -> Any:
    optimizer = model.optimizer
    if optimizer is None:
        raise ValueError("`model` must be compiled before `run_training`.")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return optimizer


def save_checkpoint(
    path: str,
    model: keras.Model,
    meta: dict[str, Any],
    callbacks: Sequence[Any] = (),
) -> None:
    """Writes a checkpoint of the run to `path`, atomically.

    The model's and optimizer's variables, the torch RNG, the callbacks'
    states and `meta` (JSON-able; `run_training` puts the run's config
    and Keras backend there, to refuse resuming with other ones).
    """
    arrays: dict[str, np.ndarray] = {}
    for i, v in enumerate(model.variables):
        arrays[f"model_{i}"] = keras.ops.convert_to_numpy(v.value)
    for i, v in enumerate(_optimizer(model).variables):
        arrays[f"optimizer_{i}"] = keras.ops.convert_to_numpy(v.value)
    torch_rng = _torch_rng()
    if torch_rng is not None:
        arrays["torch_rng"] = torch_rng
    meta = dict(meta, callbacks=[c.get_state() for c in _stateful(callbacks)])
    arrays["meta"] = np.array(json.dumps(meta))
    write_npz(path, **arrays)


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint: its `meta` and its arrays (by name).

    Raises:
        ValueError: The file cannot be read (e.g. truncated by a kill or
            a full disk): the message names it and says what to do.
    """
    try:
        # Opened here: np.load leaves its own file open on a bad archive.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict):
            raise ValueError("its meta entry is not a JSON object")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"The checkpoint {path} is truncated or corrupt "
            f"({type(e).__name__}: {e}). Delete it to start the run over "
            "(or restore it from a backup)."
        ) from e
    return meta, arrays


def _check_checkpoint_settings(
    path: str, meta: dict[str, Any], config: dict[str, Any]
) -> None:
    """Refuses a checkpoint written with another config or backend."""
    backend = keras.config.backend()
    saved_backend = meta.get("backend")
    if saved_backend is not None and saved_backend != backend:
        raise ValueError(
            f"The checkpoint {path} was written on the {saved_backend} "
            f"backend, not {backend}: resume it with "
            f"KERAS_BACKEND={saved_backend}, or delete it (or choose "
            "another --output-dir) to start over."
        )
    saved = meta.get("config")
    if saved is not None and not _same_config(saved, config):
        raise ValueError(
            f"The checkpoint {path} comes from a run with another "
            f"configuration ({saved}); choose another --output-dir or "
            "delete it."
        )


def load_checkpoint(
    path: str,
    model: keras.Model,
    callbacks: Sequence[Any] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restores what `save_checkpoint` wrote; returns its `meta`.

    The torch RNG state is not set here: it comes back in
    ``meta["torch_rng"]`` (under torch), for `run_training` to set when
    the next `fit` starts training.

    Args:
        path: The checkpoint file.
        model: The compiled model whose variables are restored.
        callbacks: The callbacks whose states are restored.
        config: The run's config, or None: given, a checkpoint written
            by a run with another config (other than `RESUMABLE_KEYS`) or
            on another Keras backend is refused before anything changes.

    Raises:
        ValueError: The file is truncated or corrupt, was written with
            other settings, or for another model.
    """
    meta, data = read_checkpoint(path)
    if config is not None:
        _check_checkpoint_settings(path, meta, config)
    groups = (
        ("model", model.variables),
        ("optimizer", _optimizer(model).variables),
    )
    for prefix, variables in groups:
        saved = sorted(
            (k for k in data if k.startswith(prefix + "_")),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        if len(saved) != len(variables) or any(
            tuple(data[k].shape) != tuple(v.shape)
            for k, v in zip(saved, variables)
        ):
            raise ValueError(
                f"The checkpoint {path} does not match this model's "
                f"{prefix} variables: it comes from another model. "
                "Delete it or choose another output directory."
            )
        for k, v in zip(saved, variables):
            v.assign(data[k])
    if "torch_rng" in data and keras.config.backend() == "torch":
        meta["torch_rng"] = data["torch_rng"]
    states = meta.get("callbacks", [])
    stateful = _stateful(callbacks)
    if len(states) != len(stateful):
        raise ValueError(
            f"The checkpoint {path} holds {len(states)} callback states, "
            f"but {len(stateful)} stateful callbacks were given."
        )
    for callback, state in zip(stateful, states):
        callback.set_state(state)
    return meta


# ------------------------------------------------------------------ the run


class _Progress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, showing the run's epochs ("Epoch 3/200").

    Not the one-epoch `fit` call's ("Epoch 3/3").
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.total_epochs = epochs

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params(params)
        self.epochs = self.total_epochs


def _same_config(saved: dict[str, Any], config: dict[str, Any]) -> bool:
    def strip(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in RESUMABLE_KEYS}

    return strip(saved) == strip(json.loads(json.dumps(config)))


def _finite(history: dict[str, list]) -> bool:
    loss = history.get("loss", [0.0])[-1]
    return loss is not None and math.isfinite(loss)


def run_training(
    model: keras.Model,
    train: Any,
    *,
    epochs: int,
    output_dir: str,
    experiment: str,
    method: str,
    seed: int,
    config: dict[str, Any],
    evaluate: Callable[[keras.Model, dict[str, list]], dict[str, float]],
    validation_data: Any = None,
    learning_rate: Schedule | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Trains `model` for `epochs` epochs, resumably; returns the results.

    Args:
        model: A compiled Keras model (any backend), freshly built with
            the run's seed: a resumed run overwrites its variables.
        train: The training data `fit` accepts, in a fixed order or with
            ``set_epoch(epoch)`` choosing the order of each epoch
            (`ArrayDataset`); `fit` does not shuffle it.
        epochs: The total number of epochs.
        output_dir: Where ``checkpoint.npz`` and ``results.json`` go.
        experiment: The experiment's name (e.g. ``"cifar10_resnet18"``).
        method: The method's name (e.g. ``"seht-d"``).
        seed: The run's seed (recorded; seeding is the caller's).
        config: The run's arguments, JSON-able; resuming with a
            different config (other than `RESUMABLE_KEYS`) is refused.
        evaluate: ``evaluate(model, history) -> {metric: value}``, the
            ``final`` metrics, called once after the last epoch.
        validation_data: Passed to `fit` (its metrics get ``val_``).
        learning_rate: ``learning_rate(epoch, history) -> lr`` set on the
            optimizer before each epoch (0-based `epoch`, `history` of
            the finished epochs), or None to leave the optimizer alone.
        callbacks: Keras callbacks for every epoch's `fit`. Those with
            ``get_state()`` / ``set_state(state)`` are checkpointed.
        verbose: `fit`'s verbosity.

    Returns:
        The ``results.json`` content (see `RESULTS_FORMAT`).

    A loss that turns NaN or Inf stops the run early, marked
    ``"diverged": true`` (the re-initialization and SEHT skip rules
    protect the weights from a bad curvature estimate, but not from an
    unstable learning rate or method); it is still evaluated.

    With several data-parallel workers (`keras_seht.distributed`),
    `train` must be a `keras.utils.PyDataset`: each worker trains on its
    share of every batch (`keras_seht.distributed.ShardedDataset`; of a
    batch whose size is not a multiple of the number of workers, the last
    samples are dropped), and only the chief writes files and shows
    progress. `validation_data` and `evaluate` run on every worker.

    A model compiled with ``seht=None`` (a baseline) is averaged alike:
    under torch a `keras_seht.Model` then trains through the shared step
    without penalties (`keras_seht.Model.train_step`); TensorFlow's
    strategy and JAX's distribution average Keras' own step.

    Raises:
        ValueError: Several workers, and `train` is not a PyDataset, or
            (under torch) the model is a plain ``keras.Model``, whose
            step does not average the workers' gradients.
    """
    if distributed.world_size() > 1:
        if keras.config.backend() == "torch" and not hasattr(model, "seht"):
            raise ValueError(
                "Under torch, data-parallel workers average their "
                "gradients in the keras_seht step only: build the model "
                "with keras_seht.Model / keras_seht.Sequential (or "
                "keras_seht.wrap(model)), or run one process. Received: "
                f"model of type {type(model).__name__}"
            )
        if not isinstance(train, keras.utils.PyDataset):
            raise ValueError(
                "With several data-parallel workers `train` must be a "
                "keras.utils.PyDataset (e.g. keras_seht.data.pipeline."
                "ArrayDataset), which each worker splits batch by batch. "
                f"Received: train of type {type(train).__name__}"
            )
        train = distributed.ShardedDataset(train, drop_remainder=True)
        if not distributed.is_chief():
            verbose = 0
    os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, RESULTS_FILE)
    checkpoint_path = os.path.join(output_dir, CHECKPOINT_FILE)
    previous = load_results(output_dir)
    if previous is not None and not _same_config(previous["config"], config):
        raise ValueError(
            f"{output_dir} holds a run with another configuration "
            f"({previous['config']}); choose another --output-dir or "
            "delete it."
        )
    if previous is not None and previous.get("complete"):
        print(
            f"{output_dir}: already complete after "
            f"{previous['epochs_completed']} epochs (delete its "
            f"{RESULTS_FILE} to run it again)."
        )
        return previous
    history: dict[str, list] = {}
    start, wall_time = 0, 0.0
    restore_rng: list[keras.callbacks.Callback] = []
    settings = {
        "config": json.loads(json.dumps(config)),
        "backend": keras.config.backend(),
    }
    if os.path.exists(checkpoint_path):
        meta = load_checkpoint(checkpoint_path, model, callbacks, config)
        start, history = meta["epoch"], meta["history"]
        wall_time = meta["wall_time_s"]
        if "torch_rng" in meta:
            restore_rng = [_TorchRNGAtTrainBegin(meta["torch_rng"])]
        print(f"Resuming {output_dir} after epoch {start}.")
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "experiment": experiment,
        "method": method,
        "seed": int(seed),
        "config": config,
        "history": history,
        "epochs_completed": start,
        "complete": False,
        "diverged": False,
        "wall_time_s": wall_time,
        "versions": versions(),
        "final": {},
    }
    progress = [_Progress(epochs)] if verbose else []
    epoch = start
    while epoch < epochs and _finite(history):
        if learning_rate is not None:
            lr = float(learning_rate(epoch, history))
            model.optimizer.learning_rate.assign(lr)
            history.setdefault("learning_rate", []).append(lr)
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        begin = time.perf_counter()
        fit = model.fit(
            train,
            validation_data=validation_data,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,  # `train` orders its own batches, by epoch.
            callbacks=restore_rng + list(callbacks) + progress,
            verbose=verbose,
        )
        restore_rng = []
        seconds = time.perf_counter() - begin
        wall_time += seconds
        for key, values in fit.history.items():
            history.setdefault(key, []).append(float(values[-1]))
        history.setdefault("epoch_time_s", []).append(seconds)
        epoch += 1
        save_checkpoint(
            checkpoint_path,
            model,
            {
                "epoch": epoch,
                "history": history,
                "wall_time_s": wall_time,
                **settings,
            },
            callbacks,
        )
        results.update(epochs_completed=epoch, wall_time_s=wall_time)
        write_json(results_path, results)
    results["diverged"] = not _finite(history)
    if results["diverged"]:
        print(f"{experiment}/{method}/seed {seed}: the loss diverged.")
    results["final"] = {
        k: float(v) for k, v in evaluate(model, history).items()
    }
    results["complete"] = True
    write_json(results_path, results)
    if distributed.is_chief() and os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)
    return results
