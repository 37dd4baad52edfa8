"""A griffe extension that makes keras-seht's docstrings read well in mkdocs.

The docstrings are written for ``help()``, doctest and Sphinx habits;
mkdocstrings renders them as Markdown. Before rendering (only then: the
package's code and docstrings are untouched), this rewrites

- doctest examples (``>>>`` lines, their ``...`` continuations and their
  output) into ``pycon`` code blocks, without ``# doctest:`` flags;
  Markdown would otherwise show them as nested block quotes;
- ``.. math::`` blocks into ``tex`` code blocks;
- Sphinx roles (``:math:`x```, ``:func:`f```, ...) into inline code.

Used from ``mkdocs.yml`` (``extensions: [scripts/mkdocs_docstrings.py]``,
a path relative to the folder mkdocs runs in: the repository's root).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:math|func|class|meth|data|attr|mod):`([^`]*)`")
_FLAGS = re.compile(r"\s*#\s*doctest:.*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(lines: list[str], indent: int, language: str) -> list[str]:
    pad = " " * indent
    return [f"{pad}```{language}", *lines, f"{pad}```"]


def rewrite(text: str) -> str:
    """The docstring `text` with doctests, math blocks and roles in
    Markdown form."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>"):
            indent = _indent(line)
            block = []
            # The example runs to the next blank line (doctest's rule).
            while i < len(lines) and lines[i].strip():
                block.append(_FLAGS.sub("", lines[i]))
                i += 1
            out.extend(_fence(block, indent, "pycon"))
            continue
        if stripped == ".. math::":
            indent = _indent(line)
            i += 1
            block = []
            while i < len(lines) and (
                not lines[i].strip() or _indent(lines[i]) > indent
            ):
                block.append(lines[i])
                i += 1
            body = [b for b in block if b.strip()]
            depth = min((_indent(b) for b in body), default=0)
            text_lines = [
                " " * indent + b[depth:] if b.strip() else "" for b in block
            ]
            while text_lines and not text_lines[0]:
                text_lines.pop(0)
            trailing = 0
            while text_lines and not text_lines[-1]:
                text_lines.pop()
                trailing += 1
            out.extend(_fence(text_lines, indent, "tex"))
            out.extend([""] * trailing)
            continue
        out.append(line)
        i += 1
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", "\n".join(out))


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded objects with `rewrite`."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and not getattr(
            docstring, "_markdown_done", False
        ):
            docstring.value = rewrite(docstring.value)
            docstring._markdown_done = True
