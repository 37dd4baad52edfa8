r"""Tables and curves from finished example runs (the SEHT paper's format).

Run it with::

    python -m keras_seht.experiments.report RUNS_DIR
    python -m keras_seht.experiments.report RUNS_DIR --output-dir out \
        --metric test_accuracy test_top5_accuracy

It searches ``RUNS_DIR`` recursively for ``results.json`` files written by
the example scripts (format ``"keras-seht-results/1"``: one training run,
i.e. one experiment, method and seed, per file), and for each experiment

* prints a Markdown table, one row per method, with the number of seeds
  and every ``final`` metric as "mean ± SE" over the seeds (SE: the
  sample standard deviation, ``ddof=1``, divided by sqrt(n); a method with
  one seed shows the value and "(n=1)"), plus a "Δ vs baseline" column
  for the main metric (``test_accuracy``, else ``test_perplexity``) when
  the experiment has a ``baseline`` run. Accuracies (metrics whose name
  contains "accuracy") are in percent with 2 decimals, like the paper's
  "95.37 ± 0.12", and their Δ in percentage points; perplexities have 2
  decimals; other metrics 4 significant digits;
* writes ``curves_<experiment>.png``: the main validation metric
  (``val_accuracy``, else ``val_perplexity``), ``seht_trace`` (when a run
  logged it) and the training ``loss`` against the epoch, one line per
  method (the mean over seeds) with a shaded band of ±1 SE.

The tables, with notes on runs left out, are also written to
``report.md``. Both go to ``--output-dir`` (default: ``RUNS_DIR``).

Row order: ``baseline`` first, then the other methods sorted by name (so
the order does not depend on how the run folders are named or laid out).
Experiments are sorted by name. Columns: the ``final`` metrics in the
order they first appear in the runs' files (or the ``--metric`` order).

Runs marked ``"complete": false`` (interrupted) are listed under their
experiment's table and left out of the means and curves. Runs marked
``"diverged": true`` are complete: they stay in the means (a NaN metric
makes its cell "nan") and are listed under the table. Files that are
not readable JSON of this format (for example the demo's own
``results.json``) are skipped with a warning on stderr and listed at the
end of the report. When two complete runs share experiment, method and
seed, the first (in sorted path order) is used and the others are listed
as duplicates.

This module needs only numpy and, for the curves, matplotlib (imported
when plotting, with the Agg backend); it never imports keras itself
(running it with ``python -m`` imports the ``keras_seht`` package, which
does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from keras_seht._io import atomic_write, save_figure

#: The ``format`` value of the ``results.json`` files that
#: `keras_seht.experiments.runner` writes and this module reads. Their keys:
#: ``format``, ``experiment``, ``method``, ``seed``, ``config`` (the run's
#: arguments), ``history`` (Keras-style dict of per-epoch lists, with
#: ``epoch_time_s`` and ``learning_rate``), ``epochs_completed``,
#: ``complete``, ``diverged``, ``wall_time_s`` (training time summed over
#: sessions), ``versions`` and ``final`` (the metrics of the runner's
#: ``run_training``'s ``evaluate``). Defined here, where keras is never
#: imported, and imported by the runner.
RESULTS_FORMAT = "keras-seht-results/1"
#: The name of a run's results file.
RESULTS_FILE = "results.json"
#: The method name of the reference row (compared case-insensitively).
BASELINE = "baseline"
#: Candidates for the "Δ vs baseline" column, in order of preference.
MAIN_METRICS = ("test_accuracy", "test_perplexity")
#: Candidates for the curves' validation panel, in order of preference.
VALIDATION_KEYS = ("val_accuracy", "val_perplexity", "val_loss")
#: Shown where a method has no value.
MISSING = "-"


class ReportWarning(UserWarning):
    """A results file was skipped (unreadable, another format, ...)."""


@dataclass
class Run:
    """One training run: the contents of one ``results.json``.

    Attributes:
        path: The ``results.json`` file.
        experiment: E.g. ``"cifar10_resnet18"``.
        method: E.g. ``"baseline"``, ``"seht-d"``.
        seed: The run's seed (``None`` when the file has none).
        complete: ``False`` for an interrupted run (``"complete": false``
            in the file); a file without the key counts as complete.
        diverged: ``"diverged": true`` in the file (the loss became NaN
            or infinite; the run is complete, its metrics may be NaN).
        final: The numeric entries of ``final`` (others are left out).
        history: The per-epoch lists of ``history``, as float arrays
            (``null`` entries become NaN).
        epochs_completed: ``epochs_completed``, if given.
        wall_time_s: ``wall_time_s``, if given.
        config: ``config`` (the run's command-line arguments).
        versions: ``versions``.
    """

    path: str
    experiment: str
    method: str
    seed: Any = None
    complete: bool = True
    diverged: bool = False
    final: dict[str, float] = field(default_factory=dict)
    history: dict[str, np.ndarray] = field(default_factory=dict)
    epochs_completed: int | None = None
    wall_time_s: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stat:
    """Mean and standard error of one metric over a method's seeds."""

    mean: float
    se: float
    n: int


@dataclass
class MethodSummary:
    """One table row: the complete runs of one method."""

    method: str
    runs: list[Run]
    metrics: dict[str, Stat]

    @property
    def n(self) -> int:
        """The number of runs (seeds)."""
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        """The seeds of the runs, in order."""
        return [run.seed for run in self.runs]


@dataclass
class ExperimentSummary:
    """One table: the methods of one experiment.

    Attributes:
        experiment: The experiment's name.
        methods: The rows (baseline first, then sorted by name).
        metrics: The columns, in order.
        main_metric: The metric of the "Δ vs baseline" column, or
            ``None`` when no column is shown (no baseline, or neither of
            `MAIN_METRICS` is a column).
        incomplete: Interrupted runs, left out of the rows.
        duplicates: Complete runs left out because an earlier file has
            the same method and seed.
    """

    experiment: str
    methods: list[MethodSummary]
    metrics: list[str]
    main_metric: str | None = None
    incomplete: list[Run] = field(default_factory=list)
    duplicates: list[Run] = field(default_factory=list)

    @property
    def diverged(self) -> list[Run]:
        """The runs in the rows whose loss diverged."""
        return [r for row in self.methods for r in row.runs if r.diverged]

    @property
    def baseline(self) -> MethodSummary | None:
        """The baseline row, if any."""
        for row in self.methods:
            if _is_baseline(row.method):
                return row
        return None


# ---------------------------------------------------------------- loading


def find_results(runs_dir: str | os.PathLike) -> list[str]:
    """All ``results.json`` files under `runs_dir`, in sorted path order.

    Raises:
        FileNotFoundError: `runs_dir` does not exist.
        NotADirectoryError: `runs_dir` is not a folder.
    """
    runs_dir = os.fspath(runs_dir)
    if not os.path.exists(runs_dir):
        raise FileNotFoundError(f"Runs directory {runs_dir!r} does not exist.")
    if not os.path.isdir(runs_dir):
        raise NotADirectoryError(f"{runs_dir!r} is not a directory.")
    paths = []
    for folder, dirs, files in os.walk(runs_dir):
        dirs.sort()
        if RESULTS_FILE in files:
            paths.append(os.path.join(folder, RESULTS_FILE))
    return sorted(paths)


def _to_float(value: Any) -> float | None:
    """`value` as a float, or None if it is not a number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _to_series(values: Any) -> np.ndarray | None:
    """A list of numbers (None -> NaN) as a float array, or None."""
    if not isinstance(values, list):
        return None
    out = []
    for value in values:
        number = _to_float(value)
        if number is None and value is not None:
            return None
        out.append(math.nan if number is None else number)
    return np.asarray(out, dtype="float64")


#: Why a demo's ``results.json`` is skipped (its runs are all in one file,
#: and the demo prints their table itself).
DEMO_SKIPPED = (
    "no 'format' key: the output of `keras-seht demo`, not of an example "
    "script: the demo "
    "prints its own table (its 'runs' hold every model and method); this "
    f"report reads one {RESULTS_FORMAT} file per run, as examples/*.py "
    "write them"
)


def _is_demo_results(data: dict[str, Any]) -> bool:
    """Whether `data` is the ``results.json`` of the demo."""
    return isinstance(data.get("runs"), list) and isinstance(
        data.get("config"), dict
    )


def parse_run(data: Any, path: str) -> Run:
    """A `Run` from the decoded contents of a ``results.json``.

    Raises:
        ValueError: `data` is not a ``keras-seht-results/1`` record.
    """
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object (got {type(data).__name__})")
    fmt = data.get("format")
    if fmt is None and _is_demo_results(data):
        raise ValueError(DEMO_SKIPPED)
    if fmt != RESULTS_FORMAT:
        raise ValueError(
            f"format is {fmt!r}, not {RESULTS_FORMAT!r}"
            if "format" in data
            else f"no 'format' key (not a {RESULTS_FORMAT} file)"
        )
    for key in ("experiment", "method"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{key!r} is missing or not a non-empty string")
    final = data.get("final") or {}
    history = data.get("history") or {}
    if not isinstance(final, dict) or not isinstance(history, dict):
        raise ValueError("'final' and 'history' must be JSON objects")
    finals = {}
    for key, value in final.items():
        number = _to_float(value)
        if number is not None:
            finals[str(key)] = number
    series = {}
    for key, values in history.items():
        array = _to_series(values)
        if array is not None:
            series[str(key)] = array
    epochs = data.get("epochs_completed")
    wall = _to_float(data.get("wall_time_s"))
    config = data.get("config")
    versions = data.get("versions")
    return Run(
        path=path,
        experiment=data["experiment"],
        method=data["method"],
        seed=data.get("seed"),
        complete=data.get("complete", True) is not False,
        diverged=data.get("diverged") is True,
        final=finals,
        history=series,
        epochs_completed=(
            epochs
            if isinstance(epochs, int) and not isinstance(epochs, bool)
            else None
        ),
        wall_time_s=wall,
        config=config if isinstance(config, dict) else {},
        versions=versions if isinstance(versions, dict) else {},
    )


def _warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


def load_runs(
    runs_dir: str | os.PathLike,
    *,
    on_problem: Callable[[str], None] | None = None,
) -> list[Run]:
    """Reads every ``results.json`` under `runs_dir` (recursively).

    Complete and incomplete runs are both returned, in sorted path order;
    `summarize` sets the incomplete ones apart.

    Args:
        runs_dir: The folder to search.
        on_problem: Called with a one-line message for each file that is
            skipped (not valid JSON, or not a ``keras-seht-results/1``
            record). By default a `ReportWarning` is issued instead.

    Returns:
        The runs; empty when no file could be read.

    Raises:
        FileNotFoundError: `runs_dir` does not exist or holds no
            ``results.json``.
        NotADirectoryError: `runs_dir` is not a folder.
    """
    report = on_problem if on_problem is not None else _warn
    paths = find_results(runs_dir)
    if not paths:
        raise FileNotFoundError(
            f"No {RESULTS_FILE} found under {os.fspath(runs_dir)!r}: "
            "point RUNS_DIR at the output folder of the example scripts."
        )
    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else "unreadable"
            report(f"{path}: skipped, not readable JSON ({reason})")
            continue
        try:
            runs.append(parse_run(data, path))
        except ValueError as error:
            report(f"{path}: skipped, {error}")
    return runs


# ------------------------------------------------------------ statistics


def mean_se(values: Sequence[float]) -> Stat:
    """Mean and standard error (sample std with ddof=1, over sqrt(n)).

    With one value the SE is NaN. NaN or infinite values propagate.

    Raises:
        ValueError: `values` is empty.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_se() of no values")
    mean = sum(values) / n
    if n == 1:
        return Stat(mean, math.nan, 1)
    # Plain floats: inf and NaN propagate without numpy's warnings.
    var = sum((v - mean) * (v - mean) for v in values) / (n - 1)
    return Stat(mean, math.sqrt(var / n), n)


def finite_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """`mean_se` over the finite values, with how many there were.

    Returns:
        ``{"mean", "se", "finite", "n"}``: NaN mean and SE without a
        finite value, NaN SE with one (for the benchmarks' seed tables).
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    stat = mean_se(finite) if finite else Stat(math.nan, math.nan, 0)
    return {
        "mean": stat.mean,
        "se": stat.se,
        "finite": len(finite),
        "n": len(values),
    }


def _is_baseline(method: str) -> bool:
    return method.lower() == BASELINE


def _method_order(methods: Iterable[str]) -> list[str]:
    """Baseline first, then the others sorted by name."""
    return sorted(set(methods), key=lambda m: (not _is_baseline(m), m))


def summarize(
    runs: Sequence[Run], metrics: Sequence[str] | None = None
) -> list[ExperimentSummary]:
    """Groups `runs` by experiment and method; averages the final metrics.

    Args:
        runs: What `load_runs` returned.
        metrics: The ``final`` metrics to show, in order (default: all,
            in the order they first appear). Those an experiment's runs
            lack are left out of its table.

    Returns:
        One summary per experiment, sorted by experiment name. Only
        complete runs enter the rows; the incomplete ones, and complete
        runs that repeat a (method, seed) pair, are listed apart.
    """
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, []).append(run)
    summaries = []
    for experiment in sorted(by_experiment):
        all_runs = by_experiment[experiment]
        incomplete = [r for r in all_runs if not r.complete]
        kept: list[Run] = []
        duplicates: list[Run] = []
        seen: set[tuple[str, str]] = set()
        for run in all_runs:
            if not run.complete:
                continue
            key = (run.method, json.dumps(run.seed, sort_keys=True))
            if run.seed is not None and key in seen:
                duplicates.append(run)
                continue
            seen.add(key)
            kept.append(run)
        present = list(dict.fromkeys(k for r in kept for k in r.final))
        if metrics is None:
            columns = present
        else:
            columns = [m for m in dict.fromkeys(metrics) if m in present]
        rows = []
        for method in _method_order(r.method for r in kept):
            method_runs = sorted(
                (r for r in kept if r.method == method),
                key=lambda r: (r.seed is None, str(r.seed), r.path),
            )
            stats = {}
            for metric in columns:
                values = [
                    r.final[metric] for r in method_runs if metric in r.final
                ]
                if values:
                    stats[metric] = mean_se(values)
            rows.append(MethodSummary(method, method_runs, stats))
        main = next((m for m in MAIN_METRICS if m in columns), None)
        if not any(_is_baseline(row.method) for row in rows):
            main = None
        summaries.append(
            ExperimentSummary(
                experiment=experiment,
                methods=rows,
                metrics=columns,
                main_metric=main,
                incomplete=incomplete,
                duplicates=duplicates,
            )
        )
    return summaries


# ------------------------------------------------------------ formatting


def _kind(metric: str) -> str:
    name = metric.lower()
    if "accuracy" in name:
        return "percent"
    if "perplexity" in name:
        return "perplexity"
    return "other"


def _number(value: float, kind: str, sign: bool = False) -> str:
    """One number in the style of its metric's kind."""
    if not math.isfinite(value):
        return str(value)
    if kind == "percent":
        return f"{100 * value:{'+' if sign else ''}.2f}"
    if kind == "perplexity":
        return f"{value:{'+' if sign else ''}.2f}"
    # "#" keeps trailing zeros (4 significant digits: "12.50"), and a
    # bare trailing point ("1234."), which is dropped.
    return f"{value:{'+' if sign else ''}#.4g}".rstrip(".")


def format_stat(stat: Stat, metric: str, n_runs: int | None = None) -> str:
    """The stat, "mean ± SE" in the metric's style; "value (n=1)" for one seed.

    When the metric has fewer values than the method has runs
    (`n_runs`), the count is added: "mean ± SE (n=2)".
    """
    kind = _kind(metric)
    text = _number(stat.mean, kind)
    if stat.n == 1:
        return f"{text} (n=1)"
    if math.isfinite(stat.se):
        text += f" ± {_number(stat.se, kind)}"
    if n_runs is not None and stat.n != n_runs:
        text += f" (n={stat.n})"
    return text


def _column_title(metric: str) -> str:
    return f"{metric} (%)" if _kind(metric) == "percent" else metric


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_table(summary: ExperimentSummary) -> str:
    """The Markdown table of one experiment (no heading or notes).

    Columns: method, n (seeds), one per metric, and "Δ vs baseline":
    the method's mean of the main metric minus the baseline's
    (percentage points for accuracies).
    """
    header = ["method", "n"] + [_column_title(m) for m in summary.metrics]
    align = ["---", "---:"] + ["---:"] * len(summary.metrics)
    base = summary.baseline
    main = summary.main_metric
    base_stat = None
    if main is not None:
        header.append("Δ vs baseline")
        align.append("---:")
        base_stat = base.metrics.get(main) if base is not None else None
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(align) + "|",
    ]
    for row in summary.methods:
        cells = [row.method, str(row.n)]
        for metric in summary.metrics:
            stat = row.metrics.get(metric)
            cells.append(
                MISSING if stat is None else format_stat(stat, metric, row.n)
            )
        if main is not None:
            stat = row.metrics.get(main)
            if row is base or stat is None or base_stat is None:
                cells.append(MISSING)
            else:
                cells.append(
                    _number(stat.mean - base_stat.mean, _kind(main), sign=True)
                )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _relative(path: str, root: str | None) -> str:
    if root is None:
        return path
    try:
        return os.path.relpath(path, root)
    except ValueError:  # Another drive (Windows).
        return path


