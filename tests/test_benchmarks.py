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
