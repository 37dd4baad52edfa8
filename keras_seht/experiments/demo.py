"""The keras-seht demo: SEHT penalties on a tiny MLP and CNN (digits).

Run it with::

    python -m keras_seht.experiments.demo            # about a minute on CPU
    python -m keras_seht.experiments.demo --quick    # a smoke test, seconds

For each model (an MLP and a small BatchNorm CNN) it trains four runs with
the same seed, data and budget: plain Keras (``seht=None``),
``SEHTD(p=0.01)``, ``SEHTD(p=0.05)`` and ``SEHTH(max_iter=1)``, all with
the same ``--strength``. For each run it reports the test accuracy (final
and best over epochs), the *exact* trace of the loss Hessian of the trained
model on a fixed subset of the training data, and the training time with
its ratio to the same model's baseline run. It prints a results table and
writes ``results.json`` and ``curves.png`` to ``--output-dir``.

Choice of ``--strength`` (default 0.01). The paper's 1e-3 is tuned for
CIFAR-10; on this tiny problem the trace is O(10-100). Measured with the
default budget (torch, seed 0; README.md has the table): at 0.01 SEHT-H
lowers the exact trace of the trained MLP to 0.37x the baseline's at a
1-point accuracy cost, and SEHT-D to 0.7-0.8x; at 0.03 and 0.1, SEHT-H
collapses the models towards constant predictions (near-zero trace,
chance accuracy). SEHT-D's estimate is only about 2p times the output
layer's trace, so its penalty is much weaker than SEHT-H's at equal
strength; on the CNN its effect is within the run-to-run spread of the
trained model's trace.

Everything here goes through the public Keras API, so the demo runs on any
Keras backend that keras-seht supports (``KERAS_BACKEND=torch|jax|
tensorflow``). On a small, shared CPU, ``OMP_NUM_THREADS=1`` can make these
tiny models several times faster under the torch backend.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np

import keras_seht
from keras_seht._io import save_figure, write_json
from keras_seht.data import load_digits
from keras_seht.estimators import CurvatureEstimator
from keras_seht.experiments.cli import (
    non_negative_float,
    positive_float,
    positive_int,
)
from keras_seht.experiments.runner import versions

#: Default penalty strength (see the module docstring for why).
DEFAULT_STRENGTH = 0.01
MODELS = ("mlp", "cnn")
#: (name, factory(strength) -> estimator or None), in table order.
METHODS: tuple[
    tuple[str, Callable[[float], CurvatureEstimator | None]], ...
] = (
    ("baseline", lambda strength: None),
    ("SEHT-D(p=0.01)", lambda s: keras_seht.SEHTD(p=0.01, strength=s)),
    ("SEHT-D(p=0.05)", lambda s: keras_seht.SEHTD(p=0.05, strength=s)),
    ("SEHT-H(max_iter=1)", lambda s: keras_seht.SEHTH(max_iter=1, strength=s)),
)
#: Settings of ``--quick`` (a smoke test): overrides of the defaults.
QUICK = {"epochs": 2, "train_samples": 192, "probe_samples": 32}


def build_mlp(activation: str = "relu", name: str = "mlp") -> keras.Model:
    """64-32-32-10 MLP on the flattened 8x8 images (3,466 weights)."""
    layers = keras.layers
    return keras_seht.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Flatten(),
            layers.Dense(32, activation=activation),
            layers.Dense(32, activation=activation),
            layers.Dense(10, activation="softmax"),
        ],
        name=name,
    )


def build_cnn() -> keras.Model:
    """A small BatchNorm CNN (678 trainable weights).

    Conv(4, 3x3)-BN-ReLU-MaxPool-Conv(8, 3x3)-BN-ReLU-MaxPool-Dense(10).
    Kept this small because the exact Hessian trace costs one
    Hessian-vector product per trainable weight, and a double backward
    through convolutions is slow on CPU.
    """
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for filters in (4, 8):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
        h = layers.MaxPooling2D(2)(h)
    h = layers.Flatten()(h)
    outputs = layers.Dense(10, activation="softmax")(h)
    return keras_seht.Model(inputs, outputs, name="cnn")


BUILDERS: dict[str, Callable[[], keras.Model]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
}


class _TrainTimer(keras.callbacks.Callback):
    """Sums the time spent in training epochs, excluding validation."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self._start: float | None = None

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_test_begin(self, logs: Any = None) -> None:
        self._stop()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._stop()


def _parse_models(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--models must be a comma-separated list of {', '.join(MODELS)};"
            f" got {value!r}"
        )
    return list(dict.fromkeys(names))


