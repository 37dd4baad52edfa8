"""README.md's generated blocks (scripts/readme_tables.py).

The fast tests check that every block is what its committed results file
gives, and how the script rewrites and checks a README. The slow test
reruns the demo and checks that it reproduces the committed results file
at the precision the README shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from types import ModuleType

import keras
import pytest

from keras_seht.experiments import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    path = ROOT / "scripts" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("_readme_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_blocks_are_current(capsys):
    tables = _script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tables.stale_blocks(readme) == [], "run make readme"
    assert tables.missing_images() == []
    assert tables.main(["--check"]) == 0
    for block in tables.BLOCKS.values():
        if block.image is not None:
            assert f"]({block.image[0]})" in readme, block.image[0]


def test_demo_block_shows_the_results_file():
    """Spot-checks the README's demo table against the file's numbers."""
    results = json.loads(
        (ROOT / "benchmarks" / "results" / "demo_torch.json").read_text()
    )
    assert results["backend"] == "torch"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- demo-table:begin -->")[1].split(
        "<!-- demo-table:end -->"
    )[0]
    for run in results["runs"]:
        if (
            run["estimator"] is None
            and run["seed"] == results["config"]["seed"]
        ):
            row = (
                f"| {run['model']} | 0 (plain Keras) "
                f"| tr(H) = {run['exact_trace_test']:.2f} "
                f"| {100 * run['test_accuracy']:.1f} / "
                f"{100 * run['best_test_accuracy']:.1f} |"
            )
            assert row in block, row
    strengths = {r["strength"] for r in results["runs"] if r["strength"]}
    assert strengths == set(results["config"]["strengths"])
    rows = [ln for ln in block.splitlines() if ln.startswith("| ")]
    models = results["config"]["models"]
    # Header, then per model the baseline, its other seeds and one row
    # per strength.
    extra = int(results["config"]["baseline_seeds"] > 1)
    assert len(rows) == 1 + len(models) * (1 + extra + len(strengths))


def test_check_finds_and_fixes_a_stale_block(tmp_path, monkeypatch, capsys):
    tables = _script()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin = readme.index("<!-- demo-table:begin -->")
    stale = readme[:begin] + readme[begin:].replace("| mlp |", "| MLP |", 1)
    assert stale != readme
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(tables, "README", path)
    drawn = []
    monkeypatch.setattr(tables, "draw_images", lambda: drawn.append(1) or [])

    assert tables.main(["--check"]) == 1
    captured = capsys.readouterr()
    assert "Stale README block(s): demo-table" in captured.err
    assert "-| MLP |" in captured.out  # the diff
    assert path.read_text(encoding="utf-8") == stale  # --check writes none
    assert not drawn

    assert tables.main([]) == 0
    assert path.read_text(encoding="utf-8") == readme
    assert drawn == [1]
    assert tables.main(["--check"]) == 0


def test_a_block_is_one_entry(tmp_path, monkeypatch):
    """Adding a table: two markers in the README, one `Block`."""
    tables = _script()
    results = tmp_path / "study.json"
    results.write_text(json.dumps({"rows": [["a", 1], ["b", 2]]}))

    def render(data):
        return "\n".join(
            f"| {name} | {value} |" for name, value in data["rows"]
        )

    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(
        tables, "BLOCKS", {"study-table": tables.Block("study.json", render)}
    )
    text = "intro\n<!-- study-table:begin -->\nold\n<!-- study-table:end -->\n"
    new = tables.expected(text)
    assert new.startswith("intro\n<!-- study-table:begin -->\n<!-- Generated")
    assert "from study.json" in new
    assert "\n\n| a | 1 |\n| b | 2 |\n\n<!-- study-table:end -->\n" in new
    assert tables.stale_blocks(text) == ["study-table"]
    assert tables.stale_blocks(new) == []
    assert tables.expected(new) == new


@pytest.mark.parametrize(
    "text, found",
    [
        ("no markers", 0),
        ("<!-- t:end --> x <!-- t:begin -->", 0),
        ("<!-- t:begin -->a<!-- t:end --><!-- t:begin -->b<!-- t:end -->", 2),
    ],
)
def test_markers_must_appear_once(text, found):
    tables = _script()
    with pytest.raises(ValueError, match=f"exactly once; found {found}"):
        tables.replace_block(text, "t", "x")


@pytest.mark.slow
@pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="reruns the demo under torch itself; once per make test-all",
)
def test_demo_reproduces_the_committed_results(tmp_path):
    """The full demo under torch gives the committed table (~3-5 min).

    The demo seeds every run (`keras.utils.set_random_seed`), so on one
    backend, machine and thread count (OMP_NUM_THREADS=1, as `make demo`)
    it repeats bit for bit. The comparison is the rendered table, i.e.
    the numbers at the precision the README shows them: that is what the
    README claims, and it is fine enough to catch any change that matters
    (one test sample moves the accuracy by 1/450 = 0.22%, more than its
    0.1% digit; a trace ratio's second decimal is a 1% change). Finer
    digits could differ after a change of CPU kernel or library version
    with nothing to report; timings are never reproducible and are not
    in the table. On a different machine or version, a failure here
    means: rerun the demo there and commit its results file.
    """
    committed_path = ROOT / "benchmarks" / "results" / "demo_torch.json"
    committed = json.loads(committed_path.read_text(encoding="utf-8"))
    config = committed["config"]
    args = [
        "--epochs",
        config["epochs"],
        "--batch-size",
        config["batch_size"],
        "--learning-rate",
        config["learning_rate"],
        "--seed",
        config["seed"],
        "--probe-samples",
        config["probe_samples"],
        "--models",
        ",".join(config["models"]),
        "--strengths",
        ",".join(repr(s) for s in config["strengths"]),
        "--output-dir",
        tmp_path,
    ]
    if config["train_samples"] is not None:
        args += ["--train-samples", config["train_samples"]]
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_seht.experiments.demo"]
        + [str(a) for a in args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((tmp_path / "results.json").read_text("utf-8"))
    # The output folder is where each run wrote, not a setting of the run.
    assert {**rerun["config"], "output_dir": None} == {
        **config,
        "output_dir": None,
    }
    versions = (rerun["versions"], committed["versions"])
    assert demo.format_table(rerun) == demo.format_table(committed), versions
