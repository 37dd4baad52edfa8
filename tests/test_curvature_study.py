"""benchmarks/curvature_stability.py runs, checkpoints and resumes."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "curvature_stability.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("curvature_stability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_study_writes_and_resumes(tmp_path, monkeypatch, capsys):
    study = _load_script()
    args = ["--smoke", "--output-dir", str(tmp_path)]
    study.main(args)

    # One record per run: 3 models x (baseline + 3 methods x 1 strength).
    payload = json.loads((tmp_path / "curvature_stability.json").read_text())
    runs = payload["runs"]
    keys = [(r["model"], r["method"], r["strength"], r["seed"]) for r in runs]
    assert (
        len(runs)
        == len(set(keys))
        == len(study.MODELS) * (1 + len(study.METHODS) - 1)
    )
    assert {r["model"] for r in runs} == set(study.MODELS)
    assert {r["method"] for r in runs} == set(study.METHODS)
    for run in runs:
        assert isinstance(run["diverged"], bool)
        assert run["time_ratio"] > 0
        if run["method"] == "baseline":
            assert math.isfinite(run["test_accuracy"])
            assert run["strength"] is None and run["skipped_steps"] is None
        else:
            assert 0.0 <= run["negative_fraction"] <= 1.0
            assert run["skipped_steps"] >= 0
    assert payload["setup"]["epochs"] == 1
    assert "diverged" in payload["divergence"]
    assert len(payload["aggregates"]) == len(runs)  # one seed per cell

    # The Markdown table: one row per model x method x strength.
    table = (tmp_path / "curvature_stability.md").read_text()
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    ]
    assert len(rows) == len(runs)
    for model in study.MODELS:
        for method in study.METHODS:
            assert any(
                row.startswith(f"| {model} | {method} |") for row in rows
            )
    assert "12 runs, 0 already done" in capsys.readouterr().out

    # A rerun without --fresh trains nothing and keeps the records.
    def no_training(*args, **kwargs):
        raise AssertionError("a completed run was run again")

    monkeypatch.setattr(study, "run_one", no_training)
    monkeypatch.setattr(study, "warm_up", no_training)
    again = study.main(args)
    assert again["runs"] == runs
    assert "12 runs, 12 already done" in capsys.readouterr().out

    # Another setup refuses to mix with the stored runs.
    with pytest.raises(SystemExit, match="another setup"):
        study.main(["--output-dir", str(tmp_path), "--epochs", "2"])
