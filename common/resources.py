"""Where the suite's files are, installed from a wheel or run from a source checkout.

Everything a command reads at run time ships inside the packages (the golden vectors, the site's
static files and the part of ``docs/`` the site shows), so every command works from an installed
wheel. In a checkout, ``common/teach/docs`` is a link to ``docs/``; the wheel holds a copy of the
files the site reads. Only commands that are about the checkout itself (the git commit in the
site's header, regenerating the committed golden vectors or notebooks) look for one, and say so
when there is none.
"""

from __future__ import annotations

import os
import site
from collections.abc import Mapping
from pathlib import Path

import tomllib

__all__ = ["DISTRIBUTION", "checkout_root", "child_env", "docs_dir", "import_root"]

DISTRIBUTION = "densenet-suite"
_COMMON = Path(__file__).resolve().parent


def import_root() -> Path:
    """The directory the ``common`` package is imported from (a checkout or ``site-packages``)."""
    return _COMMON.parent


def docs_dir() -> Path:
    """The docs the site reads: ``docs/`` of a checkout, or the copy shipped in the wheel."""
    return _COMMON / "teach" / "docs"


def checkout_root() -> Path | None:
    """The source checkout ``common`` is imported from, or None for an installed package.

    A directory counts only when its ``pyproject.toml`` names this project: an installed
    package inside someone else's repository (a virtual environment in a project) is not ours.
    """
    root = import_root()
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return None
    return root if project.get("name") == DISTRIBUTION else None


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child process of the suite (a bench case, a worker, a measurement), which
    must import this very copy of the suite: a checkout's root goes first on ``PYTHONPATH``. An
    installed package is found by the child's own ``site-packages``, which is not put before the
    standard library."""
    root = import_root()
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in installed:
        return dict(env)
    path = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}
