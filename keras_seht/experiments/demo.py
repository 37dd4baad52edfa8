"""The keras-seht demo: SEHT penalties on a tiny MLP and CNN (digits).

Run it with::

    python -m keras_seht.experiments.demo            # minutes on one core
    python -m keras_seht.experiments.demo --quick    # a smoke test, seconds

For each model (an MLP and a small BatchNorm CNN) it trains plain Keras
(``seht=None``) at ``--baseline-seeds`` seeds, then ``SEHTD(p=0.05)`` and
``SEHTH(max_iter=1)`` at each of ``--strengths``, all with the same data,
budget and seed. For each run it reports the *exact* trace of the loss
Hessian of the trained model on held-out test samples relative to the
plain-Keras run of the same seed, and the test accuracy (final and best
over epochs); the plain-Keras runs at other seeds show how much these
numbers vary with no penalty at all. It prints a table and writes
``results.json``, ``table.md`` (the table) and ``curves.png`` (trace
ratio and accuracy against strength) to ``--output-dir``. README.md's
table and plot are generated from this file's output
(``benchmarks/results/demo_torch.json``, ``scripts/readme_tables.py``).
SEHT-D(p=0.01), in earlier versions of the demo, is left out: in
expectation its penalty is mostly 2p times the output layer's trace, as
SEHT-D(p=0.05)'s is at a 5x lower strength, which the sweep covers.

Choice of ``--strengths`` (default 0.001 to 0.3 in steps of about 3x,
spanning both estimators' useful range). Measured with the defaults
(torch, seed 0; ``benchmarks/results/demo_torch.json``): plain Keras's
held-out trace varies over 3 seeds by 0.99-1.05x on the MLP but
1.00-1.63x on the CNN, its accuracy over 93.6-95.3% and 93.8-96.2%.
SEHT-H lowers the MLP's trace to 0.53-0.84x at 0.001-0.01 with accuracy
inside the seeds' range, and over-regularizes from 0.03 (0.38x at 68.4%;
from 0.1, near-constant predictions). On the CNN only 0.01 goes below
the seed band (0.70x) and it already costs 10 points; 0.03 and above
collapse it. SEHT-D(p=0.05) penalizes about 2p = 0.1 of the output
layer's trace: on the MLP it reaches 0.74-0.79x at 0.1-0.3 at no
accuracy cost (0.88-1.32x, no trend, below); on the CNN every ratio
(0.92-1.35x) is inside the seed band, and 0.3 costs 15 points. One seed
per point: a ratio inside the baseline's band is noise. On models like
these, start SEHT-H at 1e-3 to 3e-3 and SEHT-D(p=0.05) near 0.1.

Everything here goes through the public Keras API, so the demo runs on any
Keras backend that keras-seht supports (``KERAS_BACKEND=torch|jax|
tensorflow``). On a small, shared CPU, ``OMP_NUM_THREADS=1`` can make these
tiny models several times faster under the torch backend.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np

import keras_seht
from keras_seht._io import atomic_write, save_figure, write_json
from keras_seht.data import load_digits
from keras_seht.estimators import CurvatureEstimator
from keras_seht.experiments.cli import positive_float, positive_int
from keras_seht.experiments.runner import versions

#: The strengths of the sweep (see the module docstring for why these).
DEFAULT_STRENGTHS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: Plain-Keras runs per model (seeds seed, seed+1, ...): the noise scale.
DEFAULT_BASELINE_SEEDS = 3
MODELS = ("mlp", "cnn")
#: (name, factory(strength) -> estimator or None), in table order. The
#: baseline is trained once per model; each SEHT method at every strength.
METHODS: tuple[
    tuple[str, Callable[[float], CurvatureEstimator | None]], ...
] = (
    ("baseline", lambda strength: None),
    ("SEHT-D(p=0.05)", lambda s: keras_seht.SEHTD(p=0.05, strength=s)),
    ("SEHT-H(max_iter=1)", lambda s: keras_seht.SEHTH(max_iter=1, strength=s)),
)
#: Settings of ``--quick`` (a smoke test): overrides of the defaults.
QUICK: dict[str, Any] = {
    "epochs": 2,
    "train_samples": 192,
    "probe_samples": 32,
    "strengths": (0.01,),
    "baseline_seeds": 1,
}


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


def _parse_strengths(value: str) -> list[float]:
    """``"0.01,0.001"`` -> ``[0.001, 0.01]``: sorted, without repeats."""
    found: list[float] = []
    for part in value.split(","):
        try:
            number = float(part)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number <= 0:
            raise argparse.ArgumentTypeError(
                "--strengths must be a comma-separated list of finite "
                f"numbers > 0; got {value!r}"
            )
        found.append(number)
    return sorted(set(found))


def _strengths_text(strengths: Sequence[float]) -> str:
    return ",".join(f"{s:g}" for s in strengths)


def make_parser() -> argparse.ArgumentParser:
    """The demo's command-line interface.

    Every option's help states its default.
    """
    parser = argparse.ArgumentParser(
        prog="python -m keras_seht.experiments.demo",
        description=(
            "Train a small MLP and CNN on scikit-learn's digits with plain "
            "Keras and with SEHT-D and SEHT-H at a sweep of penalty "
            "strengths; report the exact Hessian trace of each trained "
            "model relative to plain Keras and the test accuracy. Needs "
            'scikit-learn and matplotlib: pip install "keras-seht[demo]".'
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
        "--strengths",
        "--strength",
        type=_parse_strengths,
        default=None,
        metavar="S[,S...]",
        help=(
            "comma-separated penalty strengths, each trained with every "
            "SEHT estimator; one value gives a single comparison "
            f"(default: {_strengths_text(DEFAULT_STRENGTHS)}; with --quick:"
            f" {_strengths_text(QUICK['strengths'])})"
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
        "--baseline-seeds",
        type=positive_int,
        default=None,
        help=(
            "plain-Keras runs per model, with weight and shuffle seeds "
            "seed, seed+1, ... (same data split): their spread is the "
            "run-to-run noise a SEHT run is compared with (default: "
            f"{DEFAULT_BASELINE_SEEDS}; with --quick: "
            f"{QUICK['baseline_seeds']})"
        ),
    )
    parser.add_argument(
        "--probe-samples",
        type=positive_int,
        default=256,
        help=(
            "held-out test samples (and as many training samples) on which "
            "the exact Hessian trace is taken (default: %(default)s)"
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
            "folder for results.json, table.md and curves.png, created if "
            "missing (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke test: {epochs} epochs on {train_samples} samples, "
            "strength {strength}, exact trace on {probe_samples}".format(
                strength=_strengths_text(QUICK["strengths"]), **QUICK
            )
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


Split = tuple[np.ndarray, np.ndarray]


def train_one(
    model_name: str,
    method: str,
    estimator: CurvatureEstimator | None,
    data: tuple[Split, Split],
    probes: dict[str, Split],
    args: argparse.Namespace,
    seed: int | None = None,
) -> dict[str, Any]:
    """Trains one model with one penalty and measures it.

    Every run starts from ``keras.utils.set_random_seed(seed)``, so runs
    of one seed differ only in the penalty, and a run is repeatable on one
    backend and machine.

    Args:
        model_name: A key of `BUILDERS`.
        method: The run's name in the table (a name of `METHODS`).
        estimator: The penalty, or None for plain Keras training.
        data: ``((x_train, y_train), (x_test, y_test))``.
        probes: ``{"test": (x, y), "train": (x, y)}``: the batches on
            which the exact Hessian trace of the trained model is taken.
        args: The parsed command line.
        seed: The seed of the weights, the shuffles and the probes
            (default: ``args.seed``).

    Returns:
        The run's record in ``results.json``.
    """
    (x_train, y_train), (x_test, y_test) = data
    seed = args.seed if seed is None else seed
    keras.utils.set_random_seed(seed)
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
    traces = {
        split: float(keras_seht.exact_hessian_trace(model, *batch))
        for split, batch in probes.items()
    }
    trace_seconds = time.perf_counter() - start
    logs = {
        key: [float(v) for v in values]
        for key, values in history.history.items()
    }
    return {
        "model": model_name,
        "method": method,
        "seed": seed,
        "strength": None if estimator is None else float(estimator.strength),
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
        "exact_trace_test": traces["test"],
        "exact_trace": traces["train"],
        "train_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
        "exact_trace_seconds": trace_seconds,
        "history": logs,
    }


def _baselines(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each model's plain-Keras run at the demo's seed (its first)."""
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["estimator"] is None:
            found.setdefault(run["model"], run)
    return found


