"""CurvatureMonitor (keras_seht.callbacks.monitor) and plot_curvature."""

from __future__ import annotations

import csv
import math
import warnings

import keras
import numpy as np
import pytest
from conftest import compile_plain, make_data, tanh_mlp

import keras_seht
from keras_seht import spectrum
from keras_seht.callbacks.monitor import CurvatureMonitor
from keras_seht.operators import HessianOperator
from keras_seht.plotting import plot_curvature

KEYS = (
    "curvature_trace",
    "curvature_trace_std_error",
    "curvature_trace_hutchpp",
    "curvature_top_eigenvalue",
)
# Small budgets: the model has 83 weights.
BUDGET = dict(trace_samples=12, hutchpp_samples=9, eigen_iters=10)


def _fit(monitor=None, epochs=2, extra_callbacks=(), batch_size=16, **kw):
    """A fresh tanh MLP (seeded init) trained on fixed data."""
    keras.utils.set_random_seed(7)
    model = compile_plain(tanh_mlp())
    x, y = make_data(n=32)
    callbacks = ([monitor] if monitor is not None else []) + list(
        extra_callbacks
    )
    history = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=callbacks,
        verbose=0,
        **kw,
    )
    return model, history


def _probe():
    x, y = make_data(n=32)
    return x[:16], y[:16]


def _monitor(**kwargs):
    x, y = _probe()
    kwargs = {**BUDGET, **kwargs}
    return CurvatureMonitor(x, y, **kwargs)


def _dense_hessian(model, x, y):
    matvec = HessianOperator(model, x, y)
    shapes = matvec.shapes
    n = sum(math.prod(s) for s in shapes)
    flat = spectrum._FlatOperator(matvec, shapes)
    hessian = np.stack([flat(e) for e in np.eye(n)], axis=1)
    return 0.5 * (hessian + hessian.T)


