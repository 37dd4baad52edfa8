"""CIFAR-10, ResNet-18: the SEHT paper's first table.

    python examples/cifar10_resnet18.py                       # 3 methods
    python examples/cifar10_resnet18.py --methods seht-d --seeds 0-4
    python examples/cifar10_resnet18.py --methods seht-d+cutout,mixup
    python examples/cifar10_resnet18.py --methods sam,asam,gnp,seht-d+sam
    python examples/cifar10_resnet18.py --smoke               # minutes, CPU

The paper's recipe is the default: ResNet-18 with the CIFAR stem
(`keras_seht.applications.resnet18_cifar`), SGD with learning rate 0.01,
momentum 0.9 and (PyTorch-style) weight decay 5e-4, batch size 32, 200
epochs of cosine annealing, random crop (4-pixel padding) and horizontal
flip, per-channel normalization. SEHT-D(1, 0.01) and SEHT-H(5) at
strength 1e-3 (``--strength``, ``--p``, ``--max-iter``). The methods are
listed in `keras_seht.experiments.cifar`; the paper reports SEHT-D
95.37 and SEHT-H 95.59 against 94.00 for the baseline (best test
accuracy over epochs). Sharpness-aware methods: ``sam`` (SAM, ρ = 0.05,
Foret et al.'s for CIFAR-10), ``asam`` (ASAM, ρ = 0.5, Kwon et al.'s
CIFAR-10 command) and ``gnp`` (gradient-norm penalty, r = 0.01), alone or
with others (``sam+cutout``, ``seht-d+sam``); ``--rho`` and
``--gnp-strength`` change them.

Each run writes ``OUTPUT_DIR/METHOD/seed_S/results.json``, checkpoints
every epoch and resumes after a kill; the script ends with the table of
``python -m keras_seht.experiments.report OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse

from keras_seht import distributed
from keras_seht.applications import resnet18_cifar
from keras_seht.experiments import cifar, cli, recipes


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ResNet-18's argument ``--width``."""
    parser.add_argument(
        "--width",
        type=cli.positive_int,
        default=64,
        help="filters of the first stage (default: 64, the paper's)",
    )


def build_model(args: argparse.Namespace, parts: set[str], seed: int):
    """The ResNet-18 of a run, with DropBlock when the method's `parts` ask."""
    width = min(args.width, 8) if args.smoke else args.width
    return resnet18_cifar(
        num_classes=10,
        width=width,
        dropblock=0.9 if "dropblock" in parts else None,
        seed=seed,
    )


RECIPE = cifar.CifarRecipe(
    experiment="cifar10_resnet18",
    num_classes=10,
    build_model=build_model,
    add_model_arguments=add_model_arguments,
    learning_rate=0.01,
    momentum=0.9,
    l2_decay=5e-4,
    epochs=200,
    batch_size=32,
    schedule=lambda args: recipes.cosine(args.learning_rate, args.epochs),
    cutout_size=16,
    methods=tuple(c for c in recipes.COMPONENTS if c != "dropout"),
    default_methods=("baseline", "seht-d", "seht-h"),
    description="CIFAR-10 ResNet-18 with SEHT and the paper's baselines.",
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
