"""The demo (``python -m keras_seht.experiments.demo``) and the digits data.

The demo runs in-process in ``--quick`` mode on the MLP only (seconds);
the full command-line run over both models is marked slow. The demo is
glue over the train step that tests/test_training.py checks on every
backend, so the default run tests it under one backend only
(``single_backend``, conftest: 7 s on torch, 30-80 s on TensorFlow and
JAX, which compile every run); ``make test-all`` runs it everywhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_seht
from keras_seht.data import load_digits
from keras_seht.experiments import demo

pytestmark = pytest.mark.single_backend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = [
    "baseline",
    "SEHT-D(p=0.01)",
    "SEHT-D(p=0.05)",
    "SEHT-H(max_iter=1)",
]
HEADER = (
    "| model | method | test acc | best acc | exact tr(H) | tr / base "
    "| train s | time / base |"
)
NUMBERS = [
    "test_accuracy",
    "best_test_accuracy",
    "test_loss",
    "exact_trace",
    "train_seconds",
    "fit_seconds",
    "exact_trace_seconds",
    "time_ratio",
]


def _check_png(path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), "curves.png is not a PNG"
    assert len(data) > 1000
    # IHDR: width and height, big-endian, right after the signature.
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def _check_results(results, models, epochs, strength):
    assert results["backend"] == keras.config.backend()
    assert results["config"]["models"] == models
    assert results["versions"]["keras_seht"] == (keras_seht.__version__)
    assert math.isfinite(results["total_seconds"])
    runs = results["runs"]
    assert [(r["model"], r["method"]) for r in runs] == [
        (model, method) for model in models for method in METHODS
    ]
    expected = {
        "baseline": None,
        "SEHT-D(p=0.01)": keras_seht.SEHTD(p=0.01, strength=strength),
        "SEHT-D(p=0.05)": keras_seht.SEHTD(p=0.05, strength=strength),
        "SEHT-H(max_iter=1)": keras_seht.SEHTH(max_iter=1, strength=strength),
    }
    for run in runs:
        name = f"{run['model']} / {run['method']}"
        for key in NUMBERS:
            assert isinstance(run[key], float), (name, key)
            assert math.isfinite(run[key]), (name, key, run[key])
        assert 0.0 <= run["test_accuracy"] <= run["best_test_accuracy"] <= 1
        assert run["train_seconds"] > 0 and run["exact_trace"] >= 0
        estimator = expected[run["method"]]
        if estimator is None:
            assert run["estimator"] is None and run["time_ratio"] == 1.0
        else:
            assert run["estimator_class"] == type(estimator).__name__
            rebuilt = type(estimator).from_config(run["estimator"])
            assert rebuilt == estimator, name
        history = run["history"]
        assert ("seht_trace" in history) == (estimator is not None), name
        for key, values in history.items():
            assert len(values) == epochs, (name, key)
            assert all(math.isfinite(v) for v in values), (name, key)
        if estimator is not None:
            assert history["seht_skipped"] == [0.0] * epochs, name


def test_demo_quick_mlp(tmp_path, capsys):
    out = tmp_path / "out"
    results = demo.main(
        ["--quick", "--models", "mlp", "--output-dir", str(out)]
    )
    printed = capsys.readouterr().out

    json_path = out / "results.json"
    assert json_path.is_file()
    written = json.loads(json_path.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(results))
    _check_results(
        written, ["mlp"], demo.QUICK["epochs"], demo.DEFAULT_STRENGTH
    )
    config = written["config"]
    assert config["quick"] is True
    assert config["train_size"] == demo.QUICK["train_samples"]
    assert config["probe_samples"] == demo.QUICK["probe_samples"]
    assert config["test_size"] == 450
    assert all(r["trainable_weights"] == 3466 for r in written["runs"])
    _check_png(out / "curves.png")
    # No temporary files of the atomic writes are left behind.
    assert sorted(os.listdir(out)) == ["curves.png", "results.json"]

    lines = printed.splitlines()
    assert lines[0].startswith("keras-seht demo: backend=")
    assert HEADER in lines
    rows = [ln for ln in lines if ln.startswith("| mlp |")]
    assert [row.split(" | ")[1] for row in rows] == METHODS
    assert f"Wrote {json_path}" in printed


@pytest.mark.slow
def test_demo_command_line_quick(tmp_path):
    """The module's command line, both models (~20-60 s)."""
    env = dict(
        os.environ, KERAS_BACKEND=keras.config.backend(), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_seht.experiments.demo",
            "--quick",
            "--output-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert HEADER in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text("utf-8"))
    _check_results(
        results, ["mlp", "cnn"], demo.QUICK["epochs"], demo.DEFAULT_STRENGTH
    )
    _check_png(tmp_path / "curves.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet"], "--models must be a comma-separated list"),
        (["--models", ""], "--models must be a comma-separated list"),
        (["--epochs", "0"], "must be >= 1"),
        (["--strength", "-1"], "must be >= 0"),
        (["--strength", "nan"], "must be >= 0"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.make_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_parser_defaults():
    args = demo.make_parser().parse_args(["--models", "cnn,mlp,cnn"])
    assert args.models == ["cnn", "mlp"]
    assert args.strength == demo.DEFAULT_STRENGTH
    assert not args.quick


def test_format_table():
    def run(model, method, trace, estimator=True):
        return {
            "model": model,
            "method": method,
            "estimator": {} if estimator else None,
            "test_accuracy": 0.5,
            "best_test_accuracy": 0.75,
            "exact_trace": trace,
            "train_seconds": 2.0,
            "time_ratio": 1.5,
        }

    table = demo.format_table(
        [
            run("mlp", "baseline", 10.0, estimator=False),
            run("mlp", "SEHT-H(max_iter=1)", 5.0),
            run("cnn", "SEHT-D(p=0.01)", 1.0),  # no baseline: no ratios
        ],
        probe_samples=32,
        strength=0.1,
    )
    lines = table.splitlines()
    assert "strength=0.1" in lines[0] and "first 32 training" in lines[0]
    assert HEADER in lines
    assert "| mlp | SEHT-H(max_iter=1) | 50.0% | 75.0% | 5.000 | 0.50 " in table
    assert lines[-1] == (
        "| cnn | SEHT-D(p=0.01) | 50.0% | 75.0% | 1.000 | - | 2.00 | - |"
    )


# --------------------------------------------------------------------------
# keras_seht.data.load_digits
# --------------------------------------------------------------------------


def test_load_digits_shapes_and_dtypes():
    (x_train, y_train), (x_test, y_test) = load_digits()
    assert x_train.shape == (1347, 8, 8, 1)
    assert x_test.shape == (450, 8, 8, 1)
    assert y_train.shape == (1347,) and y_test.shape == (450,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    for y in (y_train, y_test):
        assert set(np.unique(y)) == set(range(10))
    # Stratified: every class keeps (about) the overall class frequencies.
    overall = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    test_counts = np.bincount(y_test, minlength=10)
    np.testing.assert_allclose(test_counts, overall * 0.25, atol=1.01)


def test_load_digits_split_is_deterministic():
    first = load_digits(seed=0)
    second = load_digits(seed=0)
    for a, b in zip(
        [*first[0], *first[1]], [*second[0], *second[1]], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    other = load_digits(seed=1)
    assert not np.array_equal(first[0][0], other[0][0])
    # Same images, split differently: the union is the whole data set.
    for data in (first, other):
        (x_train, _), (x_test, _) = data
        together = np.concatenate([x_train, x_test]).reshape(-1, 64)
        assert len(together) == 1797
    all_first = np.sort(
        np.concatenate([first[0][0], first[1][0]]).reshape(-1, 64), axis=0
    )
    all_other = np.sort(
        np.concatenate([other[0][0], other[1][0]]).reshape(-1, 64), axis=0
    )
    np.testing.assert_array_equal(all_first, all_other)


def test_load_digits_options():
    (x_train, y_train), (x_test, _) = load_digits(flatten=True)
    (x_images, y_images), _ = load_digits()
    assert x_train.shape == (1347, 64) and x_test.shape == (450, 64)
    np.testing.assert_array_equal(x_train, x_images.reshape(-1, 64))
    np.testing.assert_array_equal(y_train, y_images)
    (x_train, _), (x_test, _) = load_digits(test_fraction=0.5)
    assert len(x_train) + len(x_test) == 1797
    assert abs(len(x_train) - len(x_test)) <= 1
    for bad in [0, 1, -0.1, 1.5, math.nan, "x", None]:
        with pytest.raises(
            ValueError, match=r"`test_fraction` must be in \(0, 1\)"
        ):
            load_digits(test_fraction=bad)
