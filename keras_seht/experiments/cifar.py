"""The CIFAR experiments of the SEHT paper.

Shared by the example scripts ``examples/cifar10_resnet18.py`` and
``examples/cifar100_wrn.py``.

A `CifarRecipe` holds what differs between the two (model, optimizer,
schedule, Cutout size); `main` parses the common command line, loads the
data through tensorflow-datasets, and trains one resumable run per
(method, seed) with `keras_seht.experiments.runner.run_training`, then
prints the paper-style table (`keras_seht.experiments.report`).

Methods (``--methods``, ``+`` combines): ``baseline``; ``seht-d``
(SEHT-D(``--p``, ``--max-iter`` or 1) at ``--strength``), ``seht-h``
(SEHT-H(``--max-iter`` or 5)); ``jacobian`` (n_proj 1, λ 0.01);
``confidence-penalty`` (0.1); ``label-smoothing`` (0.1); ``cutout``
(16x16 CIFAR-10, 8x8 CIFAR-100); ``mixup`` (α = 1); ``dropout`` (0.3 in
the wide blocks; WRN only); ``dropblock`` (block 7, keep 0.9, after the
second and third stages, on their 16x16 and 8x8 maps: a 7x7 block does not
fit the last stage's 4x4 maps); the sharpness-aware methods ``sam``
(SAM, ρ = ``--rho`` or the recipe's: 0.05 on CIFAR-10, Foret et al.; 0.1
on CIFAR-100, Kwon et al.'s official command), ``asam`` (ASAM, η = 0.01,
ρ 0.5 on CIFAR-10 and 1.0 on CIFAR-100, Kwon et al.'s official commands)
and ``gnp`` (``GradientNorm(method="finite_difference")``, Zhao et al.'s
r = 0.01, at ``--gnp-strength``, see `recipes.GNP_STRENGTH`), at most one
of them per method (``seht-d+sam``: SAM's update plus the SEHT penalty's
gradient at w). Weight decay 5e-4 is part of every method's optimizer, as
in the paper. The sharpness-aware methods keep this recipe (batch 32,
the SEHT paper's learning rates and schedules), not their own papers'
training recipes: those papers' accuracies are not what these runs
reproduce.

The test set is the validation set of every epoch: ``val_accuracy`` is
the test accuracy after each epoch, and the results hold both the final
(``test_accuracy``) and the best over epochs (``best_test_accuracy``, what
the authors' scripts report).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

import keras
import numpy as np

from keras_seht.data import ArrayDataset, load_cifar
from keras_seht.data.pipeline import cutout, mixup, random_crop_flip
from keras_seht.experiments import cli, recipes, report
from keras_seht.experiments.runner import Schedule, run_training
from keras_seht.losses import SparseCategoricalCrossentropy

#: Smoke mode: a few images and steps, and a tiny model.
SMOKE = {"train_limit": 64, "test_limit": 32, "epochs": 2, "batch_size": 16}


@dataclasses.dataclass(frozen=True)
class CifarRecipe:
    """What one CIFAR example fixes.

    Attributes:
        experiment: The results' experiment name.
        num_classes: 10 or 100.
        build_model: ``build_model(args, parts, seed)`` -> logits model;
            `parts` are the method's components (``"dropout"``, ...).
        add_model_arguments: Adds the model's own flags to the parser.
        learning_rate, momentum, l2_decay, epochs, batch_size: Defaults.
        schedule: ``schedule(args) -> (epoch, history) -> lr``.
        cutout_size: Cutout's square side.
        methods: The method components the script knows; ``--methods``
            takes ``baseline`` and ``+``-joins of them.
        default_methods: What runs without ``--methods``.
        description: The script's one-line help.
        sam_rho, asam_rho: The default radii of ``sam`` and ``asam``.
    """

    experiment: str
    num_classes: int
    build_model: Callable[[argparse.Namespace, set[str], int], keras.Model]
    add_model_arguments: Callable[[argparse.ArgumentParser], None]
    learning_rate: float
    momentum: float
    l2_decay: float
    epochs: int
    batch_size: int
    schedule: Callable[[argparse.Namespace], Schedule]
    cutout_size: int
    methods: tuple[str, ...]
    default_methods: tuple[str, ...]
    description: str
    sam_rho: float = recipes.SAM_RHO
    asam_rho: float = recipes.ASAM_RHO


def make_parser(recipe: CifarRecipe) -> argparse.ArgumentParser:
    """The command-line parser of a CIFAR example, from its `recipe`."""
    parser = argparse.ArgumentParser(description=recipe.description)
    cli.add_run_arguments(
        parser,
        methods=recipe.methods,
        default_methods=recipe.default_methods,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        output_dir=f"runs/{recipe.experiment}",
        data_dir_help="tensorflow-datasets data directory (default: TFDS' "
        "own, ~/tensorflow_datasets)",
        download_flag=True,
        combine=True,
    )
    parser.add_argument(
        "--strength",
        type=cli.non_negative_float,
        default=1e-3,
        help="SEHT penalty strength λ (default: 1e-3, the paper's)",
    )
    parser.add_argument(
        "--p",
        type=float,
        default=0.01,
        help="SEHT-D's probability of a non-zero probe entry (default: 0.01)",
    )
    parser.add_argument(
        "--max-iter",
        type=cli.positive_int,
        default=None,
        help="probes per step (default: 1 for seht-d, 5 for seht-h)",
    )
    parser.add_argument(
        "--rho",
        type=cli.positive_float,
        default=None,
        help=f"SAM's / ASAM's radius ρ (default: {recipe.sam_rho} for sam, "
        f"{recipe.asam_rho} for asam)",
    )
    parser.add_argument(
        "--gnp-strength",
        type=cli.non_negative_float,
        default=recipes.GNP_STRENGTH,
        help="strength of gnp's squared gradient norm, finite-difference "
        "step r = 0.01 (default: %(default)s: GNP's α = 0.8 where ‖g‖ = 1)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=recipe.learning_rate
    )
    parser.add_argument("--momentum", type=float, default=recipe.momentum)
    parser.add_argument(
        "--weight-decay",
        type=cli.non_negative_float,
        default=recipe.l2_decay,
        help="L2 weight decay, PyTorch-style (default: %(default)s)",
    )
    recipe.add_model_arguments(parser)
    return parser


def _augmentations(
    recipe: CifarRecipe, parts: set[str]
) -> list[Callable[..., Any]]:
    found = [random_crop_flip(4)]
    if "cutout" in parts:
        found.append(cutout(recipe.cutout_size))
    if "mixup" in parts:
        found.append(mixup(1.0, recipe.num_classes))
    return found


def _loss_and_metrics(
    recipe: CifarRecipe, parts: set[str]
) -> tuple[Any, list[Any]]:
    if "mixup" in parts:  # soft (mixed one-hot) targets
        loss: Any = keras.losses.CategoricalCrossentropy(from_logits=True)
        top5: Any = keras.metrics.TopKCategoricalAccuracy(5, "top5_accuracy")
    else:
        smoothing = 0.1 if "label-smoothing" in parts else 0.0
        loss = SparseCategoricalCrossentropy(
            from_logits=True, label_smoothing=smoothing
        )
        top5 = keras.metrics.SparseTopKCategoricalAccuracy(5, "top5_accuracy")
    metrics: list[Any] = ["accuracy"]
    if recipe.num_classes > 10:
        metrics.append(top5)
    return loss, metrics


def train_one(
    recipe: CifarRecipe,
    method: str,
    seed: int,
    args: argparse.Namespace,
    data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """One resumable run of `method` with `seed`; returns its results."""
    (x, y), (x_test, y_test) = data
    parts = recipes.parse_method(method)
    if "mixup" in parts:
        y_test = np.eye(recipe.num_classes, dtype="float32")[y_test]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = recipe.build_model(args, parts, seed)
    loss, metrics = _loss_and_metrics(recipe, parts)
    model.compile(
        optimizer=recipes.CoupledSGD(
            learning_rate=args.learning_rate,
            momentum=args.momentum,
            l2_decay=args.weight_decay,
        ),
        loss=loss,
        metrics=metrics,
        seht=recipes.penalties(
            parts,
            args.strength,
            args.p,
            args.max_iter,
            sam_rho=recipe.sam_rho if args.rho is None else args.rho,
            asam_rho=recipe.asam_rho if args.rho is None else args.rho,
            gnp_strength=args.gnp_strength,
        )
        or None,
    )

    def evaluate(model: keras.Model, history: dict[str, list]) -> dict:
        test = model.evaluate(
            x_test, y_test, batch_size=500, verbose=0, return_dict=True
        )
        final = {
            "test_accuracy": test["accuracy"],
            "best_test_accuracy": max(history["val_accuracy"]),
        }
        if "top5_accuracy" in test:
            final["test_top5_accuracy"] = test["top5_accuracy"]
        return final

    return run_training(
        model,
        ArrayDataset(
            x,
            y,
            args.batch_size,
            seed=seed,
            augment=_augmentations(recipe, parts),
        ),
        epochs=args.epochs,
        output_dir=cli.run_dir(args.output_dir, method, seed),
        experiment=recipe.experiment,
        method=method,
        seed=seed,
        config=cli.run_config(args, method=method, seed=seed),
        evaluate=evaluate,
        validation_data=(x_test, y_test),
        learning_rate=recipe.schedule(args),
        verbose=cli.fit_verbosity(args),
    )


def main(
    recipe: CifarRecipe, argv: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Parses `argv`, runs every (method, seed), prints the table."""
    parser = make_parser(recipe)
    args = parser.parse_args(argv)
    for method in args.methods:  # fail before loading any data
        try:
            recipes.parse_method(method, recipe.methods)
        except ValueError as error:
            parser.error(f"--methods: {error}")
    limits: dict[str, Any] = {"train_limit": None, "test_limit": None}
    if args.smoke:
        limits = {k: SMOKE[k] for k in limits}
        cli.apply_smoke(args, {k: SMOKE[k] for k in ("epochs", "batch_size")})
    data = load_cifar(
        recipe.num_classes,
        args.data_dir,
        download=not args.no_download,
        **limits,
    )
    results = [
        train_one(recipe, method, seed, args, data)
        for method in args.methods
        for seed in args.seeds
    ]
    report.main([args.output_dir])
    return results


def run_script(recipe: CifarRecipe) -> None:
    """The example scripts' ``__main__``."""
    main(recipe, sys.argv[1:])
