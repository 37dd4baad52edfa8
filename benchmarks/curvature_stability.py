"""Stability of the SEHT-H curvature penalty: Hessian, Gauss-Newton, clipped.

What it measures. Three small models (each under 5k weights, so exact
Hessian traces are affordable) are trained on scikit-learn's digits (the
copy embedded in scikit-learn, no download; a fixed stratified 1,347/450
train/test split) with plain Keras (``seht=None``) and three one-probe
SEHT-H penalties,

- ``hessian``:      ``SEHTH(max_iter=1, strength=s)`` (the paper's),
- ``gauss_newton``: ``SEHTH(max_iter=1, strength=s,
  curvature="gauss_newton")``,
- ``clipped``:      ``SEHTH(max_iter=1, strength=s, clip_negative=True)``,

for every strength ``s`` and seed (``keras.utils.set_random_seed(seed)``
before each model is built; the baseline runs once per model and seed).
The models: ``cnn_bn``, the demo's Conv-BN-ReLU-MaxPool x2 + Dense CNN
(678 weights); ``mlp_relu``, the demo's 64-32-32-10 ReLU MLP (3,466);
``mlp_tanh``, the same MLP with tanh (3,466). All end in a softmax and
train on sparse categorical cross-entropy of the probabilities (Keras'
``"sparse_categorical_crossentropy"``, not ``from_logits``), with SGD
(learning rate 0.05, momentum 0.9), batch 64, for ``--epochs`` epochs.

Per run it records the final test accuracy; whether the run diverged; the
exact trace of the loss Hessian (``keras_seht.exact_hessian_trace``) and
its top eigenvalue (``keras_seht.hessian_top_eigenvalue``, 50 power
iterations) at the end of training, both on the first 256 training
samples in inference mode (BatchNorm uses its moving statistics), NaN for
runs whose weights are non-finite; for SEHT runs the mean over epochs of
``seht_negative_fraction`` (share of steps whose probe t was negative) and
the total ``seht_skipped`` (steps whose penalty was NaN/Inf and left
out); and the training time as a ratio to the baseline of the same model
and seed (absolute seconds are kept in the raw JSON only: on a shared
machine only the ratios mean anything).

Divergence. A run *diverged* if, at the end of training, its last-epoch
training objective or any of its weights (BatchNorm statistics included)
is non-finite, or its test accuracy is at most twice chance, i.e.
``<= 0.2`` on the ten digit classes (this counts collapses to a near
constant prediction, which the Hessian penalty can cause, as divergence).

The aggregate table (model x method x strength) shows the mean +- the
standard error over seeds. Run it with::

    OMP_NUM_THREADS=1 python benchmarks/curvature_stability.py
    python benchmarks/curvature_stability.py --models mlp_tanh --seeds 0
    python benchmarks/curvature_stability.py --smoke --output-dir /tmp/cs
    python benchmarks/curvature_stability.py --safeguard 1.0 --output-dir /tmp/b

``--safeguard MAX_RATIO`` trains the SEHT runs with
``seht_safeguard=keras_seht.GradientBound(MAX_RATIO)`` (recorded in the
setup, so that such results never resume into unbounded ones).

It writes ``curvature_stability.json`` (raw per-run records, aggregates,
versions and arguments; NaN is written as the JS literal ``NaN``) and
``curvature_stability.md`` (the table) to ``--output-dir`` (default
``benchmarks/results``), atomically after every run. Completed runs are
skipped on a rerun with the same setup (backend, epochs, data, ...) unless
``--fresh`` is given, so an interrupted study resumes where it stopped; the
time ratios of resumed runs may then compare times taken in different
sessions. The Keras backend is whatever ``KERAS_BACKEND`` says (torch by
default, chosen by keras_seht).
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

from keras_seht._io import atomic_write
from keras_seht.data import load_digits
from keras_seht.experiments.cli import choices, positive_int
from keras_seht.experiments.demo import (
    _compile,
    _TrainTimer,
    build_cnn,
    build_mlp,
    write_json,
)
from keras_seht.experiments.report import finite_stats
from keras_seht.experiments.runner import versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STEM = "curvature_stability"
MODELS = ("cnn_bn", "mlp_relu", "mlp_tanh")
METHODS = ("baseline", "hessian", "gauss_newton", "clipped")
#: Keyword arguments of SEHTH (besides max_iter=1 and strength) per method.
SEHT_KWARGS: dict[str, dict[str, Any]] = {
    "hessian": {},
    "gauss_newton": {"curvature": "gauss_newton"},
    "clipped": {"clip_negative": True},
}
DEFAULT_EPOCHS = 30
LEARNING_RATE = 0.05
MOMENTUM = 0.9  # fixed inside demo._compile
BATCH_SIZE = 64
PROBE_SAMPLES = 256
EIG_ITERS = 50
DATA_SEED = 0
#: Test accuracy at or below this counts as diverged (2x chance, 10 classes).
DIVERGED_ACCURACY = 0.2
DIVERGENCE = (
    "diverged: at the end of training the last-epoch training objective or "
    "a weight is non-finite, or test accuracy <= 0.2 (2x chance)"
)
#: `--smoke`: 1 epoch, first seed, first strength, this much data.
SMOKE = {"epochs": 1, "train_samples": 192, "probe_samples": 32}


def build_mlp_tanh() -> keras.Model:
    """The demo's 64-32-32-10 MLP with tanh (3,466 weights)."""
    return build_mlp(activation="tanh", name="mlp_tanh")


