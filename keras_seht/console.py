"""The ``keras-seht`` command: the demo, the step-time benchmark, reports.

    keras-seht demo --quick                  # SEHT vs plain Keras, digits
    keras-seht bench --backends torch        # step time, source checkout
    keras-seht report runs/mnist_hessian_reinit
    keras-seht --version

``python -m keras_seht`` is the same program. Each subcommand hands its
arguments, unchanged, to the program it wraps:

* ``demo``: `keras_seht.experiments.demo.main`
  (``python -m keras_seht.experiments.demo``);
* ``bench``: the script ``benchmarks/step_time.py`` of a source checkout
  (it is not part of the installed package; see `find_benchmark`);
* ``report``: `keras_seht.experiments.report.main`
  (``python -m keras_seht.experiments.report``).

``keras-seht SUBCOMMAND --help`` shows that program's own options.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import pathlib
import sys
import textwrap
from typing import Any, Callable, NamedTuple, Sequence

#: The benchmark script, relative to the root of a source checkout.
BENCHMARK_SCRIPT = pathlib.PurePosixPath("benchmarks", "step_time.py")
#: The program name shown in help and error messages.
PROG = "keras-seht"


class Subcommand(NamedTuple):
    """One subcommand: its help line, an example, and what runs it."""

    summary: str
    example: str
    run: Callable[[str, list[str]], int]


def _exit_status(code: Any) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter sees it.

    None is success (0), an int is itself, anything else (a message) is
    printed to stderr and is failure (1).
    """
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _renamed(
    parser: argparse.ArgumentParser, prog: str
) -> argparse.ArgumentParser:
    """`parser` with `prog` in its usage, help and error messages."""
    parser.prog = prog
    return parser


def run_demo(prog: str, args: list[str]) -> int:
    """``keras-seht demo ARGS``: `keras_seht.experiments.demo.main`.

    The arguments are first checked with the demo's own parser under the
    name `prog` (so ``--help`` and errors name ``keras-seht demo``).
    """
    from keras_seht.experiments import demo

    _renamed(demo.make_parser(), prog).parse_args(args)
    demo.main(args)
    return 0


def run_report(prog: str, args: list[str]) -> int:
    """``keras-seht report RUNS_DIR ...``: the report's own exit status.

    0: success, 1: nothing to report, 2: bad arguments.
    """
    from keras_seht.experiments import report

    _renamed(report.make_parser(), prog).parse_args(args)
    return report.main(args)


def find_benchmark() -> pathlib.Path | None:
    """``benchmarks/step_time.py`` of a source checkout, or None.

    Looked for next to the imported ``keras_seht`` package (an editable
    install, or running from the checkout), then in the current folder.
    A folder counts as a checkout only if it also has ``pyproject.toml``.
    An installed wheel has no benchmarks, so this is None there unless
    the command runs from the root of a checkout.
    """
    package = pathlib.Path(__file__).resolve().parent
    for root in (package.parent, pathlib.Path.cwd()):
        script = root.joinpath(*BENCHMARK_SCRIPT.parts)
        if script.is_file() and (root / "pyproject.toml").is_file():
            return script
    return None


