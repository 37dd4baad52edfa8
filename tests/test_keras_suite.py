"""scripts/keras_suite.py: how it compares the two runs of Keras' tests.

The runs themselves are `make keras-suite`; these tests check the
comparison on hand-written JUnit reports.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

# Pure Python on XML files: one backend (conftest).
pytestmark = pytest.mark.single_backend

SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1] / "scripts" / "keras_suite.py"
)


def _load_script():
    spec = importlib.util.spec_from_file_location("keras_suite", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = _load_script()

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="src.models.model_test.ModelTest" name="test_a"/>
<testcase classname="src.models.model_test.ModelTest" name="test_b">
  <failure message="boom"/></testcase>
<testcase classname="src.models.model_test.ModelTest" name="test_c">
  <skipped message="no GPU"/></testcase>
<testcase classname="src.models.model_test.ModelTest" name="test_d">
  <error message="setup"/></testcase>
<testcase classname="src.models.model_test.ModelTest" name="test_e"/>
<testcase classname="src.models.model_test.ModelTest" name="test_e">
  <error message="teardown"/></testcase>
</testsuite></testsuites>
"""


def test_read_junit(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text(REPORT)
    outcomes = suite.read_junit(path)
    prefix = "src.models.model_test.ModelTest::"
    assert outcomes == {
        prefix + "test_a": "passed",
        prefix + "test_b": "failed",
        prefix + "test_c": "skipped",
        prefix + "test_d": "error",
        prefix + "test_e": "error",  # its teardown failed
    }


def test_regressions_are_tests_only_plain_keras_passes():
    plain = {
        "a": "passed",
        "b": "failed",
        "c": "skipped",
        "d": "passed",
        "e": "passed",
        "f": "passed",
    }
    ours = {
        "a": "passed",
        "b": "failed",
        "c": "skipped",
        "d": "failed",
        "e": "skipped",
        "g": "failed",  # not run for plain Keras: not comparable
    }
    assert suite.regressions(plain, ours) == [
        "d: failed",
        "e: skipped",
        "f: missing",
    ]
    assert suite.regressions(plain, plain) == []


def test_the_installed_keras_ships_the_tests():
    files = suite.keras_test_files()
    assert [f.name for f in files] == ["model_test.py", "sequential_test.py"]
    # The module-level names the plugin rebinds.
    source = "".join(f.read_text() for f in files)
    assert "from keras.src.models.model import Model\n" in source
    assert "from keras.src.models.sequential import Sequential\n" in source


@pytest.mark.slow  # two pytest processes
def test_the_suite_passes_on_its_quickest_tests():
    env = dict(os.environ, KERAS_BACKEND="torch")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "-k", "get_state_tree or quantize_int8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    assert "OK: every test that passes with plain Keras" in result.stdout
    # Only passes (no "N failed"): the time follows the count.
    assert re.search(r"keras_seht's classes: \d+ passed \(", result.stdout)
