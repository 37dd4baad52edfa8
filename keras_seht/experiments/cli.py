"""Command-line pieces shared by the example scripts and the demo."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def non_negative_float(value: str) -> float:
    """An argparse type: a finite number >= 0."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0."""
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def seeds(value: str) -> list[int]:
    """An argparse type: ``"0,1,2"`` or a range ``"0-4"`` of seeds >= 0."""
    found: list[int] = []
    try:
        for part in value.split(","):
            if "-" in part.strip()[1:]:
                low, high = part.split("-")
                found.extend(range(int(low), int(high) + 1))
            else:
                found.append(int(part))
    except ValueError:
        found = [-1]
    if not found or min(found) < 0:
        raise argparse.ArgumentTypeError(
            f"must be seeds >= 0 like '0,1,2' or '0-4', got {value!r}"
        )
    return list(dict.fromkeys(found))


def choices(allowed: Sequence[str], combine: bool = False) -> Any:
    """An argparse type: a comma-separated list of names from `allowed`.

    With `combine`, a list of ``baseline`` and ``+``-joins of names from
    `allowed` (``seht-d+cutout``).
    """

    def known(name: str) -> bool:
        if not combine:
            return name in allowed
        parts = name.split("+")
        return name == "baseline" or (
            len(set(parts)) == len(parts) and all(p in allowed for p in parts)
        )

    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if not known(n)]
        if unknown or not names:
            what = "'baseline' or '+'-joins of " if combine else ""
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {what}"
                f"{', '.join(allowed)}; got {value!r}"
            )
        return list(dict.fromkeys(names))

    return parse


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    methods: Sequence[str],
    default_methods: Sequence[str],
    epochs: int,
    batch_size: int,
    output_dir: str,
    data_dir_help: str,
    download_flag: bool = False,
    combine: bool = False,
) -> None:
    """Adds the arguments every example has.

    These are ``--methods``, ``--seeds``,
    ``--epochs``, ``--batch-size``, ``--output-dir``, ``--data-dir``,
    ``--smoke``, ``--verbose`` (and ``--no-download`` with
    `download_flag`). With `combine`, a method is ``baseline`` or
    ``+``-joined names from `methods`.
    """
    parser.add_argument(
        "--methods",
        "--method",
        type=choices(methods, combine),
        default=list(default_methods),
        help=f"comma-separated methods, from: "
        f"{'baseline and +-joins of ' if combine else ''}"
        f"{', '.join(methods)} (default: {','.join(default_methods)})",
    )
    parser.add_argument(
        "--seeds",
        type=seeds,
        default=[0],
        help="seeds, e.g. 0,1,2 or 0-4 (default: 0)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=epochs,
        help=f"training epochs (default: {epochs})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"training batch size (default: {batch_size})",
    )
    parser.add_argument(
        "--output-dir",
        default=output_dir,
        help="where each run writes METHOD/seed_S/results.json and its "
        f"checkpoint, and the report goes (default: {output_dir})",
    )
    parser.add_argument("--data-dir", default=None, help=data_dir_help)
    if download_flag:
        parser.add_argument(
            "--no-download",
            action="store_true",
            help="fail instead of downloading data missing from --data-dir",
        )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny subset and a few steps per run, to check that "
        "everything runs (seconds to minutes on CPU)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="Keras fit verbosity: 1 progress bar, 2 one line per epoch "
        "(default: 1 on a terminal, else 2)",
    )


def run_dir(output_dir: str, method: str, seed: int) -> str:
    """The folder of one run: ``OUTPUT_DIR/METHOD/seed_SEED``."""
    return os.path.join(output_dir, method, f"seed_{seed}")


def fit_verbosity(args: argparse.Namespace) -> int:
    """``--verbose``, or 1 (progress bar) on a terminal and 2 elsewhere."""
    if args.verbose is not None:
        return args.verbose
    import sys

    return 1 if sys.stdout.isatty() else 2


def run_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The JSON-able config of a run: the arguments plus `extra`."""
    config = {
        k: v for k, v in vars(args).items() if k not in ("methods", "seeds")
    }
    config.update(extra)
    return config


def apply_smoke(args: argparse.Namespace, caps: dict[str, int]) -> None:
    """For ``--smoke``: lowers each argument named in `caps` to at most its cap.

    A value already below its cap stays.
    """
    for key, cap in caps.items():
        setattr(args, key, min(getattr(args, key), cap))
