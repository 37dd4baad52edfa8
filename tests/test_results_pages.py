"""The generated docs pages match the results files, and the docstrings'
math reaches the site as math."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_results_pages_are_current():
    """docs/performance.md and docs/stability.md are what
    scripts/results_pages.py writes from benchmarks/results/ today."""
    pages = _script("results_pages")
    assert pages.stale_pages() == [], (
        "run python scripts/results_pages.py and commit the pages"
    )
    assert pages.main(["--check"]) == 0


def test_results_pages_numbers_come_from_the_files():
    pages = _script("results_pages")
    performance = (ROOT / "docs" / "performance.md").read_text()
    torch = pages._load("step_overhead_torch.json")
    mean = torch["models"]["resnet"]["time"]["SEHT-H(1)"]["mean"]
    assert f"| SEHT-H(1) | {mean:.2f}x |" in performance
    stability = (ROOT / "docs" / "stability.md").read_text()
    table = ROOT / "benchmarks" / "results" / "curvature_stability.md"
    assert table.read_text().splitlines()[2] in stability


def test_reinit_page_numbers_come_from_the_file():
    pages = _script("results_pages")
    page = (ROOT / "docs" / "reinit_mnist.md").read_text()
    data = pages._load("mnist_reinit_subset.json")
    base = [
        100 * r["test_accuracy"]
        for r in data["runs"]
        if r["method"] == "baseline"
    ]
    mean = sum(base) / len(base)
    assert f"| baseline | {len(base)} | " in page
    assert f"| {mean:.2f} ± " in page
    for claim, _ in pages.REINIT_CLAIMS:
        assert f"| {claim} | " in page


def _reinit_data(k10, k30, finite=True):
    """Four seeds: baseline accuracies 0.90; the others offset per seed."""
    runs = []
    for seed in range(4):
        for method, offset in (
            ("baseline", 0.0),
            ("reinit-k10", k10[seed]),
            ("reinit-k20", 0.0),
            ("reinit-k30", k30[seed]),
        ):
            acc = 0.90 + offset
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "test_accuracy": acc,
                    "best_test_accuracy": acc,
                    "finite": finite or method != "reinit-k30" or seed,
                    "val_accuracy": [0.8, acc],
                }
            )
    return {"runs": runs}


def test_reinit_verdicts_follow_two_standard_errors():
    pages = _script("results_pages")
    # k = 10: +1, +2, +1, +2 pp: mean 1.5, SE 0.29: helps. k = 20 is
    # then 1.5 pp below k = 10 (worse); k = 30 equals the baseline.
    data = _reinit_data([0.01, 0.02, 0.01, 0.02], [0.0] * 4)
    verdicts = {c: v for c, _, v in pages.reinit_verdicts(data)}
    assert verdicts == {
        "k = 10% helps": "final: helps; best epoch: helps",
        "k = 20% is worse (than k = 10%)": "final: worse; best epoch: worse",
        "k = 30% is unstable": "not unstable beyond 2 SE",
    }
    # +3, -1, +3, -1: mean 1, SE 1.15: within 2 SE. A k = 30 run that
    # is not finite makes it unstable.
    data = _reinit_data([0.03, -0.01, 0.03, -0.01], [0.0] * 4, finite=False)
    verdicts = {c: v for c, _, v in pages.reinit_verdicts(data)}
    same = "no difference beyond 2 SE"
    assert verdicts["k = 10% helps"] == f"final: {same}; best epoch: {same}"
    assert verdicts["k = 30% is unstable"] == "unstable"
    # Test accuracy falls from 0.8 to 0.6 or 0.7 after the first epoch:
    # 20, 10, 20, 10 pp more than the baseline's no fall (mean 15, SE
    # 2.9): unstable, though every run is finite.
    data = _reinit_data([0.0] * 4, [-0.3, -0.2, -0.3, -0.2])
    verdicts = {c: v for c, _, v in pages.reinit_verdicts(data)}
    assert verdicts["k = 30% is unstable"] == "unstable"


def test_a_changed_results_file_needs_a_new_date(monkeypatch):
    pages = _script("results_pages")
    name = "step_time.json"
    date, _ = pages.MEASURED[name]
    monkeypatch.setitem(pages.MEASURED, name, (date, "0" * 12))
    with pytest.raises(pages.StaleDate, match=name):
        pages.performance_page()


def test_docstring_math_becomes_arithmatex_math():
    pytest.importorskip("griffe")
    rewrite = _script("mkdocs_docstrings").rewrite
    text = (
        "The probe :math:`\\sigma` and\n"
        ":math:`t = \\sigma^\\top\n    H \\sigma`:\n"
        "\n"
        ".. math::\n"
        "\n"
        "    t = \\sigma^\\top H \\sigma\n"
        "\n"
        "    = \\operatorname{tr}(H).\n"
        "\n"
        "See :func:`hessian_trace`."
    )
    assert rewrite(text) == (
        "The probe \\(\\sigma\\) and\n"
        "\\(t = \\sigma^\\top H \\sigma\\):\n"
        "\n"
        "\\[\n"
        "t = \\sigma^\\top H \\sigma\n"
        "= \\operatorname{tr}(H).\n"
        "\\]\n"
        "\n"
        "See `hessian_trace`."
    )


def test_docstring_list_items_keep_their_math():
    """A math block inside a numbered item stays in the item: its body is
    indented 4 spaces past the marker, as Python-Markdown wants."""
    pytest.importorskip("griffe")
    rewrite = _script("mkdocs_docstrings").rewrite
    text = (
        "1. Draw seeds, with\n"
        "\n"
        "   .. math::\n"
        "\n"
        "       \\gamma = 1\n"
        "\n"
        "   so that few drop.\n"
        "2. Grow them."
    )
    assert rewrite(text) == (
        "1. Draw seeds, with\n"
        "\n"
        "    \\[\n"
        "    \\gamma = 1\n"
        "    \\]\n"
        "\n"
        "    so that few drop.\n"
        "\n"
        "2. Grow them."
    )


def test_does_it_help_page_and_its_figures_are_checked(tmp_path, monkeypatch):
    """The study's page is generated, and --check flags a figure under
    docs/ that differs from the results file it copies."""
    pages = _script("results_pages")
    assert pages.PAGES["does_it_help.md"] is pages.does_it_help_page
    assert pages.does_it_help_figures in pages.FIGURES
    source = tmp_path / "figure.png"
    source.write_bytes(b"not in docs")
    name = "img/_no_such_figure.png"
    monkeypatch.setattr(pages, "FIGURES", [lambda: {name: source}])
    assert pages.stale_pages() == [name]
    assert pages.main(["--check"]) == 1
