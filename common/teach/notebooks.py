"""The notebooks: jupytext "percent" scripts in ``notebooks/``, the ``.ipynb`` files made from them.

The ``.py`` file is what people edit and review (``# %%`` starts a code cell, ``# %% [markdown]``
a text cell whose lines are comments); the ``.ipynb`` beside it is generated from it, without
outputs, by :func:`to_notebook` (``densenet notebooks`` writes them, ``--check`` only compares).
The conversion is jupytext's own, so the pair is what jupytext (or Jupyter with its jupytext
extension, which the script's header pairs with the notebook) makes of the script, but for the
cell ids, which are numbered here instead of random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import DenseNetError, Failed

__all__ = ["code_of", "dumps", "notebook_paths", "sync", "to_notebook"]

# The scripts' format. Jupytext also reads the pairing their header names into the notebook's
# metadata, and the ``.ipynb`` keeps it, so Jupyter with jupytext opens the two as one notebook.
FORMAT = "py:percent"


def _jupytext() -> Any:
    """Jupytext, imported only when a notebook is converted (the ``teach`` extra)."""
    try:
        import jupytext
    except ImportError:
        raise Failed(
            "densenet notebooks needs jupytext, which is not installed: pip install 'densenet-suite[teach]'"
        ) from None
    return jupytext


def to_notebook(text: str) -> Any:
    """The nbformat 4.5 notebook of a percent script (an ``nbformat.NotebookNode``): its cells, no
    outputs, with ids that depend only on the cells' order."""
    notebook = _jupytext().reads(text, fmt=FORMAT)
    # nbformat gives every new cell a random id, so each conversion would differ from the last
    # and `--check` could never pass; numbering them keeps the file a function of the script.
    for number, cell in enumerate(notebook.cells, start=1):
        cell["id"] = f"cell-{number}"
    return notebook


def dumps(notebook: Any) -> str:
    """The notebook as Jupyter saves it (nbformat's JSON: one-space indent, sorted keys, a final
    newline), validated against the nbformat schema on the way."""
    text = _jupytext().writes(notebook, fmt="ipynb")
    # ``writes`` leaves off the final newline that ``nbformat.write`` (so Jupyter) adds to a file.
    return text if text.endswith("\n") else text + "\n"


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
        try:
            text = dumps(to_notebook(script.read_text(encoding="utf-8")))
        except Failed:
            raise
        except Exception as exc:
            # Jupytext and nbformat fail in their own types (a YAML error in the header, a schema
            # violation in its kernelspec); say which script, as a user error, not a bug. The first
            # line is the reason; nbformat's further lines print the whole schema path.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DenseNetError(f"{script}: jupytext cannot make a valid notebook of it: {reason}") from exc
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            stale.append(target)
            if not check:
                target.write_text(text, encoding="utf-8")
    return stale