BUILDERS: dict[str, Callable[[], keras.Model]] = {
    "cnn_bn": build_cnn,
    "mlp_relu": build_mlp,
    "mlp_tanh": build_mlp_tanh,
}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _int_list(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0; got {value!r}")
    return list(dict.fromkeys(seeds))


def _float_list(value: str) -> list[float]:
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not numbers or not all(math.isfinite(s) and s > 0 for s in numbers):
        raise argparse.ArgumentTypeError(
            f"expected strengths > 0; got {value!r}"
        )
    return sorted(set(numbers))


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/curvature_stability.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2])
    parser.add_argument(
        "--strengths", type=_float_list, default=[1e-3, 1e-2, 1e-1]
    )
    parser.add_argument(
        "--models",
        type=choices(MODELS),
        default=list(MODELS),
        help="comma-separated subset of " + ", ".join(MODELS),
    )
    parser.add_argument(
        "--methods",
        type=choices(METHODS),
        default=list(METHODS),
        help="comma-separated subset of " + ", ".join(METHODS),
    )
    parser.add_argument(
        "--safeguard",
        type=float,
        default=None,
        metavar="MAX_RATIO",
        help=(
            "train the SEHT runs with seht_safeguard="
            "keras_seht.GradientBound(MAX_RATIO) (default: none)"
        ),
    )
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the stored runs instead of resuming",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "tiny check: {epochs} epoch, first seed and strength, "
            "{train_samples} training samples, exact trace on "
            "{probe_samples}".format(**SMOKE)
        ),
    )
    return parser


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def make_estimator(method: str, strength: float | None) -> Any:
    """The SEHT-H estimator of `method` at `strength`, None for the baseline."""
    if method == "baseline":
        return None
    return keras_seht.SEHTH(
        max_iter=1, strength=strength, **SEHT_KWARGS[method]
    )


def _all_finite(model: keras.Model) -> bool:
    return all(
        bool(np.all(np.isfinite(keras.ops.convert_to_numpy(w))))
        for w in model.weights
    )


def warm_up(model_name: str, x: np.ndarray, y: np.ndarray) -> None:
    """Warm-up: one untimed plain and one SEHT step.

    One-off backend set-up costs are then not charged to the first timed run.
    """
    for estimator in (None, make_estimator("hessian", 1e-3)):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = BUILDERS[model_name]()
        _compile(model, estimator, LEARNING_RATE)
        model.fit(x[:BATCH_SIZE], y[:BATCH_SIZE], verbose=0)


