"""Runs Keras' own model tests against keras_seht.Model and Sequential.

keras_seht.Model and keras_seht.Sequential claim to be drop-in
replacements for keras.Model and keras.Sequential. This script holds them
to Keras' own tests: ``keras/src/models/model_test.py`` and
``keras/src/models/sequential_test.py``, as shipped in the installed keras
wheel, run twice under the same backend (KERAS_BACKEND, torch by
default), each in its own pytest process:

1. as shipped (plain Keras), then
2. with the names ``Model`` and ``Sequential`` that those test modules
   import (``from keras.src.models.model import Model``) rebound to
   keras_seht.Model and keras_seht.Sequential.

A test that passes in run 1 but does not pass in run 2 fails the job (exit
status 1). Tests that fail or are skipped with plain Keras on this machine
are reported, not required to pass. About a minute on one core (torch).

    KERAS_BACKEND=torch .venv/bin/python scripts/keras_suite.py [pytest args]

Extra arguments go to both pytest runs (e.g. ``-k quantize``).

The same file is the pytest plugin of run 2 (``-p keras_suite
--seht-swap``): after collection it rebinds the names in the collected test
modules. The tests look the names up when they run, so classes they
define inside test functions (``class MyModel(Model)``) derive from
keras_seht.Model too; a test module defining such a class at import time
would escape the swap, so the plugin refuses to run one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

#: The test files of the installed keras, relative to its package folder.
KERAS_TESTS = ("src/models/model_test.py", "src/models/sequential_test.py")

#: Test-module global names rebound in run 2, to keras_seht's classes.
SWAPPED_NAMES = ("Model", "Sequential")

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent

Outcomes = dict[str, str]


# --- The pytest plugin (run 2) ---------------------------------------------


def pytest_addoption(parser: Any) -> None:
    """Adds ``--seht-swap`` (run with keras_seht's classes)."""
    parser.addoption(
        "--seht-swap",
        action="store_true",
        help="rebind the test modules' Model/Sequential to keras_seht's",
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Rebinds ``Model``/``Sequential`` in every collected test module."""
    if not config.getoption("seht_swap"):
        return
    import keras

    import keras_seht

    ours = {"Model": keras_seht.Model, "Sequential": keras_seht.Sequential}
    theirs = {"Model": keras.Model, "Sequential": keras.Sequential}
    modules: dict[int, Any] = {}
    for item in items:
        module = getattr(item, "module", None)  # None: not a Python test
        if module is not None:
            modules[id(module)] = module
    for module in modules.values():
        _check_no_import_time_subclasses(module, tuple(theirs.values()))
        swapped = []
        for name in SWAPPED_NAMES:
            value = getattr(module, name, None)
            if value is None:
                continue
            if value is not theirs[name]:
                raise RuntimeError(
                    f"{module.__name__}.{name} is {value!r}, not "
                    f"keras.{name}: Keras changed its tests; update "
                    "scripts/keras_suite.py."
                )
            setattr(module, name, ours[name])
            swapped.append(name)
        if not swapped:
            raise RuntimeError(
                f"{module.__name__} has none of {list(SWAPPED_NAMES)}: Keras "
                "changed its tests; update scripts/keras_suite.py."
            )


def _check_no_import_time_subclasses(
    module: Any, bases: tuple[type, ...]
) -> None:
    """Refuses a module that subclassed keras.Model when it was imported."""
    for name, value in vars(module).items():
        if (
            isinstance(value, type)
            and issubclass(value, bases)
            and value not in bases
            and value.__module__ == module.__name__
        ):
            raise RuntimeError(
                f"{module.__name__}.{name} subclasses a Keras model at import "
                "time, before the swap: update scripts/keras_suite.py."
            )


# --- The driver ------------------------------------------------------------


def keras_test_files() -> list[pathlib.Path]:
    """The installed keras's model tests (without importing keras)."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("keras is not installed")
    package = pathlib.Path(list(spec.submodule_search_locations)[0])
    files = [package / name for name in KERAS_TESTS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"The keras wheel lacks its tests: {missing}")
    return files


def run_pytest(
    files: list[pathlib.Path],
    workdir: pathlib.Path,
    label: str,
    swap: bool,
    extra: list[str],
) -> tuple[int, Outcomes, float]:
    """Runs pytest on `files` once; returns its exit code and outcomes."""
    report = workdir / f"{label}.xml"
    config = workdir / "pytest.ini"
    config.write_text("[pytest]\n")  # neither ours nor any other settings
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(config),
        "--rootdir",  # test ids relative to the keras package
        str(files[0].parents[2]),
        "-p",
        "no:cacheprovider",
        "-p",
        "keras_suite",
        f"--basetemp={workdir / ('tmp-' + label)}",
        f"--junitxml={report}",
        "--disable-warnings",
        "--tb=short",
        "-q",
        "-rfE",
        *(["--seht-swap"] if swap else []),
        *extra,
        *map(str, files),
    ]
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "torch")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = [str(SCRIPTS), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    start = time.monotonic()
    result = subprocess.run(
        args, cwd=workdir, env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - start
    outcomes = read_junit(report) if report.exists() else {}
    if result.returncode not in (0, 1) or not outcomes:
        # Not a test failure (usage error, crash, nothing collected).
        sys.stdout.write(result.stdout + result.stderr)
    elif swap:
        sys.stdout.write(result.stdout)
    return result.returncode, outcomes, elapsed


def read_junit(path: pathlib.Path) -> Outcomes:
    """Each test's outcome in a JUnit XML report, by test id."""
    outcomes: Outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                break
        if outcomes.get(test_id, "passed") == "passed":
            outcomes[test_id] = outcome  # a teardown error counts too
    return outcomes


def regressions(plain: Outcomes, ours: Outcomes) -> list[str]:
    """Tests that pass with plain Keras but not with keras_seht's classes.

    Example:
    >>> regressions({"a": "passed", "b": "failed", "c": "passed"},
    ...             {"a": "failed", "b": "failed"})
    ['a: failed', 'c: missing']
    """
    return [
        f"{test}: {ours.get(test, 'missing')}"
        for test, outcome in sorted(plain.items())
        if outcome == "passed" and ours.get(test) != "passed"
    ]


def _counts(outcomes: Outcomes) -> str:
    kinds = ("passed", "failed", "error", "skipped")
    counts = [list(outcomes.values()).count(kind) for kind in kinds]
    return ", ".join(f"{n} {kind}" for n, kind in zip(counts, kinds) if n)


def main(argv: list[str] | None = None) -> int:
    """Runs both suites, prints the comparison; 1 on a regression."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments are passed on to both pytest runs.",
    )
    _, extra = parser.parse_known_args(argv)
    files = keras_test_files()
    backend = os.environ.get("KERAS_BACKEND", "torch")
    with tempfile.TemporaryDirectory(prefix="keras_suite_") as tmp:
        workdir = pathlib.Path(tmp)
        rc_plain, plain, t_plain = run_pytest(
            files, workdir, "plain", swap=False, extra=extra
        )
        rc_ours, ours, t_ours = run_pytest(
            files, workdir, "seht", swap=True, extra=extra
        )
    print(f"Keras' model tests under KERAS_BACKEND={backend}:")
    print(f"  plain Keras:          {_counts(plain)} ({t_plain:.0f} s)")
    print(f"  keras_seht's classes: {_counts(ours)} ({t_ours:.0f} s)")
    if rc_plain not in (0, 1) or rc_ours not in (0, 1) or not plain:
        print(f"pytest did not run the tests (exit {rc_plain}, {rc_ours}).")
        return 1
    failing_for_plain = sorted(t for t, o in plain.items() if o != "passed")
    if failing_for_plain:
        print("Not passing with plain Keras either (not compared):")
        print("".join(f"  {t}: {plain[t]}\n" for t in failing_for_plain))
    found = regressions(plain, ours)
    if found:
        print("FAILED: these pass with plain Keras but not with keras_seht:")
        print("".join(f"  {line}\n" for line in found), end="")
        return 1
    print("OK: every test that passes with plain Keras passes with ours.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