def _run_label(run: Run, root: str | None) -> str:
    epochs = run.epochs_completed
    done = "" if epochs is None else f", {epochs} epochs completed"
    return (
        f"{run.method}, seed {run.seed}{done} (`{_relative(run.path, root)}`)"
    )


def format_report(
    summaries: Sequence[ExperimentSummary],
    skipped: Sequence[str] = (),
    runs_dir: str | os.PathLike | None = None,
) -> str:
    """The whole report in Markdown.

    One section per experiment (caption, table, runs left out), then the
    skipped files.
    """
    root = None if runs_dir is None else os.fspath(runs_dir)
    n_complete = sum(row.n for s in summaries for row in s.methods)
    n_incomplete = sum(len(s.incomplete) for s in summaries)
    title = "# keras-seht results"
    if root is not None:
        title += f": `{root}`"
    lines = [
        title,
        "",
        f"{n_complete} complete run(s) in {len(summaries)} experiment(s); "
        f"{n_incomplete} incomplete run(s) excluded from the means; "
        f"{len(skipped)} file(s) skipped.",
        "",
        "Each cell: mean ± standard error over seeds (SE = sample standard "
        "deviation (ddof=1) / sqrt(n)); a single seed shows its value and "
        "(n=1). Accuracies in percent.",
    ]
    for summary in summaries:
        lines += ["", f"## {summary.experiment}", ""]
        if summary.main_metric is not None:
            unit = (
                " (percentage points)"
                if _kind(summary.main_metric) == "percent"
                else ""
            )
            lines += [
                f"Δ vs baseline: mean {summary.main_metric} minus the "
                f"baseline's{unit}.",
                "",
            ]
        if summary.methods:
            lines.append(format_table(summary))
        else:
            lines.append("No complete runs.")
        if summary.diverged:
            lines += [
                "",
                "Diverged runs (kept in the means: a NaN metric makes its "
                "cell nan):",
            ]
            lines += [f"- {_run_label(r, root)}" for r in summary.diverged]
        if summary.incomplete:
            lines += ["", "Incomplete runs (excluded from the means):"]
            lines += [f"- {_run_label(r, root)}" for r in summary.incomplete]
        if summary.duplicates:
            lines += ["", "Duplicate seeds (left out; the first file is used):"]
            lines += [f"- {_run_label(r, root)}" for r in summary.duplicates]
    if skipped:
        lines += ["", "## Skipped files", ""]
        lines += [f"- {_relative_message(m, root)}" for m in skipped]
    return "\n".join(lines) + "\n"


