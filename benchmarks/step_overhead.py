"""Cost of a SEHT training step relative to a plain Keras step.

On the current Keras backend (``KERAS_BACKEND``), for a CIFAR-shaped
ResNet-18 (``resnet18_cifar``, reduced width for CPU, batch 32) and a
2-layer LSTM language model (batch 20, BPTT 35), trains the same model on
the same batches with plain Keras (``seht=None``), exact SEHT-D(p=0.01),
SEHT-D(p=0.05), SEHT-H(max_iter=1), SEHT-H(max_iter=5), and SEHT-H(1)
with the two opt-in smoothed methods (``finite_difference``,
``antithetic``).

Time: after a warm-up, blocks of ``--steps`` ``train_on_batch`` calls of
each method are interleaved (the order rotating each repeat) for
``--repeats`` rounds; a method's ratio is its **mean** step time over all
its steps divided by plain Keras' (SEHT-D's cost depends on which layers
each step draws, so the mean over many steps is its expected cost; the
median is reported too). Only ratios are reported: absolute times on a
shared machine mean nothing. On JAX, a SEHT-D model's compiled step
variants (`keras_seht.backend.jax.SparseTrainStep`) are all compiled in
the warm-up, as plain Keras' step is.

Memory: each method runs again in a fresh process: the peak extra memory
of a few steps over the memory right after the model is built (CUDA:
``torch.cuda.max_memory_allocated``; otherwise the peak resident set
size, ``VmHWM``, reset after the build), as a ratio to plain Keras' extra
memory.

    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --models resnet --steps 10 --repeats 2

Prints a table and writes ``benchmarks/results/step_overhead_<backend>.json``
(atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

#: name -> keyword arguments of the estimator (None: plain Keras).
METHODS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "plain": None,
    "SEHT-D(p=0.01)": ("SEHTD", {"p": 0.01}),
    "SEHT-D(p=0.05)": ("SEHTD", {"p": 0.05}),
    "SEHT-H(1)": ("SEHTH", {"max_iter": 1}),
    "SEHT-H(5)": ("SEHTH", {"max_iter": 5}),
    "SEHT-H(1) finite_difference": (
        "SEHTH",
        {"max_iter": 1, "method": "finite_difference"},
    ),
    "SEHT-H(1) antithetic": ("SEHTH", {"max_iter": 1, "method": "antithetic"}),
    "SAM(rho=0.05)": ("SAM", {"rho": 0.05}),
    "ASAM(rho=0.5)": ("ASAM", {"rho": 0.5}),
    "GNP finite_difference": (
        "GradientNorm",
        {"method": "finite_difference", "strength": 1e-3},
    ),
}
#: The ResNet targets (mean time ratio, CPU) of issue 20, on every backend
#: (the smoothed methods' and SAM's from issues 8 and 21).
TARGETS = {
    "SEHT-D(p=0.01)": 1.7,
    "SEHT-D(p=0.05)": 2.7,
    "SEHT-H(1)": 4.0,
    "SEHT-H(5)": 12.0,
    "SEHT-H(1) finite_difference": 3.2,
    "SEHT-H(1) antithetic": 2.2,
    "SAM(rho=0.05)": 2.1,
    "ASAM(rho=0.5)": 2.1,
}
#: Issue 20's memory target (peak extra memory ratio) for SEHT-H(1).
MEMORY_TARGETS = {"SEHT-H(1)": 2.5}
#: The paper's reported step-time ratios (GPU; trace detached there).
PAPER = {"SEHT-D(p=0.01)": "1.2x", "SEHT-D(p=0.05)": "1.3x-1.5x"}
MODELS = ("resnet", "lstm")


def _estimator(method: str) -> Any:
    import keras_seht

    spec = METHODS[method]
    if spec is None:
        return None
    name, kwargs = spec
    cls = getattr(keras_seht, name, None) or getattr(
        keras_seht.regularizers, name
    )
    if name.startswith("SEHT"):
        kwargs = {"strength": 1e-3, **kwargs}
    return cls(**kwargs)


def _setup(
    model_name: str, args: argparse.Namespace
) -> tuple[Callable[[Any], Any], list[tuple[Any, Any]]]:
    """(build(seht) -> compiled model, batches) for one benchmark model."""
    import keras
    import numpy as np

    from keras_seht.applications import resnet18_cifar, rnn_language_model
    from keras_seht.losses import SparseCategoricalCrossentropy

    rng = np.random.default_rng(0)
    if model_name == "resnet":
        batches = [
            (
                rng.normal(size=(args.batch, 32, 32, 3)).astype("float32"),
                rng.integers(0, 10, size=args.batch).astype("int32"),
            )
            for _ in range(4)
        ]

        def make() -> Any:
            return resnet18_cifar(10, width=args.width, seed=0)

    else:
        batches = []
        for _ in range(4):
            ids = rng.integers(0, args.vocab, size=(args.lm_batch, 36))
            batches.append((ids[:, :-1], ids[:, 1:]))

        def make() -> Any:
            return rnn_language_model(
                args.vocab,
                embed_dim=args.units,
                units=args.units,
                layers=2,
                seed=0,
            )

    def build(seht: Any) -> Any:
        keras.utils.set_random_seed(0)
        model = make()
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=SparseCategoricalCrossentropy(from_logits=True),
            seht=seht,
        )
        return model

    return build, batches


def _describe(model_name: str, args: argparse.Namespace) -> str:
    if model_name == "resnet":
        return f"resnet18_cifar(width={args.width}), batch {args.batch}"
    return (
        f"2-layer LSTM LM (vocab {args.vocab}, {args.units} units), "
        f"batch {args.lm_batch}, BPTT 35"
    )


def measure_time(
    model_name: str, methods: list[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Interleaved step times: {method: {mean, median}} ratios to plain.

    Under JAX, a SEHT-D method also gets ``variants``: for each compiled
    step variant, its number of steps and its mean step time over plain
    Keras' mean.
    """
    build, batches = _setup(model_name, args)
    models = {m: build(_estimator(m)) for m in methods}
    for m, model in models.items():
        for i in range(args.warmup):
            model.train_on_batch(*batches[i % len(batches)])
        variants = getattr(model, "seht_sparse_step", None)
        if variants is not None:
            # JAX SEHT-D: compile every step variant now, not in a timed
            # step (train_on_batch passes (x, y, sample_weight)).
            variants.precompile((*batches[0], None))
        print(f"  warmed up {m}", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    blocks: dict[str, list[float]] = {m: [] for m in methods}
    # JAX SEHT-D: the step times of each compiled variant.
    by_variant: dict[str, dict[str, list[float]]] = {}
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            variants = getattr(models[m], "seht_sparse_step", None)
            start = time.perf_counter()
            for s in range(args.steps):
                counts = dict(variants.counts) if variants else {}
                step = time.perf_counter()
                models[m].train_on_batch(*batches[s % len(batches)])
                times[m].append(time.perf_counter() - step)
                if variants:
                    (name,) = [
                        k
                        for k, n in variants.counts.items()
                        if n != counts.get(k, 0)
                    ]
                    by_variant.setdefault(m, {}).setdefault(name, [])
                    by_variant[m][name].append(times[m][-1])
            blocks[m].append(time.perf_counter() - start)
        print(
            f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True
        )
    plain_mean = statistics.fmean(times["plain"])
    plain_median = statistics.median(times["plain"])
    result: dict[str, dict[str, Any]] = {
        m: {
            "mean": statistics.fmean(times[m]) / plain_mean,
            "median": statistics.median(times[m]) / plain_median,
            "block_ratios": [b / p for b, p in zip(blocks[m], blocks["plain"])],
        }
        for m in methods
    }
    for m, named in by_variant.items():
        result[m]["variants"] = {
            name: {
                "steps": len(steps),
                "mean": statistics.fmean(steps) / plain_mean,
            }
            for name, steps in named.items()
        }
    return result


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0).

    The peak then counts only what follows. (``ru_maxrss`` cannot be reset,
    and survives the exec of a child process from a large parent.)
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_memory(
    model_name: str, method: str, args: argparse.Namespace
) -> float:
    """Peak extra memory (bytes) of a few steps (run in a fresh process)."""
    import keras

    build, batches = _setup(model_name, args)
    model = build(_estimator(method))
    cuda = keras.config.backend() == "torch" and _torch_cuda()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    for i in range(args.memory_steps):
        model.train_on_batch(*batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    return float(_status_bytes("VmHWM") - before)


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    import keras

    if keras.config.backend() == "torch" and _torch_cuda():
        import torch

        return torch.cuda.get_device_name(0)
    if keras.config.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thr)"


