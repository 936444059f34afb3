"""The framework-neutral core knows backends by name only through the registry (issue 23).

``common`` reaches a backend through ``common.registry``: its adapter (``load_backend``) and how
its processes are started (``launch_spec``: the package's ``launch.py``). Everything else in
``common`` is the same code for every backend, so a new backend is a registry entry and a package,
never an edit here. This reads every ``.py`` file under ``common/`` with ``ast`` (nothing is
imported) and fails on a comparison against a backend's name or alias, and on an import of a
backend package, anywhere but in ``common/registry.py``; the few comparisons with such a name that
are about something else (a weight file's format) are listed, each with why. And it checks that
asking the registry how to start a backend's processes, and starting them, imports no framework.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from common.registry import ALIASES, BACKENDS

COMMON = Path(__file__).resolve().parent.parent / "common"
# Every name a backend goes by (the registry's keys and aliases), and the frameworks' own names.
NAMES = {*BACKENDS, *ALIASES, "pytorch", "gluon", "flax", "tensorflow", "keras"}
PACKAGES = {entry.package for entry in BACKENDS.values()}
# The one file allowed to name backends: the registry itself.
REGISTRY = "registry.py"
# Comparisons with such a name that are not about a backend, each with why: (file, the comparison).
# A weight file's format shares its name with a framework: ``--from-format keras`` reads Keras
# Applications' tensor names and ``gluon`` the Gluon model zoo's, with no framework involved
# (common.weights.peers); the formats are not backends, and the registry does not know them.
NOT_BACKENDS = {
    ("cli/weights.py", "fmt == 'keras'"): "the Keras Applications weight-file format (--to-format)",
    ("weights/peers.py", "fmt == 'gluon'"): "the Gluon model zoo's weight-file format (--from-format)",
    ("weights/peers.py", "fmt == 'keras'"): "the Keras Applications weight-file format (--from-format)",
}


def _files() -> list[Path]:
    return sorted(p for p in COMMON.rglob("*.py") if "__pycache__" not in p.parts)


def _strings(node: ast.AST) -> list[str]:
    """The string constants of one side of a comparison: ``"torch"``, or each item of a literal
    tuple, list or set (``backend in ("tf", "jax")``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for item in node.elts for s in _strings(item)]
    return []


def backend_comparisons(tree: ast.AST) -> list[tuple[int, str, str]]:
    """``(line, name, the comparison's source)`` of every comparison with a backend's name on
    either side."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += [(node.lineno, s, ast.unparse(node)) for s in _strings(side) if s.strip().lower() in NAMES]
        elif isinstance(node, ast.match_case):  # `case "torch":` compares too
            names = [s for s in _match_strings(node.pattern) if s.strip().lower() in NAMES]
            found += [(node.pattern.lineno, s, f"case {ast.unparse(node.pattern)}") for s in names]
    return found


def _match_strings(pattern: ast.AST) -> list[str]:
    if isinstance(pattern, ast.MatchValue):
        return _strings(pattern.value)
    if isinstance(pattern, ast.MatchOr):
        return [s for p in pattern.patterns for s in _match_strings(p)]
    return []


def backend_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a backend package (or of a module in one), including
    ``importlib.import_module("densenet_torch...")`` with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            modules = _strings(node.args[0])
        else:
            continue
        found += [(node.lineno, m) for m in modules if m.split(".")[0] in PACKAGES]
    return found


def _is_import_module(func: ast.AST) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def _offences(path: Path) -> tuple[list[str], set[tuple[str, str]]]:
    """What ``path`` (relative to ``common/``) does that the rule forbids, and the exceptions it used."""
    relative = path.relative_to(COMMON).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    offences, used = [], set()
    for line, name, source in backend_comparisons(tree):
        if (relative, source) in NOT_BACKENDS:
            used.add((relative, source))
        else:
            offences.append(f"line {line}: compares with {name!r} ({source})")
    offences += [f"line {line}: imports {module}" for line, module in backend_imports(tree)]
    return offences, used


def test_common_compares_no_backend_name_and_imports_no_backend_outside_the_registry():
    offences, used = {}, set()
    for path in _files():
        if path.relative_to(COMMON).as_posix() == REGISTRY:
            continue
        found, exceptions = _offences(path)
        used |= exceptions
        if found:
            offences[path.relative_to(COMMON).as_posix()] = found
    assert not offences, "backend knowledge outside common/registry.py (move it behind a registry hook):\n" + "\n".join(
        f"common/{file}: {'; '.join(found)}" for file, found in offences.items()
    )
    # An exception that no longer matches anything is taken off the list, so that it cannot hide a
    # real comparison written later in its place.
    assert not set(NOT_BACKENDS) - used, f"stale NOT_BACKENDS entries: {sorted(set(NOT_BACKENDS) - used)}"


def test_the_checks_see_what_they_look_for():
    """Each form the rule forbids is found (so that a clean result means something), and the
    forms it allows are not."""
    forbidden = (
        'backend == "torch"',
        'case.backend != "mxnet"',
        '"tf" == name',
        'backend in ("jax", "tensorflow")',
        'x is "keras"',
        'a < "Gluon" < b',
        "match b:\n    case 'flax':\n        pass",
    )
    for source in forbidden:
        assert backend_comparisons(ast.parse(source)), source
    for source in ("import densenet_torch", "from densenet_mxnet.launch import X", "import_module('densenet_tf.x')"):
        assert backend_imports(ast.parse(source)), source
    allowed = ('mode == "nchw"', 'BACKENDS["torch"]', 'x = "torch"', "import common.registry", "from . import x")
    for source in allowed:
        assert not backend_comparisons(ast.parse(source)) and not backend_imports(ast.parse(source)), source


# Asks everything `common` asks of a backend before its processes start, launches a 2-worker job of
# each engine with a trivial command (MXNet's scheduler and server included), and prints which
# framework modules, or which backend packages' own __init__, got imported.
NO_FRAMEWORK = """
import json, sys
from pathlib import Path
from common.process import allocator
from common.distributed import check_sync_bn, launch, worker_env
from common.distributed.launch import engine_for
from common.registry import BACKENDS, launch_spec
for name in BACKENDS:
    spec = launch_spec(name)
    engine = engine_for(name)
    worker_env(name, 0, 2, list(range(1000, 1000 + engine.ports_for(2))), Path("/nowhere"))
    engine.helpers(2, [1000])
    allocator.wanted(name), allocator.engine_record(name), allocator.mxnet_engine_env({}, name, True)
    if engine.sync_bn_refusal is None:
        check_sync_bn(name)
for name in ("torch", "jax"):  # these engines start their workers directly, MXNet its servers first
    assert launch(name, [sys.executable, "-c", "pass"], 2, timeout_s=60, say=lambda m: None) == 0
frameworks = ("torch", "mxnet", "jax", "jaxlib", "flax", "tensorflow", "keras", "optax")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in frameworks or m in BACKENDS_PACKAGES)))
"""


def test_starting_a_backend_s_processes_imports_no_framework():
    packages = sorted(entry.package for entry in BACKENDS.values())
    code = NO_FRAMEWORK.replace("BACKENDS_PACKAGES", repr(packages))
    root = str(COMMON.parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
