"""Writes README.md's generated blocks from the committed results files.

A generated block sits between two markers in README.md::

    <!-- demo-table:begin -->
    ...
    <!-- demo-table:end -->

and holds what its entry of `BLOCKS` renders from one results file under
``benchmarks/results/`` (the demo's table: ``demo_torch.json``, written by
``python -m keras_seht.experiments.demo``). An entry may also draw an image
from the same file (the demo's plot, ``docs/img/demo_torch.png``).

    python scripts/readme_tables.py           # rewrite the blocks and images
    python scripts/readme_tables.py --check   # exit 1 if a block is stale

``tests/test_readme_tables.py`` runs the check, so a results file cannot
change without its README block. The images are not compared (their bytes
depend on the matplotlib version); ``--check`` only requires that they
exist. To add a block: put its two markers in README.md and one `Block`
in `BLOCKS`.

Rendering imports the code that formats each table (the demo's imports
Keras; the backend does not matter, nothing is computed).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclasses.dataclass(frozen=True)
class Block:
    """One generated block of README.md.

    Attributes:
        results: The results file it is rendered from, relative to the
            repository root.
        render: ``render(results) -> str``: the block's Markdown from the
            decoded results file.
        image: Optional ``(path, draw)``: ``draw(path, results)`` writes an
            image (path relative to the root) that the README shows next
            to the block; redrawn when the blocks are rewritten.
    """

    results: str
    render: Callable[[dict[str, Any]], str]
    image: tuple[str, Callable[[str, dict[str, Any]], None]] | None = None


def _demo_table(results: dict[str, Any]) -> str:
    from keras_seht.experiments import demo

    return demo.format_table(results)


def _demo_plot(path: str, results: dict[str, Any]) -> None:
    from keras_seht.experiments import demo

    demo.plot_sweep(path, results)


def _signed(stats: dict[str, Any] | None, scale: float = 100.0) -> str:
    """``+1.2 ± 0.3`` (percentage points by default), ``-`` without data."""
    if stats is None or not stats.get("finite"):
        return "-"
    mean, se = scale * stats["mean"], scale * stats["se"]
    text = f"{mean:+.1f}"
    if se == se:  # not NaN (one finite value has no standard error)
        text += f" ± {se:.1f}"
    return text


def _study_summary(results: dict[str, Any]) -> str:
    """The "does it help?" study: paired accuracy differences, one table.

    Rows are the methods, columns the data set and model pairs; a cell is
    the mean ± standard error over seeds of the per-seed difference in
    final test accuracy to the same-seed baseline, in percentage points,
    bold where `benchmarks/generalization.py`'s verdict says "better" or
    "worse" (beyond 2 standard errors of 0).
    """
    rows = results["aggregates"]
    combos = list(dict.fromkeys((r["data"], r["model"]) for r in rows))
    setup = results["setup"]
    seeds = max(len(r["seeds"]) for r in rows)
    epochs = ", ".join(f"{d} {e}" for d, e in setup["epochs"].items())
    lines = [
        f"Backend {setup['backend']}, {seeds} seeds, epochs: {epochs}. "
        "Each cell: final test accuracy minus the same seed's baseline, in "
        "percentage points (mean ± standard error over seeds); **bold**: "
        "beyond 2 standard errors of 0. The baseline row gives its "
        "accuracy in %.",
        "",
        "| method | " + " | ".join(f"{d} {m}" for d, m in combos) + " |",
        "|---|" + "---:|" * len(combos),
    ]
    by_key = {(r["data"], r["model"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        label = next(r["label"] for r in rows if r["method"] == method)
        cells = []
        for data, model in combos:
            row = by_key.get((data, model, method))
            if row is None:
                cells.append("-")
            elif method == "baseline":
                cells.append(_signed(row["test_accuracy"]).lstrip("+"))
            else:
                cell = _signed(row["delta_test_accuracy"])
                if row["verdict_test_accuracy"] in ("better", "worse"):
                    cell = f"**{cell}**"
                if row["finite_runs"] < len(row["seeds"]):
                    cell += (
                        f" ({row['finite_runs']}/{len(row['seeds'])} finite)"
                    )
                cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The step-overhead results of each backend, in the cost table's order.
COST_FILES = {
    "torch": "step_overhead_torch.json",
    "JAX": "step_overhead_jax.json",
    "TensorFlow": "step_overhead_tensorflow.json",
}
#: The estimators of the cost table (the benchmark's method names).
COST_METHODS = {
    "SEHT-D(p=0.01)": "SEHT-D(p=0.01)",
    "SEHT-D(p=0.05)": "SEHT-D(p=0.05)",
    "SEHT-H(1)": "SEHT-H(1)",
    "SEHT-H(5)": "SEHT-H(5)",
    "SEHT-H(1) finite_difference": "SEHT-H(1), finite difference",
    "SEHT-H(1) antithetic": "SEHT-H(1), antithetic",
}


def _cost_table(torch_results: dict[str, Any]) -> str:
    """Mean step time over plain Keras' on the benchmark ResNet, per backend.

    From ``benchmarks/results/step_overhead_<backend>.json`` (the torch
    file is the block's own; the JAX and TensorFlow files are read here).
    """
    tables = {}
    for backend, name in COST_FILES.items():
        if backend == "torch":
            tables[backend] = torch_results
            continue
        path = ROOT / "benchmarks" / "results" / name
        with open(path, encoding="utf-8") as f:
            tables[backend] = json.load(f)
    lines = [
        "| estimator | " + " | ".join(COST_FILES) + " |",
        "|---|" + "---:|" * len(COST_FILES),
    ]
    for method, label in COST_METHODS.items():
        cells = []
        for results in tables.values():
            time = results["models"]["resnet"]["time"].get(method)
            cells.append("-" if time is None else f"{time['mean']:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Marker name -> block. The markers are ``<!-- NAME:begin -->`` and
#: ``<!-- NAME:end -->``.
BLOCKS: dict[str, Block] = {
    "demo-table": Block(
        results="benchmarks/results/demo_torch.json",
        render=_demo_table,
        image=("docs/img/demo_torch.png", _demo_plot),
    ),
    "study-table": Block(
        results="benchmarks/results/generalization.json",
        render=_study_summary,
    ),
    "cost-table": Block(
        results="benchmarks/results/step_overhead_torch.json",
        render=_cost_table,
    ),
}


def load_results(block: Block) -> dict[str, Any]:
    """The decoded results file of `block`."""
    with open(ROOT / block.results, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def render(name: str) -> str:
    """The text between the markers of block `name`.

    A comment naming the generator and the results file, then the
    rendered Markdown, each on their own lines.
    """
    block = BLOCKS[name]
    body = block.render(load_results(block)).strip("\n")
    note = (
        f"<!-- Generated by scripts/readme_tables.py from {block.results}:"
        " do not edit by hand; run `make readme` after a new run. -->"
    )
    return f"\n{note}\n\n{body}\n\n"


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- {re.escape(name)}:begin -->)(.*?)(<!-- {re.escape(name)}:end"
        r" -->)",
        re.S,
    )


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the part between the markers of `name` set to `body`.

    Raises:
        ValueError: The markers of `name` are not in `text` exactly once,
            in order.
    """
    pattern = _pattern(name)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(
            f"README.md must hold '<!-- {name}:begin -->' ... "
            f"'<!-- {name}:end -->' exactly once; found {len(found)}"
        )
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def expected(text: str, names: Sequence[str] | None = None) -> str:
    """`text` (README.md's) with blocks `names` (default: all) rendered."""
    for name in BLOCKS if names is None else names:
        text = replace_block(text, name, render(name))
    return text


def stale_blocks(text: str) -> list[str]:
    """The names of the blocks of `text` that differ from their render."""
    return [
        name
        for name in BLOCKS
        if replace_block(text, name, render(name)) != text
    ]


def missing_images() -> list[str]:
    """The images of `BLOCKS` that do not exist."""
    return [
        block.image[0]
        for block in BLOCKS.values()
        if block.image is not None and not (ROOT / block.image[0]).is_file()
    ]


def draw_images() -> list[str]:
    """Draws every block's image from its results file; returns the paths."""
    drawn = []
    for block in BLOCKS.values():
        if block.image is not None:
            path, draw = block.image
            (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
            draw(str(ROOT / path), load_results(block))
            drawn.append(path)
    return drawn


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=(
            "Rewrite README.md's generated tables (and their images) from "
            "benchmarks/results/."
        )
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "write nothing; exit 1 if a block differs from its results "
            "file or an image is missing"
        ),
    )
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = expected(text)
    if args.check:
        stale = stale_blocks(text)
        missing = missing_images()
        if stale:
            diff = difflib.unified_diff(
                text.splitlines(),
                new.splitlines(),
                "README.md",
                "README.md (generated)",
                lineterm="",
            )
            print("\n".join(diff))
            print(
                f"Stale README block(s): {', '.join(stale)}; run `make "
                "readme` (python scripts/readme_tables.py).",
                file=sys.stderr,
            )
        if missing:
            print(
                f"Missing image(s): {', '.join(missing)}; run `make readme`.",
                file=sys.stderr,
            )
        return 1 if stale or missing else 0
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("Rewrote README.md.")
    for path in draw_images():
        print(f"Drew {path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
