"""The benchmark scripts run (slow: they start a backend per run)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_time_benchmark_runs(tmp_path):
    output = tmp_path / "step_time.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_time.py"),
            "--backends",
            keras.config.backend(),
            "--repeats",
            "1",
            "--samples",
            "256",
            "--width",
            "32",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(output.read_text())["ratios"][keras.config.backend()]
    assert ratios["plain"] == 1.0
    assert all(r > 0 for r in ratios.values())
    assert "| backend |" in result.stdout


@pytest.mark.slow
def test_step_overhead_benchmark_runs(tmp_path):
    output = tmp_path / "step_overhead.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_overhead.py"),
            "--models",
            "resnet,lstm",
            "--methods",
            "plain,SEHT-D(p=0.01),SEHT-H(1) antithetic",
            "--width",
            "4",
            "--batch",
            "4",
            "--vocab",
            "50",
            "--units",
            "8",
            "--lm-batch",
            "2",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--memory-steps",
            "1",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["backend"] == keras.config.backend()
    for model in ("resnet", "lstm"):
        ratios = results["models"][model]
        assert ratios["time"]["plain"]["mean"] == 1.0
        assert ratios["memory"]["plain"] == 1.0
        assert all(r["mean"] > 0 for r in ratios["time"].values())
    assert "| resnet | SEHT-D(p=0.01) |" in result.stdout


@pytest.mark.single_backend  # the script's logic; SAM/GNP: test_sharpness.py
def test_sharpness_digits_benchmark_runs_and_resumes(tmp_path, capsys):
    # In-process (no second backend start-up) and --quick: about 8 s.
    spec = importlib.util.spec_from_file_location(
        "sharpness_digits", ROOT / "benchmarks" / "sharpness_digits.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "sharpness.json"
    payload = bench.main(["--quick", "--seeds", "3,4", "--output", output])

    runs = payload["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [
        (m, 3) for m in bench.METHODS
    ]
    assert payload["setup"]["backend"] == keras.config.backend()
    assert payload["setup"]["epochs"] == 1
    logged = {r["method"]: r["logged_name"] for r in runs}
    assert logged == {
        "baseline": None,
        "sam": "sam_gradient_norm",
        "asam": "sam_gradient_norm",
        "gnp": "gradient_norm_sq",
        "seht_h": "seht_trace",
    }
    for run in runs:
        assert 0.0 <= run["test_accuracy"] <= run["best_test_accuracy"] <= 1
        assert math.isfinite(run["test_loss"]) and run["time_ratio"] > 0
    rows = {row["method"]: row for row in payload["aggregates"]}
    assert rows["baseline"]["delta_test_accuracy"] is None
    assert rows["baseline"]["time_ratio"]["mean"] == 1.0
    sam = rows["sam"]
    assert sam["delta_test_accuracy"]["mean"] == pytest.approx(
        runs[1]["test_accuracy"] - runs[0]["test_accuracy"]
    )
    assert json.loads(output.read_text())["runs"] == runs
    out = capsys.readouterr().out
    assert "[5/5] SEHT-H" in out and "| SAM(rho=0.05) | 1 |" in out

    # A rerun skips the stored runs and trains none.
    again = bench.main(
        ["--quick", "--seeds", "3", "--output", output, "--methods", "sam"]
    )
    assert again["runs"] == runs
    assert "1 runs, 1 already done" in capsys.readouterr().out
