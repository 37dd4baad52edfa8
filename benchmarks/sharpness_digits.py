"""Sharpness-aware training on digits: plain Keras vs SAM, ASAM, GNP.

What it measures. The keras-seht demo's 64-32-32-10 ReLU MLP
(``keras_seht.experiments.demo.build_mlp``, 3,466 weights) is trained on
scikit-learn's digits (the copy embedded in scikit-learn, no download; the
demo's stratified 1,347/450 train/test split, ``load_digits(seed=0)``) with
the demo's defaults: SGD (learning rate 0.05, momentum 0.9), batch 32, 8
epochs, sparse categorical cross-entropy of the softmax probabilities. The
methods (``compile(seht=...)``):

- ``baseline``: plain Keras (``seht=None``),
- ``sam``:      ``SAM(rho=0.05)`` (Foret et al. 2021),
- ``asam``:     ``ASAM(rho=0.5)`` (Kwon et al. 2021),
- ``gnp``:      ``GradientNorm(strength=0.004, method="finite_difference",
  epsilon=0.01)`` (Zhao et al. 2022),
- ``seht_h``:   ``SEHTH(max_iter=1, strength=1e-3)``, the curvature
  reference.

GNP's strength. The finite-difference update is ``(1 - a) grad L(w) +
a grad L(w + r g/|g|)`` with ``a = 2 strength |g| / r``, here ``200
strength |g|``. In a probe run (torch, seed 0, strengths 1e-3 to 3e-2)
the epoch means of the logged ``gradient_norm_sq`` were 0.5 to 2.7, so
``|g|`` is about 1 and strength 0.004 gives ``a`` of about 0.8: an
interpolation between the two gradients, as in GNP, rather than an
extrapolation past ``grad L(w + r g/|g|)``.

Paired seeds. Before each model is built, ``keras.utils.set_random_seed
(seed)`` seeds all randomness (initial weights, the shuffling of ``fit``),
so for one seed every method starts from the same weights as that seed's
baseline and sees the batches in the same order; the differences to the
same-seed baseline are then paired.

Per run it records the final test accuracy and loss (after the last
epoch), the best test accuracy over the epochs (the test set is evaluated
after every epoch, outside the timed training), the last epoch's mean of
the method's logged value (``sam_gradient_norm``, ``gradient_norm_sq`` or
``seht_trace``), the training time per epoch (validation excluded) and its
ratio to the same seed's baseline (absolute seconds are kept in the raw
JSON only: on a shared machine only the ratios mean anything), and the
Keras history.

Run it with::

    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/sharpness_digits.py
    python benchmarks/sharpness_digits.py --methods baseline,sam --seeds 0
    python benchmarks/sharpness_digits.py --quick --output /tmp/sd.json

It writes the raw per-run records, the per-method aggregates, the table,
versions and arguments to ``--output`` (default
``benchmarks/results/sharpness_digits.json``), atomically after every run.
Completed runs are skipped on a rerun with the same setup (backend,
epochs, data, ...) unless ``--fresh`` is given, so an interrupted run
resumes where it stopped; the time ratios of resumed runs may then compare
times taken in different sessions. The Keras backend is whatever
``KERAS_BACKEND`` says (torch by default, chosen by keras_seht).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Sequence

# keras_seht before keras: it picks the default (torch) backend.
import keras_seht

# isort: split
import keras
import numpy as np

from keras_seht._io import write_json
from keras_seht.data import load_digits
from keras_seht.experiments.cli import positive_int
from keras_seht.experiments.demo import _compile, _TrainTimer, build_mlp
from keras_seht.experiments.report import finite_stats
from keras_seht.experiments.runner import versions
from keras_seht.regularizers import GradientNorm

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEFAULT_OUTPUT = RESULTS / "sharpness_digits.json"
#: The demo's defaults (``python -m keras_seht.experiments.demo --help``).
DEFAULT_EPOCHS = 8
BATCH_SIZE = 32
LEARNING_RATE = 0.05
MOMENTUM = 0.9  # fixed inside demo._compile
DATA_SEED = 0
GNP_STRENGTH = 0.004
GNP_EPSILON = 0.01
#: name -> (label, factory of the ``seht`` argument), in table order.
METHODS: dict[str, tuple[str, Callable[[], Any]]] = {
    "baseline": ("baseline", lambda: None),
    "sam": ("SAM(rho=0.05)", lambda: keras_seht.SAM(rho=0.05)),
    "asam": ("ASAM(rho=0.5)", lambda: keras_seht.ASAM(rho=0.5)),
    "gnp": (
        f"GNP(strength={GNP_STRENGTH:g}, r={GNP_EPSILON:g})",
        lambda: GradientNorm(
            strength=GNP_STRENGTH,
            method="finite_difference",
            epsilon=GNP_EPSILON,
        ),
    ),
    "seht_h": (
        "SEHT-H(max_iter=1, strength=1e-3)",
        lambda: keras_seht.SEHTH(max_iter=1, strength=1e-3),
    ),
}
#: The logged value of each method's penalty (epoch mean), if any.
LOGGED = ("sam_gradient_norm", "gradient_norm_sq", "seht_trace")
#: `--quick`: a smoke test with this many epochs and training samples.
QUICK = {"epochs": 1, "train_samples": 128}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _methods(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(METHODS)};"
            f" got {value!r}"
        )
    return list(dict.fromkeys(names))


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0; got {value!r}")
    return list(dict.fromkeys(seeds))


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/sharpness_digits.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="comma-separated seeds; each seeds all methods' runs alike",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help="training epochs of every run (the demo's default)",
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=list(METHODS),
        help=(
            f"comma-separated subset of {', '.join(METHODS)} (the paired "
            "differences need the baseline)"
        ),
    )
    parser.add_argument(
        "--output",
        default=str(DEFAULT_OUTPUT),
        help=(
            "results JSON, written atomically after every run; the runs "
            "it already holds are skipped"
        ),
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the runs stored in --output instead of resuming",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke test: {epochs} epoch(s) on the first {train_samples} "
            "training samples, first seed only".format(**QUICK)
        ),
    )
    return parser


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def warm_up(methods: Sequence[str], x: np.ndarray, y: np.ndarray) -> None:
    """One untimed step per method.

    One-off backend set-up costs are then not charged to the first timed run.
    """
    for method in methods:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = build_mlp()
        _compile(model, METHODS[method][1](), LEARNING_RATE)
        model.fit(x[:BATCH_SIZE], y[:BATCH_SIZE], verbose=0)


def run_one(
    method: str,
    seed: int,
    data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    epochs: int,
) -> dict[str, Any]:
    """Trains the MLP with one method and seed, and measures it."""
    (x_train, y_train), (x_test, y_test) = data
    estimator = METHODS[method][1]()
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_mlp()
    _compile(model, estimator, LEARNING_RATE)
    timer = _TrainTimer()
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=(x_test, y_test),
        callbacks=[timer],
        verbose=0,
    )
    logs = {
        key: [float(v) for v in values]
        for key, values in history.history.items()
    }
    test_loss, test_accuracy = (
        float(v) for v in model.evaluate(x_test, y_test, verbose=0)
    )
    logged = next((k for k in LOGGED if k in logs), None)
    return {
        "method": method,
        "label": METHODS[method][0],
        "seed": seed,
        "estimator": None if estimator is None else estimator.get_config(),
        "estimator_class": (
            None if estimator is None else type(estimator).__name__
        ),
        "test_accuracy": test_accuracy,
        "best_test_accuracy": float(max(logs["val_accuracy"])),
        "best_epoch": int(np.argmax(logs["val_accuracy"])) + 1,
        "test_loss": test_loss,
        "final_train_loss": logs["loss"][-1],
        "logged_name": logged,
        "logged_last_epoch": None if logged is None else logs[logged][-1],
        "train_seconds": timer.seconds,
        "seconds_per_epoch": timer.seconds / epochs,
        "history": logs,
    }


# --------------------------------------------------------------------------
# Bookkeeping and aggregation
# --------------------------------------------------------------------------


def add_time_ratios(records: list[dict[str, Any]]) -> None:
    """Sets each record's time-per-epoch ratio to the same seed's baseline."""
    base = {
        r["seed"]: r["seconds_per_epoch"]
        for r in records
        if r["method"] == "baseline"
    }
    for r in records:
        seconds = base.get(r["seed"])
        r["time_ratio"] = (
            r["seconds_per_epoch"] / seconds if seconds else float("nan")
        )


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of seed statistics per method, in `METHODS` order.

    The differences (``delta_*``) are paired: each run minus the baseline
    run of the same seed, over the seeds that have one (None for the
    baseline itself).
    """
    base = {r["seed"]: r for r in records if r["method"] == "baseline"}
    rows = []
    for method in METHODS:
        runs = sorted(
            (r for r in records if r["method"] == method),
            key=lambda r: r["seed"],
        )
        if not runs:
            continue
        paired = [r for r in runs if r["seed"] in base]

        def delta(
            key: str, paired: list[dict[str, Any]] = paired
        ) -> dict[str, Any] | None:
            if method == "baseline":
                return None
            return finite_stats([r[key] - base[r["seed"]][key] for r in paired])

        rows.append(
            {
                "method": method,
                "label": METHODS[method][0],
                "seeds": [r["seed"] for r in runs],
                "test_accuracy": finite_stats(
                    [r["test_accuracy"] for r in runs]
                ),
                "best_test_accuracy": finite_stats(
                    [r["best_test_accuracy"] for r in runs]
                ),
                "test_loss": finite_stats([r["test_loss"] for r in runs]),
                "time_ratio": finite_stats([r["time_ratio"] for r in runs]),
                "paired_seeds": [r["seed"] for r in paired],
                "delta_test_accuracy": delta("test_accuracy"),
                "delta_best_test_accuracy": delta("best_test_accuracy"),
                "delta_test_loss": delta("test_loss"),
            }
        )
    return rows


