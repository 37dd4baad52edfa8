"""The results report (``python -m keras_seht.experiments.report``).

Pure Python on hand-written ``results.json`` files: the expected means
and standard errors below are worked out by hand (SE = sample standard
deviation with ddof=1 over sqrt(n); for two seeds a and b that is
|a - b| / 2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_seht.experiments import report
from keras_seht.experiments.report import ReportWarning

# Pure Python over results.json files: one backend is enough (conftest).
pytestmark = pytest.mark.single_backend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CIFAR = "cifar10_resnet18"
LSTM = "wikitext2_lstm"
MNIST = "mnist_hessian_reinit"


def write_run(
    root,
    folder: str,
    experiment: str,
    method: str,
    seed: int,
    final: dict,
    history: dict | None = None,
    **extra,
):
    """Writes one ``results.json`` as the example scripts do."""
    epochs = len(next(iter(history.values()))) if history else 0
    data = {
        "format": "keras-seht-results/1",
        "experiment": experiment,
        "method": method,
        "seed": seed,
        "config": {"seed": seed, "epochs": epochs},
        "history": history or {},
        "epochs_completed": epochs,
        "wall_time_s": 1.5,
        "versions": {"keras_seht": "0", "keras": "3", "backend": "torch"},
        "final": final,
    }
    data.update(extra)
    path = root / folder / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def cifar_history(acc: float, trace: float | None = None) -> dict:
    history = {
        "loss": [2.0, 1.5, 1.2],
        "accuracy": [0.4, 0.6, 0.7],
        "val_loss": [1.9, 1.6, 1.4],
        "val_accuracy": [acc - 0.2, acc - 0.1, acc],
        "epoch_time_s": [1.0, 1.0, 1.0],
    }
    if trace is not None:
        history["seht_trace"] = [trace, trace / 2, trace / 4]
    return history


@pytest.fixture
def runs_dir(tmp_path):
    """Two seeds of baseline and seht-d (CIFAR-10), one seed of jacobian,
    an interrupted seht-d run, a junk file and a demo-style file."""
    root = tmp_path / "runs"
    write_run(
        root,
        "cifar/baseline/seed0",
        CIFAR,
        "baseline",
        0,
        {
            "test_accuracy": 0.91,
            "best_test_accuracy": 0.915,
            "test_top5_accuracy": 0.99,
        },
        cifar_history(0.91),
    )
    write_run(
        root,
        "cifar/baseline/seed1",
        CIFAR,
        "baseline",
        1,
        {
            "test_accuracy": 0.92,
            "best_test_accuracy": 0.925,
            "test_top5_accuracy": 0.995,
        },
        cifar_history(0.92),
    )
    # seht-d: seed 1 has no top-5 accuracy, so that cell has n=1.
    write_run(
        root,
        "cifar/seht-d/seed0",
        CIFAR,
        "seht-d",
        0,
        {
            "test_accuracy": 0.93,
            "best_test_accuracy": 0.94,
            "test_top5_accuracy": 0.996,
        },
        cifar_history(0.93, trace=40.0),
    )
    write_run(
        root,
        "cifar/seht-d/seed1",
        CIFAR,
        "seht-d",
        1,
        {"test_accuracy": 0.936, "best_test_accuracy": 0.946},
        cifar_history(0.936, trace=44.0),
    )
    write_run(
        root,
        "cifar/seht-d/seed2",
        CIFAR,
        "seht-d",
        2,
        {"test_accuracy": 0.10, "best_test_accuracy": 0.10},
        {"loss": [2.3], "val_accuracy": [0.1]},
        complete=False,
    )
    # Listed in a folder that sorts before "baseline": still a later row.
    write_run(
        root,
        "cifar/a-jacobian/seed0",
        CIFAR,
        "jacobian",
        0,
        {"test_accuracy": 0.90, "best_test_accuracy": 0.905},
        cifar_history(0.90),
    )
    junk = root / "junk" / "results.json"
    junk.parent.mkdir(parents=True)
    junk.write_text("{not json", encoding="utf-8")
    demo = root / "demo_output" / "results.json"
    demo.parent.mkdir(parents=True)
    demo.write_text(json.dumps({"config": {}, "runs": []}), encoding="utf-8")
    return root


CIFAR_TABLE = "\n".join(
    [
        "| method | n | test_accuracy (%) | best_test_accuracy (%) "
        "| test_top5_accuracy (%) | Δ vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
        # 91.50 = (91 + 92) / 2, SE 0.50 = |92 - 91| / 2, and so on.
        "| baseline | 2 | 91.50 ± 0.50 | 92.00 ± 0.50 | 99.25 ± 0.25 | - |",
        "| jacobian | 1 | 90.00 (n=1) | 90.50 (n=1) | - | -1.50 |",
        "| seht-d | 2 | 93.30 ± 0.30 | 94.30 ± 0.30 | 99.60 (n=1) | +1.80 |",
    ]
)


def _check_png(path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_mean_se_matches_numpy():
    values = [0.3, 0.7, 0.2, 0.9]
    stat = report.mean_se(values)
    assert stat.n == 4
    assert stat.mean == pytest.approx(np.mean(values))
    assert stat.se == pytest.approx(np.std(values, ddof=1) / 2)
    one = report.mean_se([5.0])
    assert (one.mean, one.n) == (5.0, 1) and math.isnan(one.se)
    with pytest.raises(ValueError):
        report.mean_se([])


def test_load_runs_skips_junk_with_warnings(runs_dir):
    with pytest.warns(ReportWarning) as record:
        runs = report.load_runs(runs_dir)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "demo_output" in messages[0] and "no 'format' key" in messages[0]
    assert "junk" in messages[1] and "not readable JSON" in messages[1]
    assert len(runs) == 6
    assert all(run.experiment == CIFAR for run in runs)
    incomplete = [run for run in runs if not run.complete]
    assert [(r.method, r.seed) for r in incomplete] == [("seht-d", 2)]
    first = runs[0]  # Sorted paths: cifar/a-jacobian/seed0.
    assert first.method == "jacobian"
    assert first.history["val_accuracy"].dtype == np.float64
    assert first.epochs_completed == 3


def test_summarize_groups_orders_and_excludes_incomplete(runs_dir):
    problems: list[str] = []
    runs = report.load_runs(runs_dir, on_problem=problems.append)
    assert len(problems) == 2
    (summary,) = report.summarize(runs)
    assert summary.experiment == CIFAR
    # Baseline first, then sorted by name.
    assert [row.method for row in summary.methods] == [
        "baseline",
        "jacobian",
        "seht-d",
    ]
    assert summary.metrics == [
        "test_accuracy",
        "best_test_accuracy",
        "test_top5_accuracy",
    ]
    assert summary.main_metric == "test_accuracy"
    seht = summary.methods[2]
    assert seht.n == 2 and seht.seeds == [0, 1]
    assert seht.metrics["test_accuracy"].mean == pytest.approx(0.933)
    assert seht.metrics["test_accuracy"].se == pytest.approx(0.003)
    assert seht.metrics["test_top5_accuracy"].n == 1
    assert [(r.method, r.seed) for r in summary.incomplete] == [("seht-d", 2)]


def test_format_table_exact_text(runs_dir):
    runs = report.load_runs(runs_dir, on_problem=lambda message: None)
    (summary,) = report.summarize(runs)
    assert report.format_table(summary) == CIFAR_TABLE


def test_metric_selection_and_no_baseline(runs_dir):
    runs = report.load_runs(runs_dir, on_problem=lambda message: None)
    (summary,) = report.summarize(
        runs, metrics=["best_test_accuracy", "nonexistent"]
    )
    assert summary.metrics == ["best_test_accuracy"]
    assert summary.main_metric is None  # test_accuracy is not shown.
    assert report.format_table(summary).splitlines()[0] == (
        "| method | n | best_test_accuracy (%) |"
    )
    without_baseline = [r for r in runs if r.method != "baseline"]
    (summary,) = report.summarize(without_baseline)
    assert summary.main_metric is None
    assert "Δ" not in report.format_table(summary)


def test_perplexity_and_other_metrics(tmp_path):
    root = tmp_path / "runs"
    for seed, (valid, test) in enumerate([(125.0, 120.0), (127.0, 122.0)]):
        write_run(
            root,
            f"lstm/baseline/{seed}",
            LSTM,
            "baseline",
            seed,
            {"valid_perplexity": valid, "test_perplexity": test},
            {"loss": [5.0, 4.8], "val_perplexity": [300.0, valid]},
        )
    for seed, (valid, test) in enumerate([(115.0, 110.5), (116.0, 111.5)]):
        write_run(
            root,
            f"lstm/seht-h/{seed}",
            LSTM,
            "seht-h",
            seed,
            {"valid_perplexity": valid, "test_perplexity": test},
            {
                "loss": [5.1, 4.9],
                "val_perplexity": [280.0, valid],
                "seht_trace": [3.0, 2.0],
            },
        )
    mnist = [(0.98, 12.0, 1234.0), (0.99, 13.0, 1236.0)]
    for seed, (acc, eig, trace) in enumerate(mnist):
        write_run(
            root,
            f"mnist/baseline/{seed}",
            MNIST,
            "baseline",
            seed,
            {
                "test_accuracy": acc,
                "top_eigenvalue": eig,
                "hessian_trace": trace,
            },
            {"loss": [0.5, 0.3], "val_accuracy": [0.9, acc]},
        )
    write_run(
        root,
        "mnist/reinit/0",
        MNIST,
        "reinit-k10",
        0,
        {
            "test_accuracy": 0.975,
            "top_eigenvalue": 8.25,
            "hessian_trace": 987.0,
        },
        {"loss": [0.6, 0.4], "val_accuracy": [0.9, 0.975]},
    )
    summaries = report.summarize(report.load_runs(root))
    assert [s.experiment for s in summaries] == [MNIST, LSTM]
    mnist_summary, lstm_summary = summaries
    assert lstm_summary.main_metric == "test_perplexity"
    assert report.format_table(lstm_summary) == "\n".join(
        [
            "| method | n | valid_perplexity | test_perplexity "
            "| Δ vs baseline |",
            "|---|---:|---:|---:|---:|",
            "| baseline | 2 | 126.00 ± 1.00 | 121.00 ± 1.00 | - |",
            "| seht-h | 2 | 115.50 ± 0.50 | 111.00 ± 0.50 | -10.00 |",
        ]
    )
    # Other metrics: 4 significant digits.
    assert report.format_table(mnist_summary) == "\n".join(
        [
            "| method | n | test_accuracy (%) | top_eigenvalue "
            "| hessian_trace | Δ vs baseline |",
            "|---|---:|---:|---:|---:|---:|",
            "| baseline | 2 | 98.50 ± 0.50 | 12.50 ± 0.5000 "
            "| 1235 ± 1.000 | - |",
            "| reinit-k10 | 1 | 97.50 (n=1) | 8.250 (n=1) | 987.0 (n=1) "
            "| -1.00 |",
        ]
    )
    written = report.plot_curves(summaries, tmp_path / "out")
    assert [os.path.basename(p) for p in written] == [
        f"curves_{MNIST}.png",
        f"curves_{LSTM}.png",
    ]
    for path in written:
        _check_png(tmp_path / "out" / os.path.basename(path))


def test_format_stat_styles():
    stat = report.Stat(mean=0.95371, se=0.00123, n=3)
    assert report.format_stat(stat, "test_accuracy") == "95.37 ± 0.12"
    assert report.format_stat(stat, "test_accuracy", n_runs=4) == (
        "95.37 ± 0.12 (n=3)"
    )
    big = report.Stat(mean=123456.0, se=0.5, n=2)
    assert report.format_stat(big, "hessian_trace") == "1.235e+05 ± 0.5000"
    nan = report.Stat(mean=math.nan, se=math.nan, n=2)
    assert report.format_stat(nan, "test_perplexity") == "nan"


def test_duplicate_seeds_are_left_out(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", CIFAR, "baseline", 0, {"test_accuracy": 0.9})
    write_run(root, "b", CIFAR, "baseline", 0, {"test_accuracy": 0.5})
    (summary,) = report.summarize(report.load_runs(root))
    assert summary.methods[0].n == 1
    assert summary.methods[0].metrics["test_accuracy"].mean == 0.9
    assert [r.path for r in summary.duplicates] == [
        str(root / "b" / "results.json")
    ]
    assert "Duplicate seeds" in report.format_report([summary])


def test_diverged_run_is_kept_and_listed(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", CIFAR, "baseline", 0, {"test_accuracy": 0.9})
    write_run(root, "b", CIFAR, "baseline", 1, {"test_accuracy": 0.8})
    write_run(
        root,
        "c",
        CIFAR,
        "seht-h",
        0,
        {"test_accuracy": math.nan},
        {"loss": [2.0, math.nan]},
        diverged=True,
    )
    (summary,) = report.summarize(report.load_runs(root))
    assert [r.method for r in summary.diverged] == ["seht-h"]
    table = report.format_table(summary)
    assert table.splitlines()[-1] == "| seht-h | 1 | nan (n=1) | nan |"
    text = report.format_report([summary], runs_dir=root)
    assert "Diverged runs (kept in the means" in text
    assert "- seht-h, seed 0, 2 epochs completed (`c/results.json`)" in text
    (path,) = report.plot_curves([summary], tmp_path / "out")
    _check_png(tmp_path / "out" / os.path.basename(path))


def test_main_writes_report_and_curves(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs_dir), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    text = (out / "report.md").read_text("utf-8")
    assert text in captured.out
    assert CIFAR_TABLE in text
    assert f"## {CIFAR}" in text
    assert "Δ vs baseline: mean test_accuracy minus the baseline's " in text
    assert "5 complete run(s) in 1 experiment(s); 1 incomplete" in text
    # The interrupted run is named, as excluded.
    incomplete = text.split("Incomplete runs (excluded from the means):")[1]
    assert incomplete.splitlines()[1].startswith(
        "- seht-d, seed 2, 1 epochs completed (`cifar/seht-d/seed2/"
    )
    assert "## Skipped files" in text
    assert "`junk/results.json`: skipped, not readable JSON" in text
    assert captured.err.count("warning: ") == 2
    assert sorted(os.listdir(out)) == [f"curves_{CIFAR}.png", "report.md"]
    _check_png(out / f"curves_{CIFAR}.png")


def test_main_defaults_to_runs_dir_and_metric_option(runs_dir, capsys):
    argv = [str(runs_dir), "--metric", "test_accuracy", "--no-plots"]
    assert report.main(argv) == 0
    text = (runs_dir / "report.md").read_text("utf-8")
    assert (
        "| method | n | test_accuracy (%) | Δ vs baseline |\n"
        "|---|---:|---:|---:|\n"
        "| baseline | 2 | 91.50 ± 0.50 | - |"
    ) in text
    assert not any(name.endswith(".png") for name in os.listdir(runs_dir))
    # Running again ignores its own report.md.
    assert report.main(argv) == 0
    capsys.readouterr()
    assert report.main([str(runs_dir), "--metric", "bogus"]) == 1
    assert "no complete run has the metric(s) ['bogus']" in (
        capsys.readouterr().err
    )


def test_main_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 1
    assert "No results.json found under" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    junk = empty / "x" / "results.json"
    junk.parent.mkdir()
    junk.write_text("[1, 2]", encoding="utf-8")
    assert report.main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert "not a JSON object" in err
    assert "none of the 1 results.json file(s)" in err
    with pytest.raises(SystemExit) as info:
        report.main([])
    assert info.value.code == 2
    capsys.readouterr()


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keras_seht.experiments.report", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        timeout=300,
    )


def test_command_line(runs_dir, tmp_path):
    out = tmp_path / "cli"
    proc = _run_module(str(runs_dir), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert CIFAR_TABLE in proc.stdout
    assert "warning: " in proc.stderr
    assert (out / "report.md").read_text("utf-8") in proc.stdout
    _check_png(out / f"curves_{CIFAR}.png")

    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = _run_module(str(empty))
    assert proc.returncode != 0
    assert "error: No results.json found under" in proc.stderr
    assert not os.listdir(empty)
