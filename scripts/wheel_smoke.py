"""Smoke test of an installed keras-seht wheel, run by wheel_check.sh.

Run it with the interpreter of the environment the wheel went into, from
outside the source tree (``python -I``), once per ``KERAS_BACKEND``. It
fails (exit 1, with a message) unless

- ``keras_seht`` is imported from that environment, not from a checkout,
  and its ``__version__`` and its installed metadata are ``--version``;
- the Keras backend is the one ``KERAS_BACKEND`` names, and that
  backend's package meets the wheel's requirement for its extra (e.g.
  ``torch>=2.3`` for ``keras-seht[torch]``), as do Keras and NumPy;
- one SEHT training step (``model.fit`` on one batch, ``SEHTD(p=0.5)``)
  gives a finite loss and a finite ``seht_trace``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import pathlib
import sys


def fail(message: str) -> None:
    """Exits with the failure `message`."""
    sys.exit(f"wheel smoke test failed: {message}")


def check_requirements(backend: str) -> list[str]:
    """The wheel's core requirements and its ``backend`` extra's, as met.

    Each is checked against the versions importable here.
    """
    from packaging.requirements import Requirement

    met = []
    for line in importlib.metadata.requires("keras-seht") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": backend}):
            continue
        # The extra names the backend's package; import it rather than
        # asking for its distribution (tensorflow-cpu provides tensorflow).
        module = importlib.import_module(requirement.name)
        version = getattr(module, "__version__", None)
        if version is None:
            version = importlib.metadata.version(requirement.name)
        if not requirement.specifier.contains(version, prereleases=True):
            fail(f"{requirement} is required, {version} is installed")
        met.append(f"{requirement.name} {version}")
    return met


def train_one_step() -> tuple[float, float]:
    """Loss and seht_trace of one SEHT training step on random data."""
    import keras
    import numpy as np

    import keras_seht

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras_seht.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        optimizer="sgd",
        loss="sparse_categorical_crossentropy",
        seht=keras_seht.SEHTD(p=0.5),
    )
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return history.history["loss"][-1], history.history["seht_trace"][-1]


def main() -> None:
    """Checks the installed wheel: its location, backend and a SEHT step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="expected version")
    args = parser.parse_args()
    backend = os.environ.get("KERAS_BACKEND")
    if not backend:
        fail("KERAS_BACKEND is not set")

    import keras_seht

    location = pathlib.Path(keras_seht.__file__).resolve()
    prefix = pathlib.Path(sys.prefix).resolve()
    if prefix not in location.parents:
        fail(f"keras_seht comes from {location}, not from {prefix}")
    installed = importlib.metadata.version("keras-seht")
    if keras_seht.__version__ != args.version or installed != args.version:
        fail(
            f"version {keras_seht.__version__} (metadata {installed}), "
            f"expected {args.version}"
        )
    import keras

    if keras.config.backend() != backend:
        fail(f"Keras backend {keras.config.backend()}, expected {backend}")
    met = check_requirements(backend)
    loss, trace = train_one_step()
    if not (math.isfinite(loss) and math.isfinite(trace)):
        fail(f"loss {loss}, seht_trace {trace}: not finite")
    print(
        f"{backend}: keras_seht {installed} from {location.parent}; "
        f"{', '.join(met)}; one SEHT step: loss {loss:.4f}, "
        f"seht_trace {trace:.4f}"
    )


if __name__ == "__main__":
    main()
