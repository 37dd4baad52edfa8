"""The demo (``python -m keras_seht.experiments.demo``) and the digits data.

The demo runs in-process in ``--quick`` mode on the MLP only (seconds);
the command-line run over both models is marked slow, and so is the full
demo (tests/test_readme_tables.py reruns it against the committed
results file that README.md's table is generated from). The demo is
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
METHODS = ["baseline", "SEHT-D(p=0.05)", "SEHT-H(max_iter=1)"]
ESTIMATORS = {
    "SEHT-D(p=0.05)": lambda s: keras_seht.SEHTD(p=0.05, strength=s),
    "SEHT-H(max_iter=1)": lambda s: keras_seht.SEHTH(max_iter=1, strength=s),
}
HEADER = (
    "| model | strength | SEHT-D(p=0.05) tr / base | SEHT-D(p=0.05) acc "
    "| SEHT-H(max_iter=1) tr / base | SEHT-H(max_iter=1) acc |"
)
NUMBERS = [
    "test_accuracy",
    "best_test_accuracy",
    "test_loss",
    "exact_trace",
    "exact_trace_test",
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


def _expected_runs(models, strengths, seeds):
    """(model, method, strength, seed) of every run, in the demo's order."""
    return [
        row
        for model in models
        for row in [(model, "baseline", None, seed) for seed in seeds]
        + [
            (model, method, strength, seeds[0])
            for method in METHODS[1:]
            for strength in strengths
        ]
    ]


def _check_results(results, models, epochs, strengths, seeds=(0,)):
    assert results["backend"] == keras.config.backend()
    assert results["config"]["models"] == models
    assert results["config"]["strengths"] == strengths
    assert results["config"]["baseline_seeds"] == len(seeds)
    assert results["versions"]["keras_seht"] == (keras_seht.__version__)
    assert math.isfinite(results["total_seconds"])
    runs = results["runs"]
    assert [
        (r["model"], r["method"], r["strength"], r["seed"]) for r in runs
    ] == _expected_runs(models, strengths, list(seeds))
    for run in runs:
        name = f"{run['model']} / {run['method']} / {run['strength']}"
        for key in NUMBERS:
            assert isinstance(run[key], float), (name, key)
            assert math.isfinite(run[key]), (name, key, run[key])
        assert 0.0 <= run["test_accuracy"] <= run["best_test_accuracy"] <= 1
        assert run["train_seconds"] > 0
        assert run["exact_trace"] >= 0 and run["exact_trace_test"] >= 0
        if run["method"] == "baseline":
            estimator = None
            assert run["estimator"] is None
            if run["seed"] == seeds[0]:
                assert run["time_ratio"] == 1.0
        else:
            estimator = ESTIMATORS[run["method"]](run["strength"])
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


def test_demo_quick_mlp_sweep(tmp_path, capsys):
    """Two strengths and two baseline seeds, MLP only (~10 s on torch)."""
    out = tmp_path / "out"
    results = demo.main(
        ["--quick", "--models", "mlp", "--output-dir", str(out)]
        + ["--strengths", "0.1,0.01,0.1", "--baseline-seeds", "2"]
    )
    printed = capsys.readouterr().out

    json_path = out / "results.json"
    assert json_path.is_file()
    written = json.loads(json_path.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(results))
    _check_results(written, ["mlp"], demo.QUICK["epochs"], [0.01, 0.1], (0, 1))
    config = written["config"]
    assert config["quick"] is True
    assert config["train_size"] == demo.QUICK["train_samples"]
    assert config["probe_samples"] == demo.QUICK["probe_samples"]
    assert config["test_size"] == 450
    assert all(r["trainable_weights"] == 3466 for r in written["runs"])
    _check_png(out / "curves.png")
    # No temporary files of the atomic writes are left behind.
    assert sorted(os.listdir(out)) == [
        "curves.png",
        "results.json",
        "table.md",
    ]
    table = demo.format_table(written)
    assert (out / "table.md").read_text(encoding="utf-8") == table + "\n"
    assert table in printed

    lines = printed.splitlines()
    assert lines[0].startswith("keras-seht demo: backend=")
    assert "strengths=0.01,0.1," in lines[0]
    assert HEADER in lines
    rows = [ln.split(" | ")[1] for ln in lines if ln.startswith("| mlp |")]
    assert rows == [
        "0 (plain Keras)",
        "0 (plain Keras, seeds 1)",
        "0.01",
        "0.1",
    ]
    assert f"Wrote {json_path}" in printed


