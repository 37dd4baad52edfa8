"""The ``keras-seht`` command (``keras_seht.console``, ``python -m
keras_seht``): help, version, dispatch to the demo, benchmark and report.

Everything runs in-process except one ``python -m keras_seht --help``
(about 10 s: it imports Keras and the backend). The real demo and
benchmark runs are marked slow. The rest is backend-independent, so the
default run tests it under one backend (``single_backend``, conftest).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

import keras_seht
from keras_seht import console
from keras_seht.experiments import demo, report

# Argument parsing and dispatch: one backend is enough (conftest).
pytestmark = pytest.mark.single_backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("demo", "bench", "report")


@pytest.fixture(autouse=True)
def _help_width(monkeypatch):
    """argparse wraps help to the terminal's width: fix it at 80."""
    monkeypatch.setenv("COLUMNS", "80")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """``keras-seht ARGV`` in-process: (exit status, stdout, stderr)."""
    status = console.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _write_run(folder: pathlib.Path, **fields) -> pathlib.Path:
    """A ``results.json`` in the format the example scripts write."""
    record = {
        "format": report.RESULTS_FORMAT,
        "experiment": "toy",
        "method": "baseline",
        "seed": 0,
        "config": {"epochs": 2},
        "history": {"val_accuracy": [0.5, 0.75], "loss": [1.5, 0.5]},
        "epochs_completed": 2,
        "complete": True,
        "diverged": False,
        "wall_time_s": 1.0,
        "versions": {},
        "final": {"test_accuracy": 0.75, "test_loss": 0.5},
    }
    record.update(fields)
    folder.mkdir(parents=True)
    path = folder / report.RESULTS_FILE
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


# ------------------------------------------------------------------- help


def test_help_names_and_explains_every_subcommand(capsys):
    status, out, err = _run(capsys, "--help")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert (
        lines[0] == "usage: keras-seht [-h] [--version] SUBCOMMAND [ARGS ...]"
    )
    assert "keras-seht: Hessian-trace (curvature) regularization" in out
    for name, sub in console.SUBCOMMANDS.items():
        assert any(line.startswith(f"  {name} ") for line in lines), name
        assert f"example: {sub.example}" in out
        assert sub.example.startswith(f"keras-seht {name}")
    assert set(console.SUBCOMMANDS) == set(SUBCOMMANDS)
    assert "Run `keras-seht SUBCOMMAND --help`" in out
    assert "--version" in out and "KERAS_BACKEND" in out
    assert max(len(line) for line in lines) <= console.WIDTH


def test_help_uses_the_program_name(capsys):
    status = console.main(["-h"], prog="python -m keras_seht")
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("usage: python -m keras_seht [-h]")
    assert "example: python -m keras_seht demo --quick" in out
    assert "Run `python -m keras_seht SUBCOMMAND --help`" in out


@pytest.mark.parametrize(
    "name, expected",
    [
        ("demo", "--quick"),
        ("report", "RUNS_DIR"),
        ("bench", "--repeats"),
    ],
)
def test_subcommand_help_is_the_subcommand_own(name, expected, capsys):
    if name == "bench" and console.find_benchmark() is None:
        pytest.skip("no source checkout with benchmarks/step_time.py")
    status, out, _ = _run(capsys, name, "--help")
    assert status == 0
    assert out.startswith(f"usage: keras-seht {name} [-h]")
    assert expected in out


def test_version(capsys):
    status, out, err = _run(capsys, "--version")
    assert status == 0 and err == ""
    assert out == (
        f"keras-seht {keras_seht.__version__} (Keras {keras.__version__}, "
        f"backend: {keras.config.backend()})\n"
    )


