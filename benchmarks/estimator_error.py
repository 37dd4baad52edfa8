r"""Relative error of the SEHT trace estimators vs the number of probes.

What it measures. The demo's 64-32-32-10 tanh MLP (3,466 weights, three
weight-bearing layers) is trained for ``--epochs`` epochs of plain Keras
on scikit-learn's digits (embedded, no download), so that its Hessian is
that of a partly trained network rather than of the initialization. On a
fixed batch (the first ``--batch`` training samples, inference mode) the
exact Hessian trace tr(H) (``keras_seht.exact_hessian_trace``) is the
truth. For every estimator, number of probes N in ``--samples`` and seed
in ``--seeds``, ``keras_seht.hessian_trace(model, x, y, estimator,
samples=N, seed=...)`` (the mean of N independent probes' t = σᵀHσ) is
one estimate; every (N, seed) pair draws its own probes (the seeds are
``SEED_STRIDE`` apart: see `measure`).

Estimators: ``SEHTH()`` (Hutchinson, Rademacher σ, E[t] = tr(H));
``SEHTD(p, unbiased=True)`` (sparse σ rescaled so that E[t] = tr(H)); and
the paper's ``SEHTD(p)``, whose expectation is the partial trace
Σ_l π_l·2p·tr(H_ll) (``estimator.expectation`` of the exact diagonal),
not tr(H).

For each estimator and N it reports, over seeds, the RMS relative error
against tr(H), the RMS relative error against the estimator's own
expectation E[t] (the same for the unbiased ones), and the mean relative
deviation from tr(H) (the bias, plus noise). It writes
``estimator_error.json`` (every estimate, the exact traces per layer,
seconds per probe, versions) to ``--output-dir`` (default
``benchmarks/results``) and the figure to ``--figure`` (default
``docs/img/estimator_error.png``)::

    OMP_NUM_THREADS=1 python benchmarks/estimator_error.py
    python benchmarks/estimator_error.py --smoke --output-dir /tmp/ee \
        --figure /tmp/ee/estimator_error.png

The Keras backend is whatever ``KERAS_BACKEND`` says (torch by default,
chosen by keras_seht). Seconds per probe come from a shared machine and
are rough.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from typing import Any, Sequence

# keras_seht before keras: it picks the default (torch) backend.
import keras_seht

# isort: split
import keras
import numpy as np

from keras_seht._io import save_figure, write_json
from keras_seht.data import load_digits
from keras_seht.experiments.demo import build_mlp
from keras_seht.experiments.runner import versions

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "img" / "estimator_error.png"
DEFAULT_SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Seeds of different estimates differ by this much (more than the random
#: draws one estimate makes).
SEED_STRIDE = 1_000_000
#: `--smoke`: a few probe counts and seeds, a short fit, a small batch.
SMOKE = {"samples": [1, 4], "seeds": 2, "epochs": 1, "batch": 32}


def estimators(p: float) -> dict[str, keras_seht.CurvatureEstimator]:
    """The estimators compared, by label (one probe each, `max_iter=1`)."""
    return {
        "SEHT-H": keras_seht.SEHTH(),
        f"SEHT-D(p={p:g}, unbiased)": keras_seht.SEHTD(p=p, unbiased=True),
        f"SEHT-D(p={p:g})": keras_seht.SEHTD(p=p),
    }


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers; got {value!r}"
        )
    return sorted(set(numbers))


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--samples",
        type=_int_list,
        default=list(DEFAULT_SAMPLES),
        help="comma-separated numbers of probes N",
    )
    parser.add_argument(
        "--seeds", type=int, default=40, help="repetitions per N"
    )
    parser.add_argument(
        "--p", type=float, default=0.05, help="SEHT-D's p (and layer_p)"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="plain Keras epochs first"
    )
    parser.add_argument(
        "--batch", type=int, default=256, help="samples in the fixed batch"
    )
    parser.add_argument("--output-dir", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--figure", type=pathlib.Path, default=FIGURE)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick run: {SMOKE}",
    )
    return parser


def trained_model(epochs: int) -> tuple[keras.Model, Any, Any]:
    """The tanh MLP after `epochs` of plain SGD, and the training data."""
    keras.utils.set_random_seed(0)
    (x, y), _ = load_digits(seed=0)
    model = build_mlp(activation="tanh", name="mlp_tanh")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    if epochs:
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model, x, y


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def measure(
    model: keras.Model,
    x: Any,
    y: Any,
    estimator: keras_seht.CurvatureEstimator,
    samples: Sequence[int],
    seeds: int,
) -> tuple[dict[int, list[float]], float]:
    """Estimates per N (one per seed) and the seconds per probe."""
    estimates: dict[int, list[float]] = {}
    probes, start = 0, time.perf_counter()
    for i, n in enumerate(samples):
        estimates[n] = [
            float(
                keras_seht.hessian_trace(
                    model, x, y, estimator=estimator, samples=n, seed=seed
                )
            )
            # A distinct seed per (N, repetition), SEED_STRIDE apart: on
            # torch, SeedGenerator(s + 1) yields SeedGenerator(s)'s stream
            # shifted by one draw, so nearby seeds would share probes.
            for seed in range(
                i * seeds * SEED_STRIDE,
                (i + 1) * seeds * SEED_STRIDE,
                SEED_STRIDE,
            )
        ]
        probes += n * seeds
    return estimates, (time.perf_counter() - start) / probes


def summarize(
    estimates: dict[int, list[float]], truth: float, expectation: float
) -> list[dict[str, float]]:
    """One row of relative errors of the estimates per number of samples."""
    rows = []
    for n, values in estimates.items():
        v = np.asarray(values, "float64")
        rows.append(
            {
                "samples": n,
                "rms_rel_error": _rms((v - truth) / abs(truth)),
                "rms_rel_error_vs_expectation": _rms(
                    (v - expectation) / abs(expectation)
                ),
                "mean_rel_deviation": float(np.mean(v - truth) / abs(truth)),
            }
        )
    return rows


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    """Plots the relative errors against the number of samples into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    markers = iter("osD^v")
    for label, entry in results["estimators"].items():
        rows = entry["rows"]
        n = [r["samples"] for r in rows]
        marker = next(markers)
        left.plot(
            n, [r["rms_rel_error"] for r in rows], marker=marker, label=label
        )
        right.plot(
            n,
            [r["rms_rel_error_vs_expectation"] for r in rows],
            marker=marker,
            label=label,
        )
    n = np.asarray(results["setup"]["samples"], "float64")
    first = results["estimators"]["SEHT-H"]["rows"][0]
    for axis in (left, right):
        axis.plot(
            n,
            first["rms_rel_error"] * np.sqrt(n[0] / n),
            "k:",
            label="1/√N",
        )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("probes N")
        axis.grid(True, which="both", alpha=0.3)
    left.set_ylabel("RMS relative error")
    left.set_title("vs the exact trace tr(H)")
    right.set_title("vs the estimator's own expectation E[t]")
    right.legend(fontsize=8)
    setup = results["setup"]
    fig.suptitle(
        f"{setup['model']}, batch {setup['batch']}, "
        f"tr(H) = {results['exact_trace']:.3g}, "
        f"{setup['seeds']} seeds per point, {results['backend']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, str(path), dpi=100)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; writes and returns its results."""
    args = make_parser().parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    start = time.perf_counter()
    model, x_train, y_train = trained_model(args.epochs)
    x, y = x_train[: args.batch], y_train[: args.batch]
    layout = keras_seht.weight_layout(model)
    diagonal = keras_seht.hessian_diagonal(model, x, y)
    truth = keras_seht.exact_hessian_trace(model, x, y)
    layer_traces = [
        float(sum(np.sum(diagonal[i], dtype="float64") for i in group))
        for group in layout.groups
    ]
    results: dict[str, Any] = {
        "setup": {
            "model": "MLP 64-32-32-10 tanh (3,466 weights)",
            "trained_epochs": args.epochs,
            "batch": len(x),
            "samples": args.samples,
            "seeds": args.seeds,
            "p": args.p,
            "statistic": (
                "RMS over seeds of (estimate - reference) / |reference|; "
                "an estimate is keras_seht.hessian_trace(samples=N)"
            ),
        },
        "backend": keras.config.backend(),
        "exact_trace": truth,
        "layer_traces": dict(zip(layout.names, layer_traces)),
        "estimators": {},
        "versions": versions(),
    }
    for label, estimator in estimators(args.p).items():
        expectation = estimator.expectation(diagonal, layout)
        estimates, seconds = measure(
            model, x, y, estimator, args.samples, args.seeds
        )
        rows = summarize(estimates, truth, expectation)
        results["estimators"][label] = {
            "config": estimator.get_config(),
            "expectation": expectation,
            "seconds_per_probe": seconds,
            "rows": rows,
            "estimates": {str(n): v for n, v in estimates.items()},
        }
        print(
            f"{label}: E[t] = {expectation:.4g} (tr(H) = {truth:.4g}); "
            + ", ".join(
                f"N={r['samples']}: {r['rms_rel_error']:.3f}" for r in rows
            )
        )
    results["wall_seconds"] = time.perf_counter() - start
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(str(args.output_dir / "estimator_error.json"), results)
    plot(results, args.figure)
    print(
        f"wrote {args.output_dir / 'estimator_error.json'} and "
        f"{args.figure} in {results['wall_seconds']:.0f} s"
    )
    if not math.isfinite(truth):
        raise SystemExit("the exact trace is not finite")
    return results


if __name__ == "__main__":
    main()
