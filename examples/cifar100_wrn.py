"""CIFAR-100, WRN-28-10: the SEHT paper's second table.

    python examples/cifar100_wrn.py                      # 4 methods
    python examples/cifar100_wrn.py --methods seht-d+dropout --seeds 0-2
    python examples/cifar100_wrn.py --smoke              # minutes, CPU

The paper's recipe is the default: WRN-28-10
(`keras_seht.applications.wide_resnet`), SGD with learning rate 0.1
divided by 5 at epochs 60, 120 and 160, momentum 0.9, (PyTorch-style)
weight decay 5e-4, batch size 32, 200 epochs, random crop and flip,
per-channel normalization; ``dropout`` is 0.3 inside the wide blocks.
The paper's best, SEHT-D with dropout 0.3, reaches 77.75 top-1. Cutout
is 8x8 here. The methods are listed in `keras_seht.experiments.cifar`;
the sharpness-aware ones (``sam``, ``asam``, ``gnp``, ``seht-d+sam``, ...)
use Kwon et al.'s CIFAR-100 radii, SAM ρ = 0.1 and ASAM ρ = 1.0
(``--rho``).

Each run writes ``OUTPUT_DIR/METHOD/seed_S/results.json`` (with
``test_top5_accuracy``), checkpoints every epoch and resumes after a
kill; the script ends with the table of ``python -m
keras_seht.experiments.report OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse

from keras_seht import distributed
from keras_seht.applications import wide_resnet
from keras_seht.experiments import cifar, cli, recipes


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the Wide ResNet's arguments: depth, widening, dropout rate."""
    parser.add_argument(
        "--depth",
        type=cli.positive_int,
        default=28,
        help="WRN depth, 6n+4 (default: 28)",
    )
    parser.add_argument(
        "--widen",
        type=cli.positive_int,
        default=10,
        help="WRN widening factor (default: 10)",
    )
    parser.add_argument(
        "--dropout-rate",
        type=float,
        default=0.3,
        help="dropout of the 'dropout' method (default: 0.3)",
    )


def build_model(args: argparse.Namespace, parts: set[str], seed: int):
    """The Wide ResNet of a run, with the dropout or DropBlock of `parts`."""
    depth, widen = (10, 1) if args.smoke else (args.depth, args.widen)
    return wide_resnet(
        depth=depth,
        width=widen,
        dropout=args.dropout_rate if "dropout" in parts else 0.0,
        dropblock=0.9 if "dropblock" in parts else None,
        num_classes=100,
        seed=seed,
    )


RECIPE = cifar.CifarRecipe(
    experiment="cifar100_wrn",
    num_classes=100,
    build_model=build_model,
    add_model_arguments=add_model_arguments,
    learning_rate=0.1,
    momentum=0.9,
    l2_decay=5e-4,
    epochs=200,
    batch_size=32,
    schedule=lambda args: recipes.step_decay(
        args.learning_rate, (60, 120, 160), 0.2
    ),
    cutout_size=8,
    methods=recipes.COMPONENTS,
    default_methods=("baseline", "dropout", "seht-d", "seht-d+dropout"),
    description="CIFAR-100 WRN-28-10 with SEHT and the paper's baselines.",
    # Kwon et al.'s official CIFAR-100 commands (SamsungLabs/ASAM).
    sam_rho=0.1,
    asam_rho=1.0,
)


def make_parser():
    """The command-line parser of this example."""
    return cifar.make_parser(RECIPE)


def main(argv=None):
    """Runs the example with the arguments `argv`; returns the results."""
    return cifar.main(RECIPE, argv)


if __name__ == "__main__":
    distributed.setup_from_environment()  # torchrun's workers, if any
    cifar.run_script(RECIPE)