def _cell(stats: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    """``mean ± se`` (just the mean when n = 1); ``-`` when there is none."""
    if stats is None or stats["finite"] == 0:
        return "-"
    text = format(stats["mean"] * scale, fmt)
    if math.isfinite(stats["se"]):
        text += " ± " + format(stats["se"] * scale, fmt.lstrip("+"))
    if stats["finite"] < stats["n"]:
        text += f" ({stats['finite']}/{stats['n']})"
    return text


def format_table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """The aggregate table as Markdown, with a caption."""
    lines = [
        f"Digits ({setup['train_samples']} train / {setup['test_samples']} "
        f"test), {setup['model']}, backend {setup['backend']}, "
        f"{setup['epochs']} epoch(s) of SGD(lr {setup['learning_rate']:g}, "
        f"momentum {setup['momentum']:g}), batch {setup['batch_size']}. "
        "Mean ± standard error over the n seeds (no ± when n = 1). final: "
        "test accuracy after the last epoch; best: the best test accuracy "
        "over the epochs. Δ: paired difference to the same seed's baseline "
        "in percentage points. time / base: training time per epoch over "
        "the same seed's baseline's.",
        "",
        "| method | n | final acc (%) | best acc (%) | Δ final (pp) "
        "| Δ best (pp) | test loss | time / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} "
            f"| {_cell(row['test_accuracy'], '.1f', 100)} "
            f"| {_cell(row['best_test_accuracy'], '.1f', 100)} "
            f"| {_cell(row['delta_test_accuracy'], '+.1f', 100)} "
            f"| {_cell(row['delta_best_test_accuracy'], '+.1f', 100)} "
            f"| {_cell(row['test_loss'], '.3f')} "
            f"| {_cell(row['time_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the benchmark; returns what it wrote to the JSON."""
    args = make_parser().parse_args(
        None if argv is None else [str(a) for a in argv]
    )
    train_samples = None
    if args.quick:
        args.epochs = QUICK["epochs"]
        args.seeds = args.seeds[:1]
        train_samples = QUICK["train_samples"]
    (x_train, y_train), test = load_digits(seed=DATA_SEED)
    if train_samples is not None:
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    data = ((x_train, y_train), test)

    setup = {
        "backend": keras.config.backend(),
        "model": "demo MLP 64-32-32-10 ReLU",
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "optimizer": "SGD",
        "loss": "sparse_categorical_crossentropy on softmax probabilities",
        "data_seed": DATA_SEED,
        "train_samples": int(len(x_train)),
        "test_samples": int(len(test[0])),
        "methods": {name: label for name, (label, _) in METHODS.items()},
    }
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    if output.exists() and not args.fresh:
        stored = json.loads(output.read_text(encoding="utf-8"))
        if stored.get("setup") != setup:
            sys.exit(
                f"{output} holds runs of another setup:\n"
                f"  stored:  {stored.get('setup')}\n  current: {setup}\n"
                "Pass --fresh to discard them, or another --output."
            )
        records = stored["runs"]
    done = {(r["method"], r["seed"]) for r in records}
    # Baseline first for each seed, so ratios and deltas fill in early.
    todo = [(m, s) for s in args.seeds for m in args.methods]
    pending = [key for key in todo if key not in done]

    print(
        f"sharpness on digits: backend={setup['backend']}, "
        f"methods={','.join(args.methods)}, "
        f"seeds={','.join(map(str, args.seeds))}, epochs={args.epochs}, "
        f"train/test={setup['train_samples']}/{setup['test_samples']}: "
        f"{len(todo)} runs, {len(todo) - len(pending)} already done",
        flush=True,
    )

    def checkpoint() -> dict[str, Any]:
        add_time_ratios(records)
        rows = aggregate(records)
        payload = {
            "description": __doc__.split("\n\n")[0].replace("\n", " "),
            "setup": setup,
            "arguments": vars(args),
            "versions": versions(),
            "runs": records,
            "aggregates": rows,
            "table": format_table(rows, setup),
        }
        write_json(str(output), payload)
        return payload

    payload = checkpoint()
    width = max(len(METHODS[m][0]) for m in args.methods)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # torch: jit_compile turned off.
        warnings.simplefilter("ignore")
        if pending:
            warm_up(list(dict.fromkeys(m for m, _ in pending)), *data[0])
        for key in pending:
            method, seed = key
            record = run_one(method, seed, data, args.epochs)
            records.append(record)
            payload = checkpoint()
            logged = record["logged_name"]
            extra = (
                ""
                if logged is None
                else f"  {logged} {record['logged_last_epoch']:.4g}"
            )
            print(
                f"[{todo.index(key) + 1:>{len(str(len(todo)))}}/{len(todo)}]"
                f" {record['label']:<{width}} seed={seed}: "
                f"acc {100 * record['test_accuracy']:5.1f}% "
                f"(best {100 * record['best_test_accuracy']:5.1f}%)  "
                f"loss {record['test_loss']:.3f}  "
                f"time/epoch {record['time_ratio']:.2f}x base{extra}  "
                f"[{time.perf_counter() - start:.0f}s elapsed]",
                flush=True,
            )

    print()
    print(payload["table"])
    print()
    print(f"Wrote {output}.")
    return payload


if __name__ == "__main__":
    main()
