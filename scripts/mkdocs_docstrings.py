r"""A griffe extension that makes keras-seht's docstrings read well in mkdocs.

The docstrings are written for ``help()``, doctest and Sphinx habits;
mkdocstrings renders them as Markdown. Before rendering (only then: the
package's code and docstrings are untouched), this rewrites

- doctest examples (``>>>`` lines, their ``...`` continuations and their
  output) into ``pycon`` code blocks, without ``# doctest:`` flags;
  Markdown would otherwise show them as nested block quotes;
- ``.. math::`` blocks into display math, ``\[ ... \]`` on lines of
  their own, and ``:math:`x``` roles into inline math, ``\( x \)``:
  the ``pymdownx.arithmatex`` extension (``generic: true`` in
  ``mkdocs.yml``) wraps them in ``arithmatex`` elements that MathJax
  (``docs/javascripts/mathjax.js``) typesets in the browser;
- the other Sphinx roles (``:func:`f```, ``:class:`C```, ...) into inline
  code.

Used from ``mkdocs.yml`` (``extensions: [scripts/mkdocs_docstrings.py]``,
a path relative to the folder mkdocs runs in: the repository's root).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]*)`")
_ROLE = re.compile(r":(?:func|class|meth|data|attr|mod):`([^`]*)`")
_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_LIST_ITEM = re.compile(r"^( *)(?:[-*+]|\d+[.)]) +(?=\S)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(lines: list[str], indent: int, language: str) -> list[str]:
    pad = " " * indent
    return [f"{pad}```{language}", *lines, f"{pad}```"]


def _display_math(lines: list[str], indent: int) -> list[str]:
    r"""`lines`, the block's LaTeX, between ``\[`` and ``\]``.

    That is the Markdown block that arithmatex reads as display math;
    `lines` are already at `indent`.
    """
    pad = " " * indent
    return [f"{pad}\\[", *lines, f"{pad}\\]"]


def _inline_math(match: re.Match[str]) -> str:
    # One line: a role that wraps in the docstring is one formula.
    latex = " ".join(match.group(1).split())
    return f"\\({latex}\\)"


def _indent_list_items(lines: list[str]) -> list[str]:
    """`lines` with each list item's body indented 4 spaces past its marker.

    reStructuredText (and so the docstrings) indents an item's later
    paragraphs and math to the item's text, 3 spaces after ``1.``, 2 after
    ``-``; Python-Markdown nests a block in the item only at 4, and would
    end the list before it.
    """
    out = list(lines)
    i = 0
    while i < len(out):
        match = _LIST_ITEM.match(out[i])
        if not match:
            i += 1
            continue
        content = match.end()
        shift = len(match.group(1)) + 4 - content
        blocks = 1
        i += 1
        while i < len(out) and (
            not out[i].strip() or _indent(out[i]) >= content
        ):
            if not out[i].strip():
                blocks += 1
            elif shift > 0:
                out[i] = " " * shift + out[i]
            i += 1
        # An item of several blocks: a blank line before the next line,
        # else Markdown reads it as more of the item's last paragraph.
        if blocks > 1 and i < len(out) and out[i - 1].strip():
            out.insert(i, "")
    return out


def rewrite(text: str) -> str:
    """The docstring `text` with doctests, math and roles in Markdown form."""
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
            trailing = 0
            while block and not block[-1].strip():
                block.pop()
                trailing += 1
            # No blank lines inside: display math is one Markdown block
            # (LaTeX ignores them), with a blank line before and after.
            body = [b for b in block if b.strip()]
            depth = min((_indent(b) for b in body), default=0)
            if out and out[-1].strip():
                out.append("")
            out.extend(
                _display_math([" " * indent + b[depth:] for b in body], indent)
            )
            out.extend([""] * max(trailing, 1))
            continue
        out.append(line)
        i += 1
    text = _MATH_ROLE.sub(_inline_math, "\n".join(_indent_list_items(out)))
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded objects with `rewrite`."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        """Rewrites the docstring of `obj`, once; griffe calls it per object."""
        docstring = obj.docstring
        if docstring is not None and not getattr(
            docstring, "_markdown_done", False
        ):
            docstring.value = rewrite(docstring.value)
            docstring._markdown_done = True
