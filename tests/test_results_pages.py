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