def test_python_m_keras_seht_help():
    env = dict(
        os.environ, KERAS_BACKEND=keras.config.backend(), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "keras_seht", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: python -m keras_seht [-h]")
    for name in SUBCOMMANDS:
        assert f"example: python -m keras_seht {name}" in proc.stdout


# ----------------------------------------------------------------- errors


def test_unknown_subcommand_exits_2_with_the_choices(capsys):
    status, out, err = _run(capsys, "frobnicate", "--quick")
    assert status == 2 and out == ""
    assert "keras-seht: error: unknown subcommand 'frobnicate'" in err
    assert "choose one of demo, bench, report" in err
    assert "keras-seht --help" in err
    status, _, err = _run(capsys, "dem")
    assert status == 2 and "Did you mean 'demo'?" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "choose a subcommand: demo, bench, report"),
        (["--quick"], "unrecognized arguments: --quick"),
        (["demo", "--epochs", "0"], "keras-seht demo: error: argument"),
        (["report"], "keras-seht report: error: the following arguments"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    status, _, err = _run(capsys, *argv)
    assert status == 2
    assert message in err


def test_exit_status_of_system_exit(capsys):
    assert console._exit_status(None) == 0
    assert console._exit_status(3) == 3
    assert console._exit_status("torch failed: boom") == 1
    assert capsys.readouterr().err == "torch failed: boom\n"


# --------------------------------------------------------------- dispatch


@pytest.mark.parametrize("name, module", [("demo", demo), ("report", report)])
def test_arguments_are_passed_unchanged(name, module, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(module, "main", lambda argv: calls.append(argv) or 0)
    if name == "demo":
        args = ["--quick", "--models", "mlp", "--output-dir", "a b", "--seed=3"]
    else:
        args = [str(tmp_path), "--metric", "test_accuracy", "--no-plots"]
    assert console.main([name, *args]) == 0
    assert calls == [args]


def test_report_prints_the_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs / "baseline" / "seed_0")
    status, out, err = _run(capsys, "report", str(runs))
    assert status == 0, err
    assert "## toy" in out
    assert "| method | n | test_accuracy (%) | test_loss |" in out
    assert "| baseline | 1 | 75.00 (n=1) | 0.5000 (n=1) |" in out
    assert (runs / "report.md").is_file()
    assert (runs / "curves_toy.png").is_file()


def test_report_on_an_empty_folder_fails(tmp_path, capsys):
    status, out, err = _run(capsys, "report", str(tmp_path))
    assert status == 1
    assert "No results.json found" in err
    status, _, err = _run(capsys, "report", str(tmp_path / "missing"))
    assert status == 1 and "does not exist" in err


@pytest.mark.slow
def test_demo_quick_runs_through_the_console(tmp_path, capsys):
    """The real demo, MLP only (measured on a shared 2-core machine: 4 s
    on torch, 21 s on TensorFlow, 57 s on JAX, which compiles each run).
    `test_arguments_are_passed_unchanged` checks the wiring in the fast
    suite."""
    out_dir = tmp_path / "demo"
    status, out, _ = _run(
        capsys, "demo", "--quick", "--models", "mlp", "--output-dir", out_dir
    )
    assert status == 0
    assert out.startswith(
        f"keras-seht demo: backend={keras.config.backend()}, models=mlp"
    )
    assert "| model | strength |" in out
    results = json.loads((out_dir / "results.json").read_text("utf-8"))
    assert results["config"]["quick"] is True
    assert [run["method"] for run in results["runs"]] == [
        name for name, _ in demo.METHODS
    ]
    assert (out_dir / "curves.png").is_file()


# ------------------------------------------------------------------ bench


def test_bench_without_a_source_checkout_explains(monkeypatch, capsys):
    monkeypatch.setattr(console, "find_benchmark", lambda: None)
    status, out, err = _run(capsys, "bench", "--repeats", "1")
    assert status == 2 and out == ""
    text = " ".join(err.split())
    assert "keras-seht bench: error:" in text
    assert "benchmarks/step_time.py" in text
    assert "not part of the installed package" in text
    assert "repository's root" in text


def test_find_benchmark(monkeypatch, tmp_path):
    script = ROOT / "benchmarks" / "step_time.py"
    if not script.is_file():
        pytest.skip("not a source checkout")
    monkeypatch.chdir(tmp_path)
    found = console.find_benchmark()
    if found is None:  # keras_seht installed from a wheel, not this tree
        monkeypatch.chdir(ROOT)
        found = console.find_benchmark()
    assert found is not None and found.samefile(script)


@pytest.mark.slow
def test_bench_runs_the_step_time_benchmark(tmp_path, capsys):
    """One backend, one repeat, a tiny MLP (one child Python: ~20 s)."""
    if console.find_benchmark() is None:
        pytest.skip("no source checkout with benchmarks/step_time.py")
    backend = keras.config.backend()
    output = tmp_path / "step_time.json"
    argv = ["--backends", backend, "--repeats", "1", "--samples", "256"]
    argv += ["--width", "32", "--output", str(output)]
    saved = list(sys.argv)
    status, out, err = _run(capsys, "bench", *argv)
    assert status == 0, err[-3000:]
    assert sys.argv == saved
    ratios = json.loads(output.read_text("utf-8"))["ratios"][backend]
    assert ratios["plain"] == 1.0
    assert f"| {backend} |" in out
