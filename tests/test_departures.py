"""docs/departures.md names only mechanisms the code really uses.

Every code identifier a row's "here" column puts in backticks (``torch.utils.checkpoint``,
``MaxPoolPadded``, ``common.config.BN_EPS = 1e-5``, ``hybridize()``...) must be defined or used
in the packages the row describes, and every file it names must exist. The source is read with
``ast``, never imported, so comments, docstrings and other strings do not count and no framework
is needed. (The "book" column names the book's code, which is not here.)
"""

from __future__ import annotations

import ast
import keyword
import re
from functools import cache
from pathlib import Path

import pytest

from common.registry import BACKENDS
from common.teach import book

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", *(f"densenet_{name}" for name in BACKENDS))

# A dotted name whose first part is a framework's must be found in that framework's backend: a row
# saying `torch.autograd.Function` is wrong even if another backend uses an `autograd.Function`.
OWNERS = {
    "torch": "densenet_torch",
    "mx": "densenet_mxnet",
    "mxnet": "densenet_mxnet",
    "gluon": "densenet_mxnet",
    "jax": "densenet_jax",
    "flax": "densenet_jax",
    "tf": "densenet_tf",
    "tensorflow": "densenet_tf",
    "keras": "densenet_tf",
    **{package: package for package in PACKAGES},
}

# A code span that starts with a dotted name, alone or called (`hybridize()`), or assigned
# (`common.config.BN_EPS = 1e-5`, `memory_efficient=False`). Paths, quoted strings and
# expressions such as `x.shape[1:3]` are not identifiers.
_IDENTIFIER = re.compile(r"(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\)|\s*=.*)?")
_PATH = re.compile(r"[\w<>./-]+/[\w<>.-]+\.py")


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def identifiers(text: str) -> list[str]:
    """The dotted code identifiers among the code spans of ``text``, keywords (``True``) aside."""
    out = []
    for span in code_spans(text):
        match = _IDENTIFIER.fullmatch(span.strip())
        if match and not keyword.iskeyword(match["name"]):
            out.append(match["name"])
    return out


def paths(text: str) -> list[str]:
    """The files the code spans of ``text`` name, ``<backend>`` standing for every backend."""
    named = [span for span in code_spans(text) if _PATH.fullmatch(span)]
    return [p.replace("<backend>", b) for p in named for b in (BACKENDS if "<backend>" in p else [""])]


def _chain(node: ast.expr) -> str | None:
    """``a.b.c`` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _module_names(path: Path, module: str) -> set[str]:
    """Every dotted name one module defines or uses: imports, attribute chains, definitions
    (also qualified by their class and by the module), arguments and keywords."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = {module}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(n for a in node.names for n in (a.name, a.asname) if n)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.update(n for a in node.names for n in (a.name, a.asname) if n)
        elif isinstance(node, (ast.Attribute, ast.Name)):
            names.add(_chain(node) or "")
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)

    def define(body: list[ast.stmt], scope: str) -> None:
        for stmt in body:
            defined = []
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                defined = [stmt.name]
            elif isinstance(stmt, ast.Assign):
                defined = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                defined = [stmt.target.id]
            for name in defined:
                qualified = f"{scope}.{name}" if scope else name
                names.update({name, qualified, f"{module}.{qualified}"})
            if isinstance(stmt, ast.ClassDef):
                define(stmt.body, f"{scope}.{stmt.name}" if scope else stmt.name)

    define(tree.body, "")
    return names - {""}


@cache
def package_names(package: str) -> frozenset[str]:
    names: set[str] = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names |= _module_names(path, module)
    return frozenset(names)


def found(identifier: str) -> bool:
    """Whether some name of the packages ``identifier`` belongs to ends with its dotted parts."""
    parts = identifier.split(".")
    owner = OWNERS.get(parts[0])
    packages = [owner] if owner else PACKAGES
    return any(name.split(".")[-len(parts) :] == parts for package in packages for name in package_names(package))


def missing(text: str) -> list[str]:
    """What ``text`` names that the code does not have: identifiers, then files."""
    return [i for i in identifiers(text) if not found(i)] + [p for p in paths(text) if not (ROOT / p).is_file()]


DEPARTURES = book.read_departures(ROOT / "docs" / "departures.md")


@pytest.mark.parametrize("departure", DEPARTURES, ids=lambda d: f"row{d.number}")
def test_every_mechanism_a_row_names_is_in_the_code(departure: book.Departure) -> None:
    assert not missing(departure.here), f"docs/departures.md row {departure.number} names what the code lacks"


def test_the_rows_name_mechanisms_to_check() -> None:
    """The check is not vacuous: the rows name identifiers and files, and row 10 each framework's."""
    assert sum(len(identifiers(d.here)) for d in DEPARTURES) >= 20
    row10 = next(d for d in DEPARTURES if d.number == 10)
    named = identifiers(row10.here)
    for mechanism in ("torch.utils.checkpoint", "autograd.Function", "jax.custom_vjp", "tf.custom_gradient"):
        assert mechanism in named
    assert {f"densenet_{b}/memory_efficient.py" for b in BACKENDS} <= set(paths(row10.here))


def test_a_mechanism_the_code_does_not_use_fails() -> None:
    """What row 10 used to say: PyTorch recomputing with a ``torch.autograd.Function``."""
    old = "(a `torch.autograd.Function`, an MXNet `autograd.Function`, a `jax.custom_vjp`, a `tf.custom_gradient`)"
    assert missing(old) == ["torch.autograd.Function"]
    assert missing("`tf.custom_vjp`, `MaxPoolPadding`, `common.config.BN_EPSILON = 1e-5`") == [
        "tf.custom_vjp",
        "MaxPoolPadding",
        "common.config.BN_EPSILON",
    ]
    assert missing("in `densenet_<backend>/no_such_module.py`") == [f"densenet_{b}/no_such_module.py" for b in BACKENDS]


def test_spans_that_are_not_identifiers_are_left_alone() -> None:
    spans = "`'same'`, `x.shape[1:3]`, `tests/test_x.py::test_y`, `1e-5`, `True`"
    assert identifiers(spans) == []
    assert identifiers("`hybridize()`, `memory_efficient=False`, `ZeroPadding2D(1)`") == [
        "hybridize",
        "memory_efficient",
        "ZeroPadding2D",
    ]