def test_logs_reach_fit_history_and_csv_logger(tmp_path):
    # fit() appends its History after the given callbacks, so it sees
    # what the monitor wrote; a CSVLogger must come after the monitor.
    path = str(tmp_path / "log.csv")
    monitor = _monitor()
    csv_logger = keras.callbacks.CSVLogger(path)
    _, history = _fit(monitor, epochs=2, extra_callbacks=[csv_logger])
    for key in KEYS:
        assert key in history.history, sorted(history.history)
        assert len(history.history[key]) == 2
        assert all(math.isfinite(v) for v in history.history[key])
        assert history.history[key] == monitor.history[key[10:]]
    assert len(history.history["loss"]) == 2
    assert monitor.history["epoch"] == [0, 1]
    assert all(v > 0 for v in history.history["curvature_trace_std_error"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in KEYS:
        assert key in rows[0], list(rows[0])
        values = [float(row[key]) for row in rows]
        np.testing.assert_allclose(values, history.history[key], rtol=1e-6)


def test_values_match_spectrum_functions_and_exact_trace():
    monitor = _monitor(trace_samples=40, eigen_iters=30, seed=5)
    model, history = _fit(monitor, epochs=1)
    x, y = _probe()
    # The measurement (call index 0: seed 5 + 0) is at the final weights.
    seed = 5
    matvec = HessianOperator(model, x, y)
    shapes = matvec.shapes
    trace, std_error = spectrum.hutchinson_trace(
        matvec, shapes, samples=40, seed=seed
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    np.testing.assert_allclose(logs["curvature_trace"], trace, rtol=1e-5)
    np.testing.assert_allclose(
        logs["curvature_trace_std_error"], std_error, rtol=1e-4
    )
    hutchpp = keras_seht.hessian_trace_hutchpp(
        model, x, y, samples=9, seed=seed
    )
    np.testing.assert_allclose(
        logs["curvature_trace_hutchpp"], hutchpp, rtol=1e-5
    )
    # The same 30 iterations as the monitor's (converged or not: the
    # monitor runs them silently, the public function warns).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum.ConvergenceWarning)
        top = keras_seht.hessian_top_eigenvalue(
            model, x, y, iters=30, seed=seed
        )
    np.testing.assert_allclose(logs["curvature_top_eigenvalue"], top, rtol=1e-5)

    # Against the exact values: the trace within 5 reported standard
    # errors, the eigenvalue close to the dense Hessian's top one.
    exact = keras_seht.exact_hessian_trace(model, x, y)
    assert abs(logs["curvature_trace"] - exact) <= 5 * std_error + 1e-4
    eigenvalues = np.linalg.eigvalsh(_dense_hessian(model, x, y))
    np.testing.assert_allclose(np.sum(eigenvalues), exact, rtol=1e-4)
    lam = eigenvalues[np.argmax(np.abs(eigenvalues))]
    assert abs(logs["curvature_top_eigenvalue"]) <= abs(lam) * (1 + 1e-4)
    np.testing.assert_allclose(logs["curvature_top_eigenvalue"], lam, rtol=0.05)


def test_every_writes_nan_on_skipped_epochs(tmp_path, capsys):
    path = str(tmp_path / "log.csv")
    monitor = _monitor(every=2, hutchpp_samples=0, verbose=1)
    _, history = _fit(
        monitor, epochs=3, extra_callbacks=[keras.callbacks.CSVLogger(path)]
    )
    # Epochs 0 and 2 are not measured: NaN, so the lists stay aligned.
    trace = history.history["curvature_trace"]
    assert len(trace) == 3
    assert math.isnan(trace[0]) and math.isnan(trace[2])
    assert math.isfinite(trace[1])
    assert "curvature_trace_hutchpp" not in history.history
    assert monitor.history["epoch"] == [1]
    assert monitor.history["trace"] == [trace[1]]
    assert "Epoch 2: CurvatureMonitor trace=" in capsys.readouterr().out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    keys = [k for k in KEYS if k != "curvature_trace_hutchpp"]
    for key in keys:
        values = [float(row[key]) for row in rows]
        np.testing.assert_allclose(
            values, history.history[key], rtol=1e-6, equal_nan=True
        )


def test_batch_unit():
    monitor = _monitor(unit="batch", every=3)
    seen = {}

    def record(batch, logs):
        seen[len(seen)] = {k: v for k, v in logs.items() if k in KEYS}

    after = keras.callbacks.LambdaCallback(on_train_batch_end=record)
    # 32 samples / batch 8 = 4 steps per epoch, 8 steps in all.
    _, history = _fit(monitor, epochs=2, extra_callbacks=[after], batch_size=8)
    assert monitor.history["step"] == [2, 5]
    assert len(monitor.history["trace"]) == 2
    assert [step for step, logs in seen.items() if logs] == [2, 5]
    assert sorted(seen[2]) == sorted(KEYS)
    assert seen[5]["curvature_trace"] == monitor.history["trace"][1]
    assert not any(key in history.history for key in KEYS)


def test_deterministic():
    monitors = [_monitor(), _monitor()]
    runs = [_fit(m, epochs=2) for m in monitors]
    for key in KEYS:
        assert runs[0][1].history[key] == runs[1][1].history[key]
    # Measurement i uses seed + i: the second one repeats with seed 1.
    model = runs[0][0]
    other = _monitor(seed=1)
    other.set_model(model)
    assert other.measure() == {
        k[10:]: v[1] for k, v in runs[0][1].history.items() if k in KEYS
    }
    assert other.measure()["trace"] != runs[0][1].history[KEYS[0]][1]


def test_model_state_unchanged():
    def build():
        keras.utils.set_random_seed(3)
        model = keras_seht.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.BatchNormalization(),
                keras.layers.Dropout(0.3),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        return compile_plain(model, optimizer="adam")

    x, y = make_data(n=32)
    results = []
    # Batch mode, training-mode loss (Dropout on): measured mid-epoch.
    monitor = _monitor(training=True, unit="batch", every=3)
    for monitor in (None, monitor):
        model = build()
        callbacks = [monitor] if monitor is not None else []
        history = model.fit(
            x, y, epochs=2, batch_size=8, callbacks=callbacks, verbose=0
        )
        results.append((model, history.history["loss"]))
    assert monitor.history["step"] == [2, 5]
    (plain, plain_loss), (monitored, monitored_loss) = results
    assert plain_loss == monitored_loss
    for a, b in zip(plain.weights, monitored.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    for a, b in zip(plain.optimizer.variables, monitored.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(every=0), "every"),
        (dict(every=1.5), "every"),
        (dict(unit="step"), "unit"),
        (dict(trace_samples=-1), "trace_samples"),
        (dict(hutchpp_samples=2.0), "hutchpp_samples"),
        (dict(eigen_iters=True), "eigen_iters"),
        (dict(trace_samples=0, hutchpp_samples=0, eigen_iters=0), "at least"),
        (dict(seed=-1), "seed"),
        (dict(seed="0"), "seed"),
        (dict(training="yes"), "training"),
        (dict(prefix=None), "prefix"),
        (dict(verbose=2), "verbose"),
    ],
)
def test_bad_arguments(kwargs, name):
    x, y = _probe()
    with pytest.raises(ValueError, match=f"(?i){name}"):
        CurvatureMonitor(x, y, **kwargs)
    with pytest.raises(ValueError, match="`x`"):
        CurvatureMonitor(None, y)


def test_plot_curvature(tmp_path):
    nan = float("nan")
    run_a = keras.callbacks.History()
    run_a.epoch = [0, 1, 2]
    run_a.history = {
        "loss": [1.0, 0.8, 0.7],
        "curvature_trace": [3.0, nan, 5.0],
        "curvature_trace_std_error": [0.5, nan, 0.4],
        "curvature_top_eigenvalue": [1.0, nan, 1.5],
    }
    run_b = {"curvature_trace": [2.0, 2.5], "curvature_top_eigenvalue": [1, 2]}
    x, y = _probe()
    run_c = CurvatureMonitor(x, y, unit="batch")
    run_c.history = {"step": [3, 7], "trace": [1.0, 2.0]}
    path = str(tmp_path / "curvature.png")
    out = plot_curvature(
        {"a": run_a, "b": run_b, "c": run_c, "d": run_c.history},
        path,
        title="two runs",
    )
    assert out == path
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curvature.png"]

    with pytest.raises(ValueError, match="curvature_nope"):
        plot_curvature({"a": run_a}, path, keys=["curvature_nope"])
    with pytest.raises(ValueError, match="histories"):
        plot_curvature({}, path)


def test_plot_curvature_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_curvature(
            {"a": {"curvature_trace": [1.0]}},
            str(tmp_path / "x.png"),
            keys="curvature_trace",
        )
