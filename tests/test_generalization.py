"""The "does it help?" study (benchmarks/generalization.py) and its page."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess
import sys
from types import ModuleType
from typing import Any

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return _load(ROOT / "benchmarks" / "generalization.py", "_generalization")


@pytest.fixture(scope="module")
def pages() -> ModuleType:
    return _load(ROOT / "scripts" / "results_pages.py", "_results_pages")


# Two methods, one data set and model, 1 epoch on 96 samples: seconds.
SMALL = [
    "--quick",
    "--data",
    "digits",
    "--models",
    "mlp",
    "--methods",
    "baseline,seht_h_0.01",
    "--no-plots",
]


def _record(seed: int, **metrics: float) -> dict[str, Any]:
    return {"seed": seed, **metrics}


def test_paired_differences_match_a_hand_computation(study):
    base = {s: _record(s, acc=a) for s, a in enumerate([0.90, 0.80, 0.85])}
    runs = [_record(s, acc=a) for s, a in enumerate([0.93, 0.80, 0.91])]
    runs.append(_record(7, acc=1.0))  # no baseline of seed 7: not paired
    stats = study.paired_differences(runs, base, "acc")
    # d = (0.03, 0.00, 0.06): mean 0.03; sample variance
    # ((0)^2 + 0.03^2 + 0.03^2) / 2 = 9e-4; SE = sqrt(9e-4 / 3).
    eps = np.finfo("float64").eps * 8  # a few round-offs of 0.0x sums
    assert stats["n"] == stats["finite"] == 3
    assert stats["mean"] == pytest.approx(0.03, abs=eps)
    assert stats["se"] == pytest.approx(math.sqrt(9e-4 / 3), abs=eps)
    assert study.verdict(stats) == "no difference"  # 0.03 < 2 * 0.0173


def test_paired_differences_keep_a_nan_run_counted(study):
    base = {0: _record(0, acc=0.5), 1: _record(1, acc=0.5)}
    runs = [_record(0, acc=float("nan")), _record(1, acc=0.6)]
    stats = study.paired_differences(runs, base, "acc")
    assert (stats["n"], stats["finite"]) == (2, 1)
    assert study.verdict(stats) == "n/a"  # one finite difference


@pytest.mark.parametrize(
    "mean, se, expected",
    [
        (0.05, 0.02, "better"),  # 0.05 - 2 * 0.02 > 0
        (0.05, 0.03, "no difference"),
        (-0.05, 0.02, "worse"),
        (0.0, 0.0, "no difference"),
    ],
)
def test_verdict_rule(study, mean, se, expected):
    stats = {"mean": mean, "se": se, "finite": 5, "n": 5}
    assert study.verdict(stats) == expected


def test_every_method_compiles_and_names_its_settings(study):
    assert list(study.METHODS)[0] == "baseline"
    for name in ("seht_h_0.001", "seht_gn_0.1", "seht_h_0.1_bounded"):
        assert name in study.METHODS
    gn = study.METHODS["seht_gn_0.01"].seht()
    assert (gn.curvature, gn.strength) == ("gauss_newton", 0.01)
    assert study.METHODS["seht_h_0.1_bounded"].safeguard


def test_quick_run_and_resume(study, tmp_path, capsys):
    payload = study.main(SMALL + ["--output-dir", tmp_path])
    runs = payload["runs"]
    assert [r["method"] for r in runs] == ["baseline", "seht_h_0.01"]
    assert payload["setup"]["backend"] == keras.config.backend()
    for run in runs:
        assert 0 <= run["test_accuracy"] <= run["best_test_accuracy"] <= 1
        assert run["finite"] and run["trace_method"] == "hutchinson"
        assert math.isfinite(run["heldout_trace"])
        assert math.isfinite(run["train_trace"])
        assert math.isfinite(run["top_eigenvalue"])
    assert runs[0]["time_ratio"] == 1.0 and runs[1]["time_ratio"] > 0
    # The interleaved timing: both methods, the baseline's ratio 1.
    timing = payload["step_time"]["digits_mlp"]
    assert set(timing) == {"baseline", "seht_h_0.01"}
    assert timing["baseline"]["ratio"] == 1.0
    assert timing["seht_h_0.01"]["seconds"] > 0
    shown = f"| {timing['seht_h_0.01']['ratio']:.2f}x |"
    assert payload["tables"]["digits_mlp"].splitlines()[-1].endswith(shown)
    rows = {r["method"]: r for r in payload["aggregates"]}
    delta = rows["seht_h_0.01"]["delta_test_accuracy"]
    assert delta["mean"] == pytest.approx(
        runs[1]["test_accuracy"] - runs[0]["test_accuracy"]
    )
    assert rows["seht_h_0.01"]["verdict_test_accuracy"] == "n/a"  # 1 seed
    stored = json.loads((tmp_path / "generalization.json").read_text())
    assert stored["runs"] == runs
    assert "| SEHT-H(0.01) | 1 | 1/1 |" in stored["tables"]["digits_mlp"]
    report = (tmp_path / "generalization.md").read_text()
    assert "## digits mlp" in report and "## Verdicts" in report
    assert "2 runs, 0 already done" in capsys.readouterr().out

    # A rerun trains only what is missing.
    more = SMALL[:-3] + ["--methods", "baseline,seht_h_0.01,seht_gn_0.01"]
    again = study.main(more + ["--no-plots", "--output-dir", tmp_path])
    assert again["runs"][:2] == runs
    assert [r["method"] for r in again["runs"][2:]] == ["seht_gn_0.01"]
    assert "3 runs, 2 already done" in capsys.readouterr().out


def test_resume_after_an_interrupted_run(study, tmp_path, monkeypatch):
    real = study.run_one
    calls = []

    def dies_on_the_second(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of a run
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "run_one", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        study.main(SMALL + ["--output-dir", tmp_path])
    stored = json.loads((tmp_path / "generalization.json").read_text())
    assert [r["method"] for r in stored["runs"]] == ["baseline"]

    monkeypatch.setattr(study, "run_one", real)
    payload = study.main(SMALL + ["--output-dir", tmp_path])
    assert payload["runs"][0] == stored["runs"][0]
    assert [r["method"] for r in payload["runs"]] == [
        "baseline",
        "seht_h_0.01",
    ]
    # The baseline ran in another session: no time ratio across sessions.
    assert math.isnan(payload["runs"][1]["time_ratio"])


def test_another_setup_is_refused(study, tmp_path):
    args = SMALL[:-3] + ["--methods", "baseline", "--output-dir", tmp_path]
    study.main(args)
    with pytest.raises(SystemExit, match="another setup"):
        study.main(args + ["--exact-trace"])


def test_bad_arguments_are_refused(study, capsys):
    for bad in (["--methods", "nope"], ["--data", "cifar"], ["--seeds", "-1"]):
        with pytest.raises(SystemExit):
            study.make_parser().parse_args(bad)
    assert "must be a comma-separated list of" in capsys.readouterr().err


def _fake_payload(study: ModuleType) -> dict[str, Any]:
    """Records of two seeds, built by hand, aggregated by the study."""
    records = []
    for seed, (base, seht) in enumerate([(0.80, 0.86), (0.82, 0.87)]):
        for method, acc in (("baseline", base), ("seht_h_0.01", seht)):
            records.append(
                {
                    "data": "digits",
                    "model": "mlp",
                    "method": method,
                    "label": study.METHODS[method].label,
                    "seed": seed,
                    "session": "s",
                    "finite": True,
                    "trace_method": "hutchinson",
                    "test_accuracy": acc,
                    "best_test_accuracy": acc,
                    "test_loss": 1 - acc,
                    "heldout_trace": 10.0 if method == "baseline" else 5.0,
                    "train_trace": 1.0,
                    "top_eigenvalue": 2.0,
                    "seconds_per_step": 1.0,
                    "train_seconds": 1.0,
                    "diagnostics_seconds": 1.0,
                }
            )
    study.add_time_ratios(records)
    return {"runs": records, "aggregates": study.aggregate(records)}


def test_verdicts_of_a_clear_gain(study):
    rows = {r["method"]: r for r in _fake_payload(study)["aggregates"]}
    delta = rows["seht_h_0.01"]["delta_test_accuracy"]
    # d = (0.06, 0.05): mean 0.055, SE 0.005: 0.055 - 2 * 0.005 > 0.
    assert delta["mean"] == pytest.approx(0.055)
    assert delta["se"] == pytest.approx(0.005)
    assert rows["seht_h_0.01"]["verdict_test_accuracy"] == "better"
    sentence = study.conclusions(list(rows.values()))[0]
    assert "better than the baseline: SEHT-H(0.01); worse: none" in sentence


def test_page_from_quick_results(study, pages, tmp_path):
    study.main(
        ["--quick", "--data", "digits", "--models", "mlp", "--methods"]
        + ["baseline,seht_h_0.01,label_smoothing", "--output-dir", tmp_path]
    )
    page = pages.reflow(pages.does_it_help_page(tmp_path, date="today"))
    data = json.loads((tmp_path / "generalization.json").read_text())
    assert "Measured today" in page
    assert data["tables"]["digits_mlp"].splitlines()[2] in page
    assert "img/does_it_help_digits_mlp.png" in page
    assert "## What the numbers say" in page
    # One seed: no comparison has a verdict, and the page says so.
    assert "0 comparisons with the baseline" in page
    assert "0 of 3 runs ended with a non-finite" in page
    figures = pages.does_it_help_figures(tmp_path)
    assert list(figures) == ["img/does_it_help_digits_mlp.png"]
    assert all(path.exists() for path in figures.values())


def test_page_conclusion_counts_the_verdicts(study, pages):
    payload = _fake_payload(study)
    payload["setup"] = {"verdict_se": study.VERDICT_SE}
    items = pages._does_it_help_conclusion(payload)
    assert (
        "beat it beyond 2 standard errors of the paired difference: "
        in (items[0])
    )
    assert "SEHT-H(0.01) (digits mlp)" in items[0]
    # With 2 seeds: a 2-SE verdict by chance has probability 2 t_1(2) = 30%.
    assert "with 2 seeds" in items[2] and "probability 30%" in items[2]
    assert "1 better, 0 worse, 0 no difference; 1 of them" in items[3]


def test_page_without_results_has_no_numbers(pages, tmp_path):
    page = pages.does_it_help_page(tmp_path)
    assert "Not measured yet" in page
    assert "benchmarks/generalization.py" in page
    assert pages.does_it_help_figures(tmp_path) == {}


@pytest.mark.slow
def test_quick_study_runs_every_method(tmp_path):
    """The whole --quick study, in its own process, on this backend."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "generalization.py"),
            "--quick",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "generalization.json").read_text())
    cells = {(r["data"], r["model"]) for r in payload["runs"]}
    assert len(cells) == 4
    methods = {r["method"] for r in payload["runs"]}
    assert len(payload["runs"]) == 4 * len(methods)
    for name in payload["tables"]:
        assert (tmp_path / f"generalization_{name}.png").exists()
    assert "## Verdicts" in result.stdout
