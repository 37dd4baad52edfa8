"""Plots of curvature logs (`keras_seht.callbacks.monitor.CurvatureMonitor`).

matplotlib is an optional dependency: it is imported, with the
non-interactive Agg backend, only when a function here runs.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from keras_seht._io import save_figure
from keras_seht.callbacks.monitor import KEYS as _MONITOR_KEYS

_INDEX_KEYS = ("epoch", "step")


def _as_series(run: str, history: Any) -> tuple[dict[str, Any], str, Any]:
    """(dict of lists, name of the x axis, x values or None) of one run."""
    prefix = None
    epochs = None
    if isinstance(history, Mapping):
        data = history
    elif isinstance(getattr(history, "history", None), Mapping):
        # keras.callbacks.History (with .epoch) or a CurvatureMonitor
        # (with .prefix).
        data = history.history
        prefix = getattr(history, "prefix", None)
        epochs = getattr(history, "epoch", None)
    else:
        raise ValueError(
            f"`histories[{run!r}]` must be a keras.callbacks.History, a "
            "History.history dict or a CurvatureMonitor (or its `history` "
            f"dict). Received: {type(history).__name__}"
        )
    data = dict(data)
    if prefix:  # A CurvatureMonitor: its keys carry no prefix.
        data.update({prefix + k: v for k, v in list(data.items())})
    for index in _INDEX_KEYS:
        if index in data:
            return data, index, data[index]
    return data, "epoch", epochs


def _lookup(data: dict[str, Any], key: str) -> Any:
    """``data[key]``, or the monitor key that ``key`` ends with."""
    if key in data:
        return data[key]
    if any(index in data for index in _INDEX_KEYS):
        # A CurvatureMonitor's history: "curvature_trace" -> "trace".
        matches = [k for k in _MONITOR_KEYS if key.endswith(k) and k in data]
        if matches:
            return data[max(matches, key=len)]
    return None


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(y)
    return x[keep], y[keep]


def plot_curvature(
    histories: Mapping[str, Any],
    path: str | os.PathLike,
    keys: Sequence[str] | str = (
        "curvature_trace",
        "curvature_top_eigenvalue",
    ),
    title: str | None = None,
) -> str:
    """Plots curvature logs of several runs into one PNG.

    One panel per key, one line per run, against the epoch (1-based:
    the number of epochs done) or, for a ``CurvatureMonitor`` with
    ``unit="batch"``, the training step (1-based). NaN and infinite
    values (epochs a monitor skipped) are left out. When a run also has
    ``{key}_std_error`` (the Hutchinson trace's standard error), a band
    of two standard errors around its line is shaded.

    Args:
        histories: ``{label: history}``, where a history is a
            ``keras.callbacks.History`` (what ``fit`` returns), its
            ``.history`` dict, a ``CurvatureMonitor`` or its
            ``.history`` dict. A monitor's own keys have no prefix; they
            are found from the prefixed ``keys``.
        path: Where to write the PNG (written atomically: a temporary
            file in the same folder, then renamed).
        keys: The logged quantities to plot, one panel each. A run
            without a key is left out of that panel; a key that no run
            has is an error.
        title: The figure's title.

    Returns:
        ``path``, as a string.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: Bad ``histories`` or ``keys``.
    """
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError(
            "`histories` must be a non-empty dict {label: history}. "
            f"Received: {histories!r}"
        )
    if isinstance(keys, str):
        keys = (keys,)
    keys = list(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            f"`keys` must be a non-empty list of strings. Received: {keys!r}"
        )
    path = os.fspath(path)
    runs = {
        str(label): _as_series(str(label), h) for label, h in histories.items()
    }
    for key in keys:
        if all(_lookup(data, key) is None for data, _, _ in runs.values()):
            available = sorted(
                {k for data, _, _ in runs.values() for k in data}
            )
            raise ValueError(
                f"No history has the key {key!r}. Available keys: {available}"
            )

    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "`plot_curvature` needs matplotlib: `pip install matplotlib`."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False
    )
    for ax, key in zip(axes[0], keys):
        x_names = set()
        for i, (label, (data, x_name, x_values)) in enumerate(runs.items()):
            values = _lookup(data, key)
            if values is None:
                continue
            y = np.asarray(values, dtype="float64").reshape(-1)
            if x_values is not None and len(x_values) == len(y):
                x = np.asarray(x_values, dtype="float64") + 1.0
            else:
                x = np.arange(1, len(y) + 1, dtype="float64")
            x_names.add(x_name)
            color = f"C{i % 10}"
            xs, ys = _finite(x, y)
            ax.plot(xs, ys, color=color, marker="o", markersize=3, label=label)
            errors = _lookup(data, key + "_std_error")
            if errors is not None and len(errors) == len(y):
                err = np.asarray(errors, dtype="float64").reshape(-1)
                keep = np.isfinite(y) & np.isfinite(err)
                ax.fill_between(
                    x[keep],
                    (y - 2 * err)[keep],
                    (y + 2 * err)[keep],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(" / ".join(sorted(x_names)) or "epoch")
        if ax.has_data():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title is not None:
        fig.suptitle(str(title))
    fig.tight_layout()
    save_figure(fig, path)
    return path


__all__ = ["plot_curvature"]
