"""The README stays true: its usage example runs as written, and the
commands it (and the docs pages it sends readers to) names exist."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run_block(marker: str, tmp_path) -> subprocess.CompletedProcess:
    """Runs the README's first Python block containing `marker`."""
    example = next(b for b in _python_blocks() if marker in b)
    script = tmp_path / "example.py"
    script.write_text(example)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_usage_example_runs(tmp_path):
    result = _run_block("seht=SEHTD", tmp_path)
    lines = result.stdout.strip().splitlines()
    traces = [float(v) for v in re.findall(r"[-\d.e+]+", lines[-3])]
    assert len(traces) == 3
    assert float(lines[-2]) > 0 and float(lines[-1]) > 0


def test_baselines_example_runs(tmp_path):
    result = _run_block("Jacobian(", tmp_path)
    printed = result.stdout.strip().splitlines()[-1]
    documented = re.search(
        r"prints `(\[.*?\])`", README.read_text(), re.S
    ).group(1)
    assert printed == " ".join(documented.split()), printed


def test_make_targets_named_in_readme_exist():
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\S+)", README.read_text(), re.M):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_example_commands_in_readme_parse():
    """Every `python examples/NAME.py ARGS` of the README and of
    docs/papers.md is accepted by that script's parser (the scripts run
    end to end in test_examples)."""
    import importlib.util
    import shlex

    commands = re.findall(
        r"python (examples/\w+\.py)([^`|\n]*)", README.read_text()
    )
    paper_commands = re.findall(
        r"python (examples/\w+\.py)([^`|\n]*)",
        (DOCS / "papers.md").read_text(),
    )
    for found in (commands, paper_commands):
        assert {path for path, _ in found} >= {
            "examples/cifar10_resnet18.py",
            "examples/cifar100_wrn.py",
            "examples/wikitext2_rnn.py",
            "examples/mnist_hessian_reinit.py",
        }
    commands += paper_commands
    assert {path for path, _ in commands} >= {
        "examples/cifar10_resnet18.py",
        "examples/cifar100_wrn.py",
        "examples/wikitext2_rnn.py",
        "examples/mnist_hessian_reinit.py",
    }
    for path, args in commands:
        spec = importlib.util.spec_from_file_location(
            "readme_example", README.parent / path
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.make_parser().parse_args(shlex.split(args))


def test_console_help_in_docs_is_current(capsys):
    """The README names `keras-seht --help` and links to the docs page
    that shows its output, which is the current output."""
    from keras_seht import console

    assert "`keras-seht --help` ([docs](docs/index.md#command-line))" in (
        README.read_text()
    )
    block = re.search(
        r"```text\n\$ keras-seht --help\n(.*?)```",
        (DOCS / "index.md").read_text(),
        re.S,
    ).group(1)
    assert console.main(["--help"]) == 0
    assert capsys.readouterr().out == block


def test_readme_links_resolve():
    """Every relative link of the README names a file that exists."""
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text()):
        assert (README.parent / target).is_file(), target


def _extras() -> dict[str, list[str]]:
    import tomllib

    with open(README.parent / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return project["optional-dependencies"]


def test_snippets_say_which_extra_they_need():
    """A README or docs/index.md snippet importing a package that the
    `[torch]` install lacks names the extra that brings it, and that
    extra's install command is shown (issue 23, item 1)."""
    extras = _extras()
    base = {"keras", "keras_seht", "numpy"}
    for page in (README, DOCS / "index.md"):
        text = page.read_text()
        blocks = re.findall(r"```python\n(.*?)```", text, re.S)
        assert blocks
        for block in blocks:
            for line in block.splitlines():
                found = re.match(r"(?:from|import) (\w+)", line)
                if not found or found.group(1) in base:
                    continue
                package = {"sklearn": "scikit-learn"}.get(
                    found.group(1), found.group(1)
                )
                named = re.search(r'# the "(\w+)" extra', line)
                assert named, (page.name, line)
                extra = named.group(1)
                assert any(req.startswith(package) for req in extras[extra]), (
                    extra,
                    package,
                )
                assert f'pip install "keras-seht[torch,{extra}]"' in text


def test_readme_says_import_keras_seht_before_loading():
    """Loading a saved model needs `import keras_seht` (item 8)."""
    for page in (README, DOCS / "index.md"):
        text = " ".join(page.read_text().split())
        assert "load it after `import keras_seht`" in text, page.name