def _other_seeds(
    runs: Sequence[dict[str, Any]], base: dict[str, Any]
) -> list[dict[str, Any]]:
    """The plain-Keras runs of `base`'s model at the other seeds."""
    return [
        r
        for r in runs
        if r["estimator"] is None
        and r["model"] == base["model"]
        and r is not base
    ]


def trace_ratio(
    run: dict[str, Any], base: dict[str, Any] | None, key: str
) -> float:
    """``run[key] / base[key]``, NaN without a baseline or at a zero one."""
    if base is None or base[key] == 0:
        return math.nan
    return float(run[key] / base[key])


def _ratio_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _accuracy_text(run: dict[str, Any]) -> str:
    return (
        f"{100 * run['test_accuracy']:.1f} / "
        f"{100 * run['best_test_accuracy']:.1f}"
    )


def format_table(results: dict[str, Any]) -> str:
    """The sweep as a Markdown table with a caption.

    One row per model and strength, and per SEHT method two columns: the
    exact held-out trace relative to the model's plain-Keras run, and the
    test accuracy (final / best epoch). The baseline's row gives its
    absolute trace. The numbers are rounded as the README shows them (the
    slow test `tests/test_demo.py` compares a rerun at this precision).

    Args:
        results: The contents of the demo's ``results.json``.

    Returns:
        The caption, a blank line and the table.
    """
    config = results["config"]
    runs = results["runs"]
    methods = list(
        dict.fromkeys(r["method"] for r in runs if r["estimator"] is not None)
    )
    caption = (
        f"Digits, {config['epochs']} epochs, seed {config['seed']}, "
        f"backend {results['backend']}. tr / base: exact trace of the loss "
        "Hessian w.r.t. all trainable weights on the first "
        f"{config['probe_samples']} held-out test samples (inference "
        "mode), relative to the same model's plain-Keras run at seed "
        f"{config['seed']} (whose row gives tr(H) itself); acc: test "
        "accuracy in %, final epoch / best epoch. Every run has the same "
        "data, budget and seed; the plain-Keras runs at other seeds show "
        "how much a trained model varies without any penalty."
    )
    header = ["model", "strength"]
    for method in methods:
        header += [f"{method} tr / base", f"{method} acc"]
    lines = [
        caption,
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * (2 * len(methods)),
    ]
    baselines = _baselines(runs)
    models = list(dict.fromkeys(r["model"] for r in runs))
    for model_name in models:
        base = baselines.get(model_name)
        if base is not None:
            cells = [model_name, "0 (plain Keras)"]
            cells += [
                f"tr(H) = {base['exact_trace_test']:.2f}",
                _accuracy_text(base),
            ] * len(methods)
            lines.append("| " + " | ".join(cells) + " |")
            others = _other_seeds(runs, base)
            if others:
                seeds = ", ".join(str(r["seed"]) for r in others)
                cells = [model_name, f"0 (plain Keras, seeds {seeds})"]
                cells += [
                    ", ".join(
                        _ratio_text(trace_ratio(r, base, "exact_trace_test"))
                        for r in others
                    ),
                    ", ".join(_accuracy_text(r) for r in others),
                ] * len(methods)
                lines.append("| " + " | ".join(cells) + " |")
        by_key = {
            (r["method"], r["strength"]): r
            for r in runs
            if r["model"] == model_name and r["estimator"] is not None
        }
        strengths = sorted({s for _, s in by_key})
        for strength in strengths:
            cells = [model_name, f"{strength:g}"]
            for method in methods:
                run = by_key.get((method, strength))
                if run is None:
                    cells += ["", ""]
                    continue
                ratio = trace_ratio(run, base, "exact_trace_test")
                cells += [_ratio_text(ratio), _accuracy_text(run)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(path: str, results: dict[str, Any]) -> None:
    """Writes the sweep's plot: trace ratio and test accuracy vs strength.

    One column of panels per model: on top the exact held-out trace of
    each trained model relative to the model's plain-Keras run (solid;
    the training-set trace dashed), below the test accuracy (final epoch
    solid, best epoch dotted); a line per SEHT method, a horizontal line
    for the plain-Keras run and a grey band spanning its runs at other
    seeds, a log strength axis.

    Args:
        path: The PNG file to write.
        results: The contents of the demo's ``results.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    config = results["config"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    methods = list(
        dict.fromkeys(r["method"] for r in runs if r["estimator"] is not None)
    )
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    baselines = _baselines(runs)
    fig, axes = plt.subplots(
        2,
        len(models),
        figsize=(5.2 * len(models), 6.4),
        squeeze=False,
        sharex="col",
    )
    for column, model_name in enumerate(models):
        ax_trace, ax_acc = axes[0, column], axes[1, column]
        base = baselines.get(model_name)
        for method in methods:
            points = sorted(
                (
                    r
                    for r in runs
                    if r["model"] == model_name and r["method"] == method
                ),
                key=lambda r: r["strength"],
            )
            strengths = [r["strength"] for r in points]
            color = colors[method]
            for key, style, label in (
                ("exact_trace_test", "-", f"{method}, test"),
                ("exact_trace", "--", f"{method}, train"),
            ):
                ax_trace.plot(
                    strengths,
                    [trace_ratio(r, base, key) for r in points],
                    color=color,
                    ls=style,
                    marker="o" if style == "-" else None,
                    label=label,
                )
            ax_acc.plot(
                strengths,
                [100 * r["test_accuracy"] for r in points],
                color=color,
                marker="o",
                label=f"{method}, final",
            )
            ax_acc.plot(
                strengths,
                [100 * r["best_test_accuracy"] for r in points],
                color=color,
                ls=":",
                label=f"{method}, best",
            )
        ax_trace.axhline(1.0, color="k", lw=1, label="plain Keras")
        others = [] if base is None else _other_seeds(runs, base)
        if base is not None and others:
            ratios = [
                trace_ratio(r, base, "exact_trace_test")
                for r in [base, *others]
            ]
            accuracies = [100 * r["test_accuracy"] for r in [base, *others]]
            band = f"plain Keras, {len(ratios)} seeds"
            ax_trace.axhspan(
                min(ratios), max(ratios), color="k", alpha=0.12, label=band
            )
            ax_acc.axhspan(
                min(accuracies),
                max(accuracies),
                color="k",
                alpha=0.12,
                label=f"{band}, final",
            )
        if base is not None:
            ax_acc.axhline(
                100 * base["test_accuracy"],
                color="k",
                lw=1,
                label="plain Keras, final",
            )
            ax_acc.axhline(
                100 * base["best_test_accuracy"],
                color="k",
                lw=1,
                ls=":",
                label="plain Keras, best",
            )
        ax_trace.set_xscale("log")
        ax_trace.set_yscale("symlog", linthresh=0.1)
        ax_trace.set_title(
            f"{model_name}: exact tr(H) / plain Keras's\n(first "
            f"{config['probe_samples']} test / training samples)",
            fontsize=9,
        )
        ax_acc.set_title(f"{model_name}: test accuracy (%)", fontsize=9)
        ax_acc.set_xlabel("strength")
        for ax in (ax_trace, ax_acc):
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
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
        args.strengths = args.strengths or list(QUICK["strengths"])
        args.baseline_seeds = args.baseline_seeds or QUICK["baseline_seeds"]
    args.strengths = args.strengths or list(DEFAULT_STRENGTHS)
    args.baseline_seeds = args.baseline_seeds or DEFAULT_BASELINE_SEEDS
    (x_train, y_train), test = load_digits(seed=args.seed)
    if args.train_samples is not None:
        x_train = x_train[: args.train_samples]
        y_train = y_train[: args.train_samples]
    probe_samples = min(args.probe_samples, len(x_train), len(test[0]))
    probes = {
        "test": (test[0][:probe_samples], test[1][:probe_samples]),
        "train": (x_train[:probe_samples], y_train[:probe_samples]),
    }
    data = ((x_train, y_train), test)
    os.makedirs(args.output_dir, exist_ok=True)

    print(
        f"keras-seht demo: backend={keras.config.backend()}, "
        f"models={','.join(args.models)}, epochs={args.epochs}, "
        f"batch_size={args.batch_size}, "
        f"strengths={_strengths_text(args.strengths)}, "
        f"train/test={len(x_train)}/{len(test[0])}",
        flush=True,
    )
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for model_name in args.models:
        _warm_up(model_name, x_train, y_train, args)
        base: dict[str, Any] | None = None
        for method, factory in METHODS:
            if factory(1.0) is None:  # plain Keras: one run per seed
                sweep = [
                    (0.0, args.seed + k) for k in range(args.baseline_seeds)
                ]
            else:
                sweep = [(strength, args.seed) for strength in args.strengths]
            for strength, seed in sweep:
                estimator = factory(strength)
                run = train_one(
                    model_name, method, estimator, data, probes, args, seed
                )
                if base is None:
                    base = run
                run["time_ratio"] = (
                    run["train_seconds"] / base["train_seconds"]
                    if base is not None and base["train_seconds"]
                    else math.nan
                )
                runs.append(run)
                ratio = trace_ratio(run, base, "exact_trace_test")
                label = f"seed {seed}" if estimator is None else f"{strength:g}"
                print(
                    f"  {model_name:<4} {method:<19} {label:>7}  "
                    f"acc {100 * run['test_accuracy']:5.1f}%  "
                    f"tr(H) test {run['exact_trace_test']:8.3f} "
                    f"({_ratio_text(ratio)}), "
                    f"train {run['exact_trace']:8.3f}  "
                    f"time {run['train_seconds']:5.2f}s "
                    f"({run['time_ratio']:.2f}x)",
                    flush=True,
                )
    total_seconds = time.perf_counter() - start

    config = {
        key: value
        for key, value in vars(args).items()
        if key not in ("models", "strengths")
    }
    config["models"] = list(args.models)
    config["strengths"] = list(args.strengths)
    config["optimizer"] = "SGD(momentum=0.9)"
    config["train_size"] = int(len(x_train))
    config["test_size"] = int(len(test[0]))
    config["probe_samples"] = int(probe_samples)
    config["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    results = {
        "config": config,
        "backend": keras.config.backend(),
        "versions": versions(),
        "platform": platform.platform(),
        "total_seconds": total_seconds,
        "runs": runs,
    }
    json_path = os.path.join(args.output_dir, "results.json")
    table_path = os.path.join(args.output_dir, "table.md")
    png_path = os.path.join(args.output_dir, "curves.png")
    write_json(json_path, results)
    table = format_table(results)
    atomic_write(table_path, lambda tmp: _write_text(tmp, table + "\n"))
    # The table first: it is the demo's result, and needs no plotting.
    print()
    print(table)
    print(flush=True)
    plot_curves(png_path, results)
    print(
        f"Wrote {json_path}, {table_path} and {png_path} "
        f"({total_seconds:.1f}s)."
    )
    return results


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


#: The demo's plot; the name under which tests replace it.
plot_curves = plot_sweep


if __name__ == "__main__":
    main()
    sys.exit(0)