def run_bench(prog: str, args: list[str]) -> int:
    """``keras-seht bench ARGS``: runs ``benchmarks/step_time.py``.

    The script's ``main`` runs in this process with ``sys.argv`` set to
    ARGS, as ``python benchmarks/step_time.py ARGS`` would (it starts one
    Python per backend itself). Without a source checkout this explains
    where to get the script, and returns 2.
    """
    script = find_benchmark()
    if script is None:
        message = (
            f"{prog}: error: the step-time benchmark is the script "
            f"{BENCHMARK_SCRIPT} of the keras-seht source repository; it is "
            "not part of the installed package."
        )
        advice = (
            "Clone the repository, install it (`make venv`, or `pip install "
            "-e .`) and run this command from the repository's root, or run "
            f"`python {BENCHMARK_SCRIPT} --help` there."
        )
        print("\n".join(_wrap(message) + _wrap(advice)), file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(
        "keras_seht_step_time_benchmark", script
    )
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError(f"Cannot load {script}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The script reads its arguments (and its name, for --help) from
    # sys.argv, and hands them on to the one process per backend it starts.
    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        module.main()
    finally:
        sys.argv = saved
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand(
        "train an MLP and a CNN on scikit-learn's digits with and without "
        "SEHT; print test accuracy, exact Hessian trace and training time, "
        "and plot the curves",
        "keras-seht demo --quick",
        run_demo,
    ),
    "bench": Subcommand(
        "time a SEHT training step relative to a plain Keras step, on each "
        "Keras backend (needs a source checkout of keras-seht)",
        "keras-seht bench --backends torch --repeats 3",
        run_bench,
    ),
    "report": Subcommand(
        "summarize finished runs of the example scripts (their "
        "results.json files under RUNS_DIR; the demo prints its own table): "
        "tables of mean and standard error over seeds, and training curves",
        "keras-seht report runs/mnist_hessian_reinit",
        run_report,
    ),
}
#: Width of the help text (argparse's default wraps at the terminal's).
WIDTH = 79
#: Indent of a subcommand's description in the help text.
INDENT = 12


def _version() -> str:
    """The version line: keras-seht, Keras and the Keras backend."""
    import keras

    from keras_seht.version import __version__

    return (
        f"keras-seht {__version__} (Keras {keras.__version__}, "
        f"backend: {keras.config.backend()})"
    )


class _VersionAction(argparse.Action):
    """``--version``: like argparse's, but the line is made when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(_version())
        parser.exit()


def _wrap(text: str, indent: int = 0, first: str = "") -> list[str]:
    """`text` wrapped to `WIDTH`, indented, the first line after `first`."""
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first.ljust(indent),
        subsequent_indent=" " * indent,
        break_on_hyphens=False,
    )


def _description(prog: str) -> str:
    """The help text before the options: what it is, the subcommands."""
    lines = [
        "keras-seht: Hessian-trace (curvature) regularization for Keras 3.",
        "",
        "subcommands:",
    ]
    for name, sub in SUBCOMMANDS.items():
        example = sub.example.replace(PROG, prog, 1)
        lines += _wrap(sub.summary, INDENT, f"  {name}")
        lines += _wrap(f"example: {example}", INDENT)
    return "\n".join(lines)


def _epilog(prog: str) -> str:
    """The help text after the options."""
    return "\n".join(
        _wrap(f"Run `{prog} SUBCOMMAND --help` for a subcommand's options.")
        + _wrap(
            "The Keras backend is the one KERAS_BACKEND names (torch, jax or "
            "tensorflow); torch when it is unset and torch is installed."
        )
    )


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The top-level parser.

    The subcommand and its ARGS are not parsed here: `main` hands ARGS to
    the subcommand unchanged.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--version] SUBCOMMAND [ARGS ...]",
        description=_description(prog),
        epilog=_epilog(prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the keras-seht version and the Keras backend, and exit",
    )
    parser.add_argument(
        "command",
        nargs="?",
        metavar="SUBCOMMAND",
        help="one of: " + ", ".join(SUBCOMMANDS),
    )
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="the subcommand's arguments, passed to it unchanged",
    )
    return parser


def _dispatch(argv: list[str], prog: str) -> int:
    parser = make_parser(prog)
    # The first word not starting with "-" is the subcommand; the top level
    # has only flags (-h, --version), so everything after it is ARGS.
    split = next(
        (i for i, arg in enumerate(argv) if not arg.startswith("-")),
        len(argv),
    )
    name = parser.parse_args(argv[: split + 1]).command
    if name is None:
        parser.error(
            f"choose a subcommand: {', '.join(SUBCOMMANDS)} (see "
            f"`{prog} --help`)"
        )
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        parser.error(
            f"unknown subcommand {name!r}; choose one of "
            f"{', '.join(SUBCOMMANDS)}.{hint} See `{prog} --help`."
        )
    return SUBCOMMANDS[name].run(f"{prog} {name}", argv[split + 1 :])


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs the ``keras-seht`` command; returns its exit status.

    Args:
        argv: The arguments after the program name (default:
            ``sys.argv[1:]``).
        prog: The program name shown in help and messages.

    Returns:
        0 on success; 2 for bad arguments (argparse's convention) or a
        missing source checkout (``bench``); the subcommand's status
        otherwise (``report``: 1 when there is nothing to report).
        ``--help`` and ``--version`` return 0 instead of exiting.
    """
    args = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        return _dispatch(args, prog)
    except SystemExit as exit:
        return _exit_status(exit.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


__all__ = ["SUBCOMMANDS", "find_benchmark", "main", "make_parser"]
