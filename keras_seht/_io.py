"""Atomic file writes (and figures).

Shared by the demo, the plots and the benchmarks. Under data-parallel
training (`keras_seht.distributed`) only the chief (rank 0) writes: the
other workers' writes are no-ops, so that the workers, which hold the
same weights and logs, do not race for the same files.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file, then renames it to `path`.

    The temporary file is in the folder of `path`: readers never see a
    half-written file. The file gets the mode a plain ``open(path, "w")``
    would give it (0666 less the umask), not `tempfile.mkstemp`'s 0600.
    A worker other than the chief (`keras_seht.distributed.is_chief`)
    writes nothing.
    """
    from keras_seht.distributed import is_chief

    if not is_chief():
        return
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process' umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_figure(fig: Any, path: str, dpi: int = 90) -> None:
    """Saves a matplotlib figure as a PNG atomically, then closes it."""
    import matplotlib.pyplot as plt

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=dpi)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON atomically (NaN allowed)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, allow_nan=True)
            f.write("\n")

    atomic_write(path, write)


def write_npz(path: str, *arrays: Any, **named: Any) -> None:
    """Writes arrays with `numpy.savez` atomically.

    Positional ones are saved as ``arr_0``, ``arr_1``, ...
    """
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, *arrays, **named)

    atomic_write(path, write)