def _child(args: argparse.Namespace) -> None:
    bytes_ = measure_memory(args.model_child, args.method_child, args)
    print("RESULT" + json.dumps(bytes_))


def _memory_ratios(
    model_name: str, methods: list[str], argv: list[str]
) -> dict[str, float]:
    extra = {}
    for m in methods:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                *argv,
                "--model-child",
                model_name,
                "--method-child",
                m,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"memory run {model_name}/{m} failed:\n{proc.stderr}")
        line = next(
            ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")
        )
        extra[m] = json.loads(line[len("RESULT") :])
        print(f"  memory {m}: {extra[m] / 2**20:.0f} MiB", file=sys.stderr)
    return {m: extra[m] / max(extra["plain"], 1.0) for m in methods}


def _write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp"
    ) as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)


def table(results: dict[str, Any]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | method | time (mean) | time (median) | peak memory "
        "| target | paper |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model_name, res in results["models"].items():
        for m, r in res["time"].items():
            mem = res.get("memory", {}).get(m)
            target = TARGETS.get(m) if model_name == "resnet" else None
            lines.append(
                f"| {model_name} | {m} | {r['mean']:.2f}x | "
                f"{r['median']:.2f}x | "
                + (f"{mem:.2f}x" if mem is not None else "-")
                + f" | {f'<= {target}x' if target else '-'} | "
                + f"{PAPER.get(m, '-')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the benchmark; returns its results (None in a child process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--lm-batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--model-child", help=argparse.SUPPRESS)
    parser.add_argument("--method-child", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.model_child:
        _child(args)
        return None

    import keras

    backend = keras.config.backend()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "plain" not in methods:
        parser.error(
            f"--methods must include 'plain' and name only {list(METHODS)}; "
            f"got {methods}"
        )
    results: dict[str, Any] = {
        "backend": backend,
        "device": _device(),
        "setup": {
            "steps_per_block": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "strength": 1e-3,
            "statistic": "mean (and median) step time / plain Keras', "
            "interleaved blocks; memory: peak extra over the built model",
        },
        "models": {},
    }
    for model_name in args.models.split(","):
        print(f"{_describe(model_name, args)} ...", file=sys.stderr)
        res: dict[str, Any] = {
            "description": _describe(model_name, args),
            "time": measure_time(model_name, methods, args),
        }
        if not args.no_memory:
            res["memory"] = _memory_ratios(model_name, methods, argv)
        results["models"][model_name] = res
    output = pathlib.Path(
        args.output
        or pathlib.Path(__file__).parent
        / "results"
        / f"step_overhead_{backend}.json"
    )
    _write_json(output, results)
    print(f"\n{backend} on {results['device']}")
    for model_name, res in results["models"].items():
        print(f"{model_name}: {res['description']}")
    print(table(results))
    print(f"\nWrote {output}")
    return results


if __name__ == "__main__":
    main()
