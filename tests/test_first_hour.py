"""A new user's first hour (issue 23): the demo, the command line, the
examples and the diagnostics say what they need and what they do.

The README's extras and its save/load note are checked in test_readme.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import compile_plain, make_data, tanh_mlp

import keras_seht
from keras_seht import console
from keras_seht.experiments import demo, report
from keras_seht.spectrum import (
    ConvergenceWarning,
    hessian_top_eigenvalue,
    top_eigenvalue,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def _help_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


# ------------------------------------------------------------ item 2: demo


@pytest.mark.parametrize("missing", ["matplotlib", "sklearn"])
def test_demo_checks_its_extra_before_training(
    missing, monkeypatch, tmp_path, capsys
):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails
    trained = []
    monkeypatch.setattr(demo, "train_one", lambda *a: trained.append(a))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        demo.main(["--quick", "--models", "mlp", "--output-dir", str(out)])
    message = str(raised.value.code)
    assert 'pip install "keras-seht[demo]"' in message
    name = {"sklearn": "scikit-learn"}.get(missing, missing)
    assert f"missing: {name}" in message
    assert not trained and not out.exists()
    # The command prints the message and fails (exit status 1).
    assert console.main(["demo", "--quick", "--output-dir", str(out)]) == 1
    assert 'keras-seht[demo]"' in capsys.readouterr().err


@pytest.mark.single_backend
def test_demo_prints_the_table_before_plotting(monkeypatch, tmp_path, capsys):
    def broken_plot(*args):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(demo, "plot_curves", broken_plot)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plotting failed"):
        demo.main(
            ["--quick", "--models", "mlp", "--epochs", "1"]
            + ["--output-dir", str(out)]
        )
    printed = capsys.readouterr().out
    assert "| model | strength |" in printed
    assert (out / "results.json").is_file()


# -------------------------------------------------- item 3: example import


def test_mnist_example_imports_keras_seht_before_keras(tmp_path):
    """Its ``--help`` runs with KERAS_BACKEND unset, and the backend chosen
    is keras-seht's default (torch), not Keras' TensorFlow."""
    script = ROOT / "examples" / "mnist_hessian_reinit.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "import keras\n"
        "print('BACKEND', keras.config.backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json naming a backend
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
    assert "BACKEND torch" in result.stdout, result.stdout[-500:]
    # Every example imports keras_seht (or a module of it) before keras.
    for path in sorted((ROOT / "examples").glob("*.py")):
        lines = path.read_text().splitlines()
        keras_lines = [
            i for i, ln in enumerate(lines) if ln.startswith("import keras")
        ]
        seht = [
            i
            for i, ln in enumerate(lines)
            if ln.startswith(("import keras_seht", "from keras_seht"))
        ]
        plain = [i for i in keras_lines if lines[i].split()[1] == "keras"]
        assert not plain or (seht and seht[0] < plain[0]), path.name


# ----------------------------------------------- item 4: power iteration


class Diagonal:
    def __init__(self, values):
        self.a = np.diag(values)

    def __call__(self, vectors):
        return [self.a @ vectors[0]]


def test_top_eigenvalue_returns_residual():
    op = Diagonal([3.0, -1.0, 0.5, 2.9])
    value, residual = top_eigenvalue(
        op, [(4,)], iters=3, seed=0, return_residual=True
    )
    assert residual > 1e-2  # far from converged after 3 iterations
    value, residual = top_eigenvalue(
        op, [(4,)], iters=5000, seed=0, tol=1e-14, return_residual=True
    )
    assert value == pytest.approx(3.0, rel=1e-8)
    assert residual < 1e-3
    # The default is the float alone, and the building block is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(top_eigenvalue(op, [(4,)], iters=3), float)


def test_top_eigenvalue_warns_when_asked():
    op = Diagonal([3.0, -1.0, 0.5, 2.9])
    with pytest.warns(ConvergenceWarning, match="residual"):
        top_eigenvalue(op, [(4,)], iters=3, warn_unconverged=True)
    with warnings.catch_warnings():  # converged, or tol=0: no warning
        warnings.simplefilter("error")
        top_eigenvalue(op, [(4,)], iters=5000, warn_unconverged=True)
        top_eigenvalue(op, [(4,)], iters=3, tol=0.0, warn_unconverged=True)


def test_hessian_top_eigenvalue_warns_when_unconverged():
    x, y = make_data(n=16)
    model = compile_plain(tanh_mlp())
    with pytest.warns(ConvergenceWarning) as caught:
        value, residual = hessian_top_eigenvalue(
            model, x, y, iters=3, return_residual=True
        )
    message = str(caught[0].message)
    assert "iters=3" in message and f"{residual:.2e}" in message
    assert caught[0].filename == __file__  # points at the caller
    converged, small = hessian_top_eigenvalue(
        model, x, y, iters=1000, tol=0.0, return_residual=True
    )
    assert small < residual
    assert abs(value) <= abs(converged) * (1 + 1e-6)


# ------------------------------------------------------ item 5: progress


def test_exact_trace_and_diagonal_show_progress(capsys):
    x, y = make_data(n=8)
    model = compile_plain(tanh_mlp())
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    quiet = keras_seht.exact_hessian_trace(model, x, y)
    assert capsys.readouterr().out == ""
    loud = keras_seht.exact_hessian_trace(model, x, y, verbose=1)
    assert f"{n}/{n}" in capsys.readouterr().out
    assert loud == pytest.approx(quiet)
    diagonal = keras_seht.hessian_diagonal(model, x, y, verbose=1)
    assert f"{n}/{n}" in capsys.readouterr().out
    assert len(diagonal) == len(model.trainable_variables)
    with pytest.raises(ValueError, match="verbose"):
        keras_seht.exact_hessian_trace(model, x, y, verbose=3)


# ---------------------------------------------------------- item 6: help


def test_demo_help_states_every_default(_help_width, capsys):
    assert console.main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [
        ("--epochs", "8"),
        ("--batch-size", "32"),
        ("--learning-rate", "0.05"),
        ("--seed", "0"),
        ("--output-dir", "demo_output"),
        ("--strength", "0.001,0.003,0.01,0.03,0.1,0.3"),
        ("--probe-samples", "256"),
        ("--models", "mlp,cnn"),
        ("--train-samples", "all 1,347"),
    ]:
        after = text.split(f" {option} ", 1)[1]
        help_text = after.split(" --", 1)[0]
        # "(default: X)" or "(default: X; with --quick: Y)"
        assert any(f"(default: {default}{end}" in help_text for end in ");"), (
            option,
            help_text,
        )
    assert "(default: None)" not in text
    assert "['mlp', 'cnn']" not in text
    assert 'pip install "keras-seht[demo]"' in text


# ------------------------------------------------------- item 9: report


def test_report_explains_the_demo_output(tmp_path, capsys):
    (tmp_path / "results.json").write_text(
        json.dumps({"config": {"seed": 0}, "runs": [], "backend": "torch"})
    )
    assert console.main(["report", str(tmp_path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "the output of `keras-seht demo`" in err
    assert "prints its own table" in err
    assert "examples/*.py" in err
    assert console.main(["report", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the demo prints its own table" in help_text
    assert report.DEMO_SKIPPED


# --------------------------------------------- item 10: numpy conversion


def test_eigenvalue_matvecs_give_no_numpy_warning():
    x, y = make_data(n=8)
    model = compile_plain(tanh_mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        hessian_top_eigenvalue(model, x, y, iters=5, tol=0.0)
        keras_seht.hessian_trace_hutchpp(model, x, y, samples=6)
        keras_seht.hessian_diagonal(model, x, y)


def test_progress_bar_leaves_out_zero_bookkeeping(capsys):
    """Item 7: the bar shows seht_trace, not the all-zero seht_skipped and
    seht_negative_fraction, which stay in the history."""
    import keras

    import keras_seht

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model = keras_seht.Sequential(
        [keras.Input((6,)), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(
        "sgd", "sparse_categorical_crossentropy", seht=keras_seht.SEHTH()
    )
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=2)
    shown = capsys.readouterr().out
    assert "seht_trace" in shown
    assert "seht_skipped" not in shown
    assert "seht_negative_fraction" not in shown
    assert history.history["seht_skipped"] == [0.0]
