"""The benchmark scripts run (slow: they start a backend per run)."""

from __future__ import annotations

import json
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