def test_demo_quick_is_deterministic(tmp_path):
    """Same seed, same backend: the same numbers, to the last bit."""
    argv = ["--quick", "--models", "mlp", "--epochs", "1"]
    first = demo.main(argv + ["--output-dir", str(tmp_path / "a")])
    second = demo.main(argv + ["--output-dir", str(tmp_path / "b")])
    keys = ["test_accuracy", "best_test_accuracy", "test_loss"]
    keys += ["exact_trace", "exact_trace_test", "history"]
    for a, b in zip(first["runs"], second["runs"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert demo.format_table(first) == demo.format_table(second)


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
        results,
        ["mlp", "cnn"],
        demo.QUICK["epochs"],
        list(demo.QUICK["strengths"]),
    )
    _check_png(tmp_path / "curves.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet"], "--models must be a comma-separated list"),
        (["--models", ""], "--models must be a comma-separated list"),
        (["--epochs", "0"], "must be >= 1"),
        (["--baseline-seeds", "0"], "must be >= 1"),
        (["--strengths", "0"], "numbers > 0; got '0'"),
        (["--strengths", "0.1,-1"], "numbers > 0; got '0.1,-1'"),
        (["--strength", "nan"], "numbers > 0; got 'nan'"),
        (["--strengths", "0.1,"], "numbers > 0; got '0.1,'"),
        (["--strengths", "x"], "numbers > 0; got 'x'"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.make_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_parser_defaults():
    parser = demo.make_parser()
    args = parser.parse_args(["--models", "cnn,mlp,cnn"])
    assert args.models == ["cnn", "mlp"]
    assert args.strengths is None  # main() fills DEFAULT_STRENGTHS in
    assert args.baseline_seeds is None
    assert not args.quick
    # --strength, the option of the single-strength demo, still works.
    assert parser.parse_args(["--strength", "0.05"]).strengths == [0.05]
    assert parser.parse_args(["--strengths", "0.3,1e-3"]).strengths == [
        0.001,
        0.3,
    ]
    assert list(demo.DEFAULT_STRENGTHS) == sorted(demo.DEFAULT_STRENGTHS)


def _run(model, method, trace, strength=None, seed=0, accuracy=0.5):
    return {
        "model": model,
        "method": method,
        "strength": strength,
        "seed": seed,
        "estimator": None if strength is None else {},
        "test_accuracy": accuracy,
        "best_test_accuracy": 0.75,
        "exact_trace_test": trace,
    }


def test_format_table():
    results = {
        "backend": "torch",
        "config": {"epochs": 3, "seed": 0, "probe_samples": 32},
        "runs": [
            _run("mlp", "baseline", 10.0),
            _run("mlp", "baseline", 12.5, seed=1, accuracy=0.25),
            _run("mlp", "SEHT-H(max_iter=1)", 5.0, strength=0.1),
            _run("mlp", "SEHT-H(max_iter=1)", 20.0, strength=0.003),
            _run("cnn", "SEHT-H(max_iter=1)", 1.0, strength=0.1),
            _run("cnn", "SEHT-D(p=0.05)", 2.0, strength=0.01),
        ],
    }
    table = demo.format_table(results)
    lines = table.splitlines()
    assert "3 epochs, seed 0, backend torch" in lines[0]
    assert "first 32 held-out test samples" in lines[0]
    assert lines[1] == ""
    assert lines[2] == (
        "| model | strength | SEHT-H(max_iter=1) tr / base "
        "| SEHT-H(max_iter=1) acc | SEHT-D(p=0.05) tr / base "
        "| SEHT-D(p=0.05) acc |"
    )
    assert lines[3] == "|---|---:|---:|---:|---:|---:|"
    assert lines[4:] == [
        "| mlp | 0 (plain Keras) | tr(H) = 10.00 | 50.0 / 75.0 "
        "| tr(H) = 10.00 | 50.0 / 75.0 |",
        "| mlp | 0 (plain Keras, seeds 1) | 1.25 | 25.0 / 75.0 "
        "| 1.25 | 25.0 / 75.0 |",
        # Sorted by strength; a method not run at a strength: empty.
        "| mlp | 0.003 | 2.00 | 50.0 / 75.0 |  |  |",
        "| mlp | 0.1 | 0.50 | 50.0 / 75.0 |  |  |",
        # No baseline: no ratios.
        "| cnn | 0.01 |  |  | - | 50.0 / 75.0 |",
        "| cnn | 0.1 | - | 50.0 / 75.0 |  |  |",
    ]


def test_plot_sweep(tmp_path):
    runs = [
        _run("mlp", "baseline", 10.0),
        _run("mlp", "baseline", 12.5, seed=1),
        _run("mlp", "SEHT-H(max_iter=1)", 5.0, strength=0.1),
        _run("mlp", "SEHT-H(max_iter=1)", 0.0, strength=0.3),
    ]
    for run in runs:
        run["exact_trace"] = run["exact_trace_test"]
    path = tmp_path / "sweep.png"
    demo.plot_sweep(str(path), {"config": {"probe_samples": 8}, "runs": runs})
    _check_png(path)


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