def _relative_message(message: str, root: str | None) -> str:
    """A skipped-file message with its leading path made relative."""
    path, sep, rest = message.partition(": ")
    if not sep or root is None:
        return message
    return f"`{_relative(path, root)}`: {rest}"


# --------------------------------------------------------------- curves


def _stack(series: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """(epochs, mean, SE, count) over runs, epoch by epoch.

    Ignores NaN and runs shorter than the longest (no numpy warnings).
    """
    length = max(len(s) for s in series)
    data = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        data[i, : len(s)] = s
    finite = np.isfinite(data)
    count = finite.sum(axis=0)
    values = np.where(finite, data, 0.0)
    mean = np.full(length, np.nan)
    np.divide(values.sum(axis=0), count, out=mean, where=count > 0)
    squares = np.where(finite, (data - mean) ** 2, 0.0)
    se = np.full(length, np.nan)
    many = count > 1
    se[many] = np.sqrt(squares.sum(axis=0)[many] / (count[many] - 1))
    se[many] /= np.sqrt(count[many])
    epochs = np.arange(1, length + 1)
    return epochs, mean, se, count


def _panel_keys(runs: Sequence[Run]) -> list[str]:
    keys = {k for run in runs for k in run.history}
    panels = [next((k for k in VALIDATION_KEYS if k in keys), None)]
    panels += [k for k in ("seht_trace", "loss") if k in keys]
    return [k for k in panels if k is not None]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "experiment"


def curves_path(output_dir: str | os.PathLike, experiment: str) -> str:
    """Where `plot_curves` writes an experiment's figure."""
    return os.path.join(
        os.fspath(output_dir), f"curves_{_safe_name(experiment)}.png"
    )


def plot_curves(
    summaries: Sequence[ExperimentSummary],
    output_dir: str | os.PathLike,
) -> list[str]:
    """Writes ``curves_<experiment>.png`` for each experiment.

    Panels: the main validation metric (``val_accuracy`` in percent, else
    ``val_perplexity``, else ``val_loss``), ``seht_trace`` (if any run
    has it) and the training ``loss``, against the epoch (1-based). One
    line per method: the mean over its seeds, with a band of ±1 SE where
    two or more seeds have the epoch. A panel whose values are all
    positive and span more than two decades gets a log scale.

    Returns:
        The paths written (experiments without any of those histories
        are skipped).

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "The curves need matplotlib: `pip install matplotlib`."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(os.fspath(output_dir), exist_ok=True)
    written = []
    for summary in summaries:
        runs = [r for row in summary.methods for r in row.runs]
        keys = _panel_keys(runs)
        if not keys:
            continue
        fig, axes = plt.subplots(
            1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False
        )
        for ax, key in zip(axes[0], keys):
            scale = 100.0 if _kind(key) == "percent" else 1.0
            shown = []
            for i, row in enumerate(summary.methods):
                series = [r.history[key] for r in row.runs if key in r.history]
                series = [s for s in series if len(s)]
                if not series:
                    continue
                epochs, mean, se, _ = _stack(series)
                mean, se = mean * scale, se * scale
                color = f"C{i % 10}"
                keep = np.isfinite(mean)
                ax.plot(
                    epochs[keep],
                    mean[keep],
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{row.method} (n={len(series)})",
                )
                band = keep & np.isfinite(se)
                if band.any():
                    ax.fill_between(
                        epochs[band],
                        (mean - se)[band],
                        (mean + se)[band],
                        color=color,
                        alpha=0.2,
                        linewidth=0,
                    )
                shown.append(mean[keep])
            values = np.concatenate(shown) if shown else np.zeros(0)
            if (
                values.size
                and values.min() > 0
                and values.max() > 100 * values.min()
            ):
                ax.set_yscale("log")
            ax.set_title(key + (" (%)" if scale != 1.0 else ""), fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.has_data():
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(
            f"{summary.experiment}: mean over seeds, band ±1 SE", fontsize=11
        )
        fig.tight_layout()
        path = curves_path(output_dir, summary.experiment)
        save_figure(fig, path)
        written.append(path)
    return written


# ------------------------------------------------------------------ CLI


def make_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_seht.experiments.report",
        description=(
            "Summarize finished runs of the example scripts (their "
            f"per-run results.json files, format {RESULTS_FORMAT}, searched "
            "recursively) as Markdown tables of mean ± standard error over "
            "seeds per method, and plot their training curves. The demo's "
            "results.json is not such a file: the demo prints its own "
            "table."
        ),
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where report.md and curves_*.png go (default: RUNS_DIR)",
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME",
        help=(
            "final metrics to tabulate, in this order (default: all); "
            "repeatable"
        ),
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the curves"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the report; returns the exit status.

    0: success, 1: no runs to report or a bad ``--metric``; 2: bad
    arguments, from argparse.

    In a data-parallel run (`keras_seht.distributed`), where every worker
    calls it at the end of an example script, only the chief reads the
    runs, writes the report and prints; the other workers check the
    arguments and return 0.
    """
    args = make_parser().parse_args(
        None if argv is None else [str(a) for a in argv]
    )
    # Lazily: this module itself never imports keras (atomic_write does).
    from keras_seht.distributed import is_chief

    if not is_chief():
        return 0  # the chief, which wrote the runs, reports them
    skipped: list[str] = []

    def on_problem(message: str) -> None:
        skipped.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    try:
        runs = load_runs(args.runs_dir, on_problem=on_problem)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not runs:
        print(
            f"error: none of the {len(skipped)} {RESULTS_FILE} file(s) under "
            f"{args.runs_dir!r} is a readable {RESULTS_FORMAT} record.",
            file=sys.stderr,
        )
        if any(DEMO_SKIPPED in message for message in skipped):
            print(
                "The report summarizes runs of the example scripts "
                "(examples/*.py, e.g. `python examples/"
                "mnist_hessian_reinit.py --smoke`, then `keras-seht report "
                "runs/mnist_hessian_reinit`). `keras-seht demo` prints its "
                "own table when it runs; its results.json is plain JSON "
                "to read directly.",
                file=sys.stderr,
            )
        return 1
    if args.metric:
        known = {k for run in runs if run.complete for k in run.final}
        unknown = [m for m in dict.fromkeys(args.metric) if m not in known]
        if len(unknown) == len(set(args.metric)):
            print(
                f"error: no complete run has the metric(s) {unknown}; "
                f"available: {sorted(known)}",
                file=sys.stderr,
            )
            return 1
        for metric in unknown:
            print(
                f"warning: no complete run has the metric {metric!r}",
                file=sys.stderr,
            )
    summaries = summarize(runs, args.metric)
    report = format_report(summaries, skipped, args.runs_dir)
    output_dir = args.output_dir or args.runs_dir
    os.makedirs(output_dir, exist_ok=True)
    report_path = os.path.join(output_dir, "report.md")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(report)

    atomic_write(report_path, write)
    written = [report_path]
    if not args.no_plots:
        try:
            written += plot_curves(summaries, output_dir)
        except ImportError as error:
            print(f"warning: {error} Skipping the curves.", file=sys.stderr)
    print(report)
    print("Wrote " + ", ".join(written) + ".")
    return 0


__all__ = [
    "ExperimentSummary",
    "MethodSummary",
    "ReportWarning",
    "Run",
    "Stat",
    "find_results",
    "format_report",
    "format_stat",
    "format_table",
    "load_runs",
    "main",
    "mean_se",
    "parse_run",
    "plot_curves",
    "summarize",
]

if __name__ == "__main__":
    sys.exit(main())