def run_one(
    model_name: str,
    method: str,
    strength: float | None,
    seed: int,
    data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    probe: tuple[np.ndarray, np.ndarray],
    epochs: int,
    safeguard: float | None = None,
) -> dict[str, Any]:
    """Trains one model with one method and measures it.

    With `safeguard`, the SEHT runs train with
    ``seht_safeguard=keras_seht.GradientBound(safeguard)``.
    """
    (x_train, y_train), (x_test, y_test) = data
    estimator = make_estimator(method, strength)
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = BUILDERS[model_name]()
    if safeguard is None or estimator is None:
        _compile(model, estimator, LEARNING_RATE)
    else:
        model.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            seht=estimator,
            seht_safeguard=keras_seht.GradientBound(safeguard),
        )
    timer = _TrainTimer()
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
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
    weights_finite = _all_finite(model)
    loss_finite = math.isfinite(logs["loss"][-1])
    trace = eigenvalue = float("nan")
    trace_seconds = eig_seconds = float("nan")
    if weights_finite:
        start = time.perf_counter()
        trace = keras_seht.exact_hessian_trace(model, *probe)
        trace_seconds = time.perf_counter() - start
        start = time.perf_counter()
        eigenvalue = keras_seht.hessian_top_eigenvalue(
            model, *probe, iters=EIG_ITERS
        )
        eig_seconds = time.perf_counter() - start
    collapsed = not test_accuracy > DIVERGED_ACCURACY  # NaN counts too
    negative = logs.get("seht_negative_fraction")
    skipped = logs.get("seht_skipped")
    return {
        "model": model_name,
        "method": method,
        "strength": strength,
        "seed": seed,
        "estimator": None if estimator is None else estimator.get_config(),
        "trainable_weights": int(
            sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        ),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "final_train_loss": logs["loss"][-1],
        "weights_finite": weights_finite,
        "diverged": (not weights_finite) or (not loss_finite) or collapsed,
        "diverged_reason": (
            "non-finite weights"
            if not weights_finite
            else "non-finite loss"
            if not loss_finite
            else "accuracy <= 0.2"
            if collapsed
            else None
        ),
        "exact_trace": float(trace),
        "top_eigenvalue": float(eigenvalue),
        "negative_fraction": (
            None if negative is None else float(np.mean(negative))
        ),
        "skipped_steps": None if skipped is None else int(sum(skipped)),
        "train_seconds": timer.seconds,
        "exact_trace_seconds": trace_seconds,
        "top_eigenvalue_seconds": eig_seconds,
        "history": logs,
    }


# --------------------------------------------------------------------------
# Bookkeeping and aggregation
# --------------------------------------------------------------------------


def run_key(
    model: str, method: str, strength: float | None, seed: int
) -> tuple[str, str, float | None, int]:
    """The key that identifies a run (no strength for the baseline)."""
    return (model, method, None if method == "baseline" else strength, seed)


def _record_key(record: dict[str, Any]) -> tuple[str, str, float | None, int]:
    return run_key(
        record["model"], record["method"], record["strength"], record["seed"]
    )


def plan(args: argparse.Namespace) -> list[tuple[str, str, Any, int]]:
    """All runs, baseline first for each model and seed."""
    runs = []
    for model in args.models:
        for seed in args.seeds:
            for method in args.methods:
                strengths = [None] if method == "baseline" else args.strengths
                for strength in strengths:
                    runs.append(run_key(model, method, strength, seed))
    return runs


