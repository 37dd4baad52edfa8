"""Time of a SEHT training step relative to a plain Keras step.

For each Keras backend (one subprocess each, since the backend is fixed at
import), the same model and data are trained with plain Keras
(``seht=None``), SEHT-D(p=0.01) and SEHT-H(max_iter=1). Epochs of the
three are interleaved, repeated, and the median epoch time of each is
divided by the plain one's, so machine load affects all alike. Absolute
times are not reported: on a shared machine only the ratios mean anything.

    python benchmarks/step_time.py                   # all backends
    python benchmarks/step_time.py --backends jax --repeats 7

Writes ``benchmarks/results/step_time.json`` (atomically) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

BACKENDS = ("torch", "jax", "tensorflow")
METHODS = ("plain", "SEHT-D(p=0.01)", "SEHT-H(max_iter=1)")


def _measure(args: argparse.Namespace) -> dict[str, float]:
    """Runs in the child process, under its KERAS_BACKEND."""
    import time

    import keras
    import numpy as np

    import keras_seht

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 64)).astype("float32")
    y = rng.integers(0, 10, size=args.samples).astype("int32")

    def build(seht):
        keras.utils.set_random_seed(0)
        model = keras_seht.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            seht=seht,
        )
        return model

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: jit_compile turned off
        models = {
            "plain": build(None),
            "SEHT-D(p=0.01)": build(keras_seht.SEHTD(p=0.01)),
            "SEHT-H(max_iter=1)": build(keras_seht.SEHTH()),
        }
    fit_kwargs = dict(batch_size=args.batch_size, epochs=1, verbose=0)
    for model in models.values():  # warm-up: compile/trace
        model.fit(x, y, **fit_kwargs)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, **fit_kwargs)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    return {name: statistics.median(t) / base for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark, one backend per child process; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument(
        "--output",
        default=str(
            pathlib.Path(__file__).parent / "results" / "step_time.json"
        ),
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("RESULT" + json.dumps(_measure(args)))
        return

    results = {}
    for backend in args.backends.split(","):
        print(f"measuring {backend} ...", flush=True)
        child = [a for a in (argv or sys.argv[1:]) if a != "--child"]
        proc = subprocess.run(
            [sys.executable, __file__, "--child", *child],
            env=dict(os.environ, KERAS_BACKEND=backend),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        line = next(
            ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")
        )
        results[backend] = json.loads(line[len("RESULT") :])

    setup = {
        "model": f"MLP 64-{args.width}-{args.width}-10 (ReLU), SGD momentum",
        "batch_size": args.batch_size,
        "steps_per_epoch": -(-args.samples // args.batch_size),
        "repeats": args.repeats,
        "statistic": "median epoch time / median plain Keras epoch time",
    }
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=output.parent, delete=False, suffix=".tmp"
    ) as f:
        json.dump({"setup": setup, "ratios": results}, f, indent=2)
    os.replace(f.name, output)

    print(f"\n{setup['model']}, batch {args.batch_size}: step time ratio")
    print("| backend | " + " | ".join(METHODS) + " |")
    print("|---|" + "---:|" * len(METHODS))
    for backend, ratios in results.items():
        cells = " | ".join(f"{ratios[m]:.2f}x" for m in METHODS)
        print(f"| {backend} | {cells} |")
    print(f"\nWrote {output}")


if __name__ == "__main__":
    main()
