"""The notebooks: jupytext "percent" scripts in ``notebooks/``, the ``.ipynb`` files made from them.

The ``.py`` file is what people edit and review (``# %%`` starts a code cell, ``# %% [markdown]``
a text cell whose lines are comments); the ``.ipynb`` beside it is generated from it, without
outputs, by :func:`to_notebook` (``densenet notebooks`` writes them, ``--check`` only compares).
Jupytext reads the same files (the header names the pairing), but nothing here needs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["code_of", "notebook_paths", "sync", "to_notebook"]

_CELL = re.compile(r"^# %%(?P<title>[^\[]*)(?:\[(?P<kind>\w+)\])?\s*$")
_KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _strip_header(lines: list[str]) -> list[str]:
    """Drop the jupytext YAML header (``# ---`` ... ``# ---``) if the file starts with one."""
    if lines and lines[0].strip() == "# ---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "# ---":
                return lines[i + 1 :]
    return lines


def _uncomment(line: str) -> str:
    if line.startswith("# "):
        return line[2:]
    return line[1:] if line.startswith("#") else line


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def to_notebook(text: str) -> dict[str, Any]:
    """The nbformat 4.5 notebook of a percent script: its cells, no outputs."""
    cells: list[dict[str, Any]] = []
    kind, body = None, []

    def flush() -> None:
        lines = _trim(body)
        if kind is None:
            if lines:
                raise ValueError("code before the first '# %%' cell marker")
            return
        source = [_uncomment(line) for line in lines] if kind == "markdown" else lines
        cell: dict[str, Any] = {"cell_type": kind, "id": f"cell-{len(cells) + 1}", "metadata": {}}
        cell["source"] = [line + "\n" for line in source[:-1]] + source[-1:]
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)

    for line in _strip_header(text.splitlines()):
        match = _CELL.match(line)
        if match:
            flush()
            kind, body = ("markdown" if match.group("kind") == "markdown" else "code"), []
        else:
            body.append(line)
    flush()
    return {
        "cells": cells,
        "metadata": {"kernelspec": _KERNEL, "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def dumps(notebook: dict[str, Any]) -> str:
    """The notebook as Jupyter writes it (one-space indent, sorted keys), so diffs stay small."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def code_of(notebook: dict[str, Any]) -> str:
    """Every code cell of a notebook, in order, as one script (what executing it runs)."""
    return "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code") + "\n"


def notebook_paths(directory: Path) -> list[Path]:
    """The percent scripts of ``directory`` (``densenet_<backend>.py``)."""
    return sorted(directory.glob("densenet_*.py"))


def sync(directory: Path, check: bool = False) -> list[Path]:
    """Write each script's ``.ipynb`` (or, with ``check``, list those that differ or are missing)."""
    stale = []
    for script in notebook_paths(directory):
        target = script.with_suffix(".ipynb")
        text = dumps(to_notebook(script.read_text(encoding="utf-8")))
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            stale.append(target)
            if not check:
                target.write_text(text, encoding="utf-8")
    return stale