def add_time_ratios(records: list[dict[str, Any]]) -> None:
    """Sets each record's time ratio to the same model and seed's baseline."""
    base = {
        (r["model"], r["seed"]): r["train_seconds"]
        for r in records
        if r["method"] == "baseline"
    }
    for r in records:
        seconds = base.get((r["model"], r["seed"]))
        r["time_ratio"] = (
            r["train_seconds"] / seconds if seconds else float("nan")
        )


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of seed statistics per model, method and strength."""
    groups: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r["strength"]), []).append(
            r
        )

    def order(key: tuple[str, str, float | None]) -> tuple:
        model, method, strength = key
        return (
            MODELS.index(model),
            0 if strength is None else strength,
            METHODS.index(method),
        )

    rows = []
    for key in sorted(groups, key=order):
        runs = sorted(groups[key], key=lambda r: r["seed"])
        seht = key[1] != "baseline"
        rows.append(
            {
                "model": key[0],
                "method": key[1],
                "strength": key[2],
                "seeds": [r["seed"] for r in runs],
                "test_accuracy": finite_stats(
                    [r["test_accuracy"] for r in runs]
                ),
                "exact_trace": finite_stats([r["exact_trace"] for r in runs]),
                "top_eigenvalue": finite_stats(
                    [r["top_eigenvalue"] for r in runs]
                ),
                "diverged_share": float(np.mean([r["diverged"] for r in runs])),
                "diverged_runs": int(sum(r["diverged"] for r in runs)),
                "time_ratio": finite_stats([r["time_ratio"] for r in runs]),
                "negative_fraction": (
                    finite_stats([r["negative_fraction"] for r in runs])
                    if seht
                    else None
                ),
                "skipped_steps": (
                    int(sum(r["skipped_steps"] for r in runs)) if seht else None
                ),
            }
        )
    return rows


def _cell(
    stats: dict[str, Any] | None,
    fmt: str,
    scale: float = 1.0,
    se_fmt: str | None = None,
) -> str:
    """``mean ± se``, with ``(k/n)`` when only k of the n values were finite.

    Just the mean when all seeds agree or n = 1.
    """
    if stats is None:
        return "-"
    if stats["finite"] == 0:
        return "NaN"
    text = format(stats["mean"] * scale, fmt)
    if math.isfinite(stats["se"]) and stats["se"] > 0:
        text += " ± " + format(stats["se"] * scale, se_fmt or fmt)
    if stats["finite"] < stats["n"]:
        text += f" ({stats['finite']}/{stats['n']})"
    return text


def format_table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """The aggregate table as Markdown, with a caption."""
    lines = [
        f"Digits ({setup['train_samples']} train / {setup['test_samples']} "
        f"test), backend {setup['backend']}, {setup['epochs']} epoch(s) of "
        f"SGD(lr {setup['learning_rate']:g}, momentum {setup['momentum']:g}),"
        f" batch {setup['batch_size']}. Mean ± standard error over seeds "
        "(n = number of seeds; no ± when n = 1 or all seeds agree). tr(H), "
        "λ_max: exact Hessian trace and top "
        "Hessian eigenvalue (power iteration, signed) of the loss on "
        f"{setup['probe_samples']} training samples after training; runs "
        "with non-finite weights are left out, (k/n) then counts the rest. "
        f"{DIVERGENCE[0].upper() + DIVERGENCE[1:]}; the column counts "
        "diverged runs of n. time / base: training time over that of the "
        "same model and seed's baseline. neg. frac.: mean share of "
        "training steps whose probe t was negative (raw t, also when "
        "clipped); skipped: steps with a non-finite penalty, summed over "
        "the n runs.",
        "",
        "| model | method | strength | n | test acc (%) | tr(H) | λ_max "
        "| diverged | time / base | neg. frac. | skipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        strength = "-" if row["strength"] is None else f"{row['strength']:g}"
        skipped = row["skipped_steps"]
        lines.append(
            f"| {row['model']} | {row['method']} | {strength} "
            f"| {len(row['seeds'])} "
            f"| {_cell(row['test_accuracy'], '.1f', 100)} "
            f"| {_cell(row['exact_trace'], '.3g', se_fmt='.2g')} "
            f"| {_cell(row['top_eigenvalue'], '.3g', se_fmt='.2g')} "
            f"| {row['diverged_runs']}/{len(row['seeds'])} "
            f"| {_cell(row['time_ratio'], '.2f')} "
            f"| {_cell(row['negative_fraction'], '.3f')} "
            f"| {'-' if skipped is None else skipped} |"
        )
    return "\n".join(lines)


def _write_text(path: pathlib.Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(str(path), write)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the study; returns what it wrote to the JSON."""
    args = make_parser().parse_args(
        None if argv is None else [str(a) for a in argv]
    )
    train_samples = probe_samples = None
    if args.smoke:
        args.epochs = SMOKE["epochs"]
        args.seeds = args.seeds[:1]
        args.strengths = args.strengths[:1]
        train_samples = SMOKE["train_samples"]
    (x_train, y_train), test = load_digits(seed=DATA_SEED)
    if train_samples is not None:
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    probe_samples = min(
        SMOKE["probe_samples"] if args.smoke else PROBE_SAMPLES, len(x_train)
    )
    probe = (x_train[:probe_samples], y_train[:probe_samples])
    data = ((x_train, y_train), test)

    setup = {
        "backend": keras.config.backend(),
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "optimizer": "SGD",
        "loss": "sparse_categorical_crossentropy on softmax probabilities",
        "data_seed": DATA_SEED,
        "train_samples": int(len(x_train)),
        "test_samples": int(len(test[0])),
        "probe_samples": int(probe_samples),
        "top_eigenvalue_iters": EIG_ITERS,
        "diverged_accuracy": DIVERGED_ACCURACY,
    }
    if args.safeguard is not None:  # absent: older results still resume
        keras_seht.GradientBound(args.safeguard)  # a bad value fails here
        setup["seht_safeguard"] = {"GradientBound": args.safeguard}
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{STEM}.json"
    md_path = out_dir / f"{STEM}.md"

    records: list[dict[str, Any]] = []
    if json_path.exists() and not args.fresh:
        stored = json.loads(json_path.read_text(encoding="utf-8"))
        if stored.get("setup") != setup:
            sys.exit(
                f"{json_path} holds runs of another setup:\n"
                f"  stored:  {stored.get('setup')}\n  current: {setup}\n"
                "Pass --fresh to discard them, or another --output-dir."
            )
        records = stored["runs"]
    done = {_record_key(r) for r in records}
    todo = plan(args)
    pending = [key for key in todo if key not in done]

    print(
        f"curvature stability: backend={setup['backend']}, "
        f"models={','.join(args.models)}, methods={','.join(args.methods)}, "
        f"strengths={','.join(f'{s:g}' for s in args.strengths)}, "
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
            "divergence": DIVERGENCE,
            "setup": setup,
            "arguments": vars(args),
            "versions": versions(),
            "runs": records,
            "aggregates": rows,
        }
        write_json(str(json_path), payload)
        _write_text(md_path, format_table(rows, setup))
        return payload

    payload = checkpoint()
    start = time.perf_counter()
    warmed: set[str] = set()
    with warnings.catch_warnings():
        # torch: jit_compile turned off; skipped steps are counted anyway.
        warnings.simplefilter("ignore")
        for key in pending:
            model_name, method, strength, seed = key
            if model_name not in warmed:
                warm_up(model_name, x_train, y_train)
                warmed.add(model_name)
            record = run_one(
                model_name,
                method,
                strength,
                seed,
                data,
                probe,
                args.epochs,
                args.safeguard,
            )
            records.append(record)
            payload = checkpoint()
            s = "-" if strength is None else f"{strength:g}"
            note = (
                f"  DIVERGED ({record['diverged_reason']})"
                if record["diverged"]
                else ""
            )
            neg = record["negative_fraction"]
            print(
                f"[{todo.index(key) + 1}/{len(todo)}] {model_name:<8} "
                f"{method:<12} s={s:<6} seed={seed}: "
                f"acc {100 * record['test_accuracy']:5.1f}%  "
                f"tr(H) {record['exact_trace']:9.4g}  "
                f"λmax {record['top_eigenvalue']:9.4g}  "
                f"neg {'-' if neg is None else f'{neg:.2f}'}  "
                f"skipped {record['skipped_steps'] or 0}  "
                f"time {record['time_ratio']:.2f}x base  "
                f"[{time.perf_counter() - start:.0f}s elapsed]{note}",
                flush=True,
            )

    print()
    print(format_table(payload["aggregates"], setup))
    print()
    print(f"Wrote {json_path} and {md_path}.")
    return payload


if __name__ == "__main__":
    main()