def make_parser() -> argparse.ArgumentParser:
    """The demo's command-line interface.

    Every option's help states its default.
    """
    parser = argparse.ArgumentParser(
        prog="python -m keras_seht.experiments.demo",
        description=(
            "Train a small MLP and CNN on scikit-learn's digits with and "
            "without SEHT penalties; report test accuracy, the exact "
            "Hessian trace of the trained model and the training-time "
            "ratio to plain Keras. Needs scikit-learn and matplotlib: "
            'pip install "keras-seht[demo]".'
        ),
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=8,
        help="training epochs of every run (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="training batch size (default: %(default)s)",
    )
    parser.add_argument(
        "--strength",
        type=non_negative_float,
        default=DEFAULT_STRENGTH,
        help=(
            "penalty strength of every SEHT run: at 0.01 SEHT-H clearly "
            "lowers the trace at little accuracy cost; at 0.03 and above it "
            "collapses these small models (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=0.05,
        help="learning rate of SGD with momentum 0.9 (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=(
            "seed of the train/test split, the weights and the probes; "
            "every run uses it (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--probe-samples",
        type=positive_int,
        default=256,
        help=(
            "training samples on which the exact Hessian trace is taken "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--train-samples",
        type=positive_int,
        default=None,
        help="train on the first N training samples (default: all 1,347)",
    )
    parser.add_argument(
        "--models",
        type=_parse_models,
        default=list(MODELS),
        help=(
            "comma-separated subset of: "
            + ", ".join(MODELS)
            + f" (default: {','.join(MODELS)})"
        ),
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        help=(
            "folder for results.json and curves.png, created if missing "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke test: {epochs} epochs on {train_samples} samples, exact "
            "trace on {probe_samples}".format(**QUICK)
        ),
    )
    return parser


#: The packages the demo needs beyond keras-seht's own dependencies
#: (module name, distribution name), all in the ``demo`` extra.
REQUIREMENTS = (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))


def check_requirements() -> None:
    """Raises SystemExit naming the ``demo`` extra if a package is missing.

    Checked before any training, so a missing plotting library does not
    end the demo after every run has trained.

    Raises:
        SystemExit: with a message naming the missing packages and the
            ``pip install "keras-seht[demo]"`` that brings them.
    """
    missing = []
    for module, distribution in REQUIREMENTS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        needed = " and ".join(dist for _, dist in REQUIREMENTS)
        raise SystemExit(
            f"The keras-seht demo needs {needed}; missing: "
            f"{', '.join(missing)}. Install them with the 'demo' extra: "
            'pip install "keras-seht[demo]" (or pip install '
            f"{' '.join(missing)})."
        )


def _compile(model: keras.Model, estimator: Any, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        seht=estimator,
    )


def _warm_up(
    name: str, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
) -> None:
    """Warm-up: one untimed plain step.

    One-off backend set-up costs are then not charged to the first timed run.
    """
    keras.utils.set_random_seed(args.seed)
    model = BUILDERS[name]()
    _compile(model, None, args.learning_rate)
    model.fit(x[: args.batch_size], y[: args.batch_size], verbose=0)


def train_one(
    model_name: str,
    method: str,
    estimator: CurvatureEstimator | None,
    data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    probe: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Trains one model with one penalty and measures it."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    model = BUILDERS[model_name]()
    _compile(model, estimator, args.learning_rate)
    timer = _TrainTimer()
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[timer],
        verbose=0,
    )
    fit_seconds = time.perf_counter() - start
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    start = time.perf_counter()
    trace = keras_seht.exact_hessian_trace(model, *probe)
    trace_seconds = time.perf_counter() - start
    logs = {
        key: [float(v) for v in values]
        for key, values in history.history.items()
    }
    return {
        "model": model_name,
        "method": method,
        "estimator": None if estimator is None else estimator.get_config(),
        "estimator_class": (
            None if estimator is None else type(estimator).__name__
        ),
        "trainable_weights": int(
            sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        ),
        "test_accuracy": float(test_accuracy),
        "best_test_accuracy": float(max(logs["val_accuracy"])),
        "test_loss": float(test_loss),
        "exact_trace": float(trace),
        "train_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
        "exact_trace_seconds": trace_seconds,
        "history": logs,
    }


def format_table(
    runs: Sequence[dict[str, Any]], probe_samples: int, strength: float
) -> str:
    """The results as a Markdown table with a caption."""
    header = (
        "| model | method | test acc | best acc | exact tr(H) | tr / base "
        "| train s | time / base |"
    )
    lines = [
        f"Digits, strength={strength:g}. test acc: final epoch; best acc: "
        "best over epochs. exact tr(H): trace of the loss Hessian w.r.t. "
        f"all trainable weights on the first {probe_samples} training "
        "samples (inference mode). train s: training time without "
        "validation; time / base: ratio to the same model's baseline.",
        "",
        header,
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = {r["model"]: r for r in runs if r["estimator"] is None}
    for run in runs:
        base = baselines.get(run["model"])
        trace_ratio = time_ratio = "-"
        if base is not None:
            if base["exact_trace"] != 0:
                trace_ratio = f"{run['exact_trace'] / base['exact_trace']:.2f}"
            time_ratio = f"{run['time_ratio']:.2f}x"
        lines.append(
            f"| {run['model']} | {run['method']} "
            f"| {100 * run['test_accuracy']:.1f}% "
            f"| {100 * run['best_test_accuracy']:.1f}% "
            f"| {run['exact_trace']:.3f} | {trace_ratio} "
            f"| {run['train_seconds']:.2f} | {time_ratio} |"
        )
    return "\n".join(lines)


def plot_curves(
    path: str, runs: Sequence[dict[str, Any]], probe_samples: int
) -> None:
    """Writes loss, SEHT-estimate and exact-trace panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in runs))
    methods = [name for name, _ in METHODS]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        len(models), 3, figsize=(15, 3.8 * len(models)), squeeze=False
    )
    for row, model_name in zip(axes, models):
        ax_loss, ax_t, ax_exact = row
        model_runs = [r for r in runs if r["model"] == model_name]
        for run in model_runs:
            hist = run["history"]
            epochs = np.arange(1, len(hist["loss"]) + 1)
            color = colors[run["method"]]
            ax_loss.plot(epochs, hist["loss"], color=color, label=run["method"])
            ax_loss.plot(epochs, hist["val_loss"], color=color, ls="--")
            if "seht_trace" in hist:
                ax_t.plot(
                    epochs,
                    hist["seht_trace"],
                    color=color,
                    marker="o",
                    label=run["method"],
                )
        ax_loss.set_title(
            f"{model_name}: loss\n(solid: train objective L + strength*t; "
            "dashed: test L)",
            fontsize=9,
        )
        ax_loss.set_xlabel("epoch")
        ax_loss.legend(fontsize=8)
        ax_t.set_title(
            f"{model_name}: seht_trace, the epoch mean of t\n(SEHT-H ~ tr(H), "
            "SEHT-D ~ 2p x partial trace; baseline has none)",
            fontsize=9,
        )
        ax_t.set_xlabel("epoch")
        ax_t.set_yscale("symlog", linthresh=1e-2)
        if ax_t.has_data():
            ax_t.legend(fontsize=8)
        names = [r["method"] for r in model_runs]
        ax_exact.bar(
            range(len(model_runs)),
            [r["exact_trace"] for r in model_runs],
            color=[colors[n] for n in names],
        )
        ax_exact.set_xticks(range(len(model_runs)))
        ax_exact.set_xticklabels(names, rotation=15, fontsize=8)
        ax_exact.set_title(
            f"{model_name}: exact tr(H) after training\n"
            f"({probe_samples} training samples)",
            fontsize=9,
        )
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo; returns the contents written to ``results.json``."""
    args = make_parser().parse_args(
        None if argv is None else [str(a) for a in argv]
    )
    check_requirements()
    if args.quick:
        args.epochs = QUICK["epochs"]
        args.train_samples = args.train_samples or QUICK["train_samples"]
        args.probe_samples = min(args.probe_samples, QUICK["probe_samples"])
    (x_train, y_train), test = load_digits(seed=args.seed)
    if args.train_samples is not None:
        x_train = x_train[: args.train_samples]
        y_train = y_train[: args.train_samples]
    probe_samples = min(args.probe_samples, len(x_train))
    probe = (x_train[:probe_samples], y_train[:probe_samples])
    data = ((x_train, y_train), test)
    os.makedirs(args.output_dir, exist_ok=True)

    print(
        f"keras-seht demo: backend={keras.config.backend()}, "
        f"models={','.join(args.models)}, epochs={args.epochs}, "
        f"batch_size={args.batch_size}, strength={args.strength:g}, "
        f"train/test={len(x_train)}/{len(test[0])}",
        flush=True,
    )
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for model_name in args.models:
        _warm_up(model_name, x_train, y_train, args)
        base_seconds = None
        for method, factory in METHODS:
            estimator = factory(args.strength)
            run = train_one(model_name, method, estimator, data, probe, args)
            if estimator is None:
                base_seconds = run["train_seconds"]
            run["time_ratio"] = (
                run["train_seconds"] / base_seconds
                if base_seconds
                else float("nan")
            )
            runs.append(run)
            print(
                f"  {model_name:<4} {method:<19} "
                f"acc {100 * run['test_accuracy']:5.1f}%  "
                f"exact tr(H) {run['exact_trace']:9.3f}  "
                f"train {run['train_seconds']:6.2f}s "
                f"({run['time_ratio']:.2f}x)  "
                f"[trace {run['exact_trace_seconds']:.1f}s]",
                flush=True,
            )
    total_seconds = time.perf_counter() - start

    config = {
        key: value for key, value in vars(args).items() if key != "models"
    }
    config["models"] = list(args.models)
    config["optimizer"] = "SGD(momentum=0.9)"
    config["train_size"] = int(len(x_train))
    config["test_size"] = int(len(test[0]))
    config["probe_samples"] = int(probe_samples)
    results = {
        "config": config,
        "backend": keras.config.backend(),
        "versions": versions(),
        "platform": platform.platform(),
        "total_seconds": total_seconds,
        "runs": runs,
    }
    json_path = os.path.join(args.output_dir, "results.json")
    png_path = os.path.join(args.output_dir, "curves.png")
    write_json(json_path, results)
    # The table first: it is the demo's result, and needs no plotting.
    print()
    print(format_table(runs, probe_samples, args.strength))
    print(flush=True)
    plot_curves(png_path, runs, probe_samples)
    print(f"Wrote {json_path} and {png_path} ({total_seconds:.1f}s).")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
