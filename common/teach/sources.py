"""The pieces of the book's section and where each backend keeps them, read with ``ast``.

Nothing is imported to find a piece: each backend package is located with
``importlib.util.find_spec`` (which does not run it) and its files are parsed, so the page builds
in a second without any framework installed and shows exactly what the files say.
"""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

from common.errors import DenseNetError

__all__ = [
    "BACKEND_ORDER",
    "ROWS",
    "Piece",
    "Row",
    "Source",
    "SourceError",
    "extract",
    "module_file",
    "parse_selector",
]

# Column order of the page: the book's tab order.
BACKEND_ORDER = ("torch", "mxnet", "jax", "tf")


class SourceError(DenseNetError):
    """A piece the page names is not (or no longer) where the page looks for it."""


@dataclass(frozen=True)
class Piece:
    """One object of one backend: ``module`` is a dotted module name, ``selector`` a qualified
    name (``DenseNet.b1``, ``_BN_LEAVES``) optionally followed by ``::first..last``, the
    statements of that function from the first whose source contains ``first`` to the first
    after it containing ``last`` (``::text`` alone: that one statement)."""

    module: str
    selector: str


@dataclass(frozen=True)
class Source:
    """The text of a piece as it is in its file now, dedented, with its 1-based line span."""

    piece: Piece
    path: Path
    relpath: str
    first_line: int
    last_line: int
    text: str


@dataclass(frozen=True)
class Row:
    """One piece of the book's section: a title, what the book does and each backend's code."""

    key: str
    title: str
    book: str
    cells: dict[str, tuple[Piece, ...]]


def module_file(module: str) -> tuple[Path, str]:
    """The source file of ``module`` and its path relative to the directory above its package,
    found without importing anything (``find_spec`` of a top-level package does not run it)."""
    package, _, rest = module.partition(".")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package!r} cannot be found")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root.joinpath(*rest.split(".")).with_suffix(".py") if rest else root / "__init__.py"
    if not path.is_file():
        raise SourceError(f"{module}: {path} does not exist")
    return path, path.relative_to(root.parent).as_posix()


def parse_selector(selector: str) -> tuple[str, str | None, str | None]:
    """``"A.b::x..y"`` -> ``("A.b", "x", "y")``; ``"A.b::x"`` -> ``("A.b", "x", "x")``."""
    qualname, _, span = selector.partition("::")
    if not span:
        return qualname, None, None
    first, sep, last = span.partition("..")
    return qualname, first, last if sep else first


def _named(body: list[ast.stmt], name: str) -> ast.stmt | None:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
    return None


def _start(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def find_node(tree: ast.Module, qualname: str) -> ast.stmt:
    """The definition (class, function or assignment) of ``qualname`` in a parsed module."""
    body: list[ast.stmt] = tree.body
    node: ast.stmt | None = None
    for part in qualname.split("."):
        node = _named(body, part)
        if node is None:
            raise SourceError(f"{qualname}: no definition of {part!r}")
        body = getattr(node, "body", [])
    assert node is not None
    return node


def _statement_span(node: ast.stmt, lines: list[str], first: str, last: str) -> tuple[int, int]:
    body = getattr(node, "body", None)
    if not body:
        raise SourceError("a statement span needs a function or class")

    def text(stmt: ast.stmt) -> str:
        return "\n".join(lines[_start(stmt) - 1 : stmt.end_lineno])

    start = next((i for i, s in enumerate(body) if first in text(s)), None)
    if start is None:
        raise SourceError(f"no statement containing {first!r}")
    end = next((i for i in range(start, len(body)) if last in text(body[i])), None)
    if end is None:
        raise SourceError(f"no statement containing {last!r} after the one containing {first!r}")
    return _start(body[start]), body[end].end_lineno or body[end].lineno


def extract(piece: Piece) -> Source:
    """The current source of ``piece``; :class:`SourceError` says what is missing."""
    path, relpath = module_file(piece.module)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    qualname, first, last = parse_selector(piece.selector)
    try:
        node = find_node(ast.parse(text, filename=str(path)), qualname)
        if first is None:
            start, end = _start(node), node.end_lineno or node.lineno
        else:
            start, end = _statement_span(node, lines, first, last or first)
    except SourceError as exc:
        raise SourceError(f"{relpath}: {piece.selector}: {exc}") from None
    return Source(piece, path, relpath, start, end, textwrap.dedent("\n".join(lines[start - 1 : end])))


def _cells(**per_backend: tuple[tuple[str, str], ...]) -> dict[str, tuple[Piece, ...]]:
    return {
        backend: tuple(Piece(f"densenet_{backend}.{module}", selector) for module, selector in pieces)
        for backend, pieces in per_backend.items()
    }


# The rows of the page, in the book's order; the memory-efficient dense block, which the book does not
# have, comes before the training step whose memory it changes. A selector that stops matching makes the build fail,
# naming it: the page cannot silently show stale code.
ROWS: tuple[Row, ...] = (
    Row(
        "conv-block",
        "Conv block",
        "BN, ReLU, 3x3 convolution: the layer every dense block repeats (the book's conv_block).",
        _cells(
            torch=(("model", "_batch_norm"), ("model", "ConvBlock"), ("model", "conv_block")),
            mxnet=(("model", "_batch_norm"), ("model", "ConvBlock"), ("model", "conv_block")),
            jax=(("model", "_batch_norm"), ("model", "ConvBlock"), ("model", "conv_block")),
            tf=(("model", "_batch_norm"), ("model", "ConvBlock"), ("model", "conv_block")),
        ),
    ),
    Row(
        "dense-block",
        "Dense block",
        "Each conv block sees the concatenation of the block's input and every earlier output.",
        _cells(
            torch=(("model", "DenseBlock"),),
            mxnet=(("model", "DenseBlock"),),
            jax=(("model", "DenseBlock"),),
            tf=(("model", "DenseBlock"),),
        ),
    ),
    Row(
        "transition-block",
        "Transition block",
        "BN, ReLU, 1x1 convolution to fewer channels, 2x2 average pooling: halves width and size.",
        _cells(
            torch=(("model", "TransitionBlock"), ("model", "transition_block")),
            mxnet=(("model", "TransitionBlock"), ("model", "transition_block")),
            jax=(("model", "TransitionBlock"), ("model", "transition_block")),
            tf=(("model", "TransitionBlock"), ("model", "transition_block")),
        ),
    ),
    Row(
        "stem",
        "Stem (b1)",
        "7x7/2 convolution, BN, ReLU, 3x3/2 max pooling: the ResNet stem, 96x96 down to 24x24.",
        _cells(
            torch=(("model", "DenseNet.b1"),),
            mxnet=(("model", "DenseNet.b1"),),
            jax=(("model", "DenseNet.b1"),),
            tf=(("model", "DenseNet.b1"), ("model", "MaxPoolPadded")),
        ),
    ),
    Row(
        "assembly",
        "Assembling the network",
        "Stem, then dense blocks with a transition between each pair, channel count accumulated.",
        _cells(
            torch=(("model", "DenseNet.__init__::layer = ..for i, num_convs"),),
            mxnet=(("model", "DenseNet.__init__::layer = ..for i, num_convs"),),
            jax=(("model", "DenseNet.setup"), ("model", "DenseNet.create_net::net: list..for i, num_convs")),
            tf=(("model", "DenseNet.__init__::layer = ..for i, num_convs"),),
        ),
    ),
    Row(
        "head",
        "The head",
        "BN, ReLU, global average pooling, flatten, dense: logits for any input size.",
        _cells(
            torch=(("model", 'DenseNet.__init__::"last"'),),
            mxnet=(("model", "DenseNet.__init__::last = ..self.net.add(last)"),),
            jax=(("model", "DenseNet.create_net::last = ..nn.Sequential(last)"),),
            tf=(("model", "DenseNet.__init__::last = ..tf.keras.Sequential(last)"),),
        ),
    ),
    Row(
        "memory-efficient",
        "Memory-efficient dense block (not in the book)",
        "memory_efficient=True: each dense layer keeps only its new features, and the backward pass recomputes "
        "the rest (Pleiss et al. 2017). One module per framework, memory_efficient.py, which DenseBlock calls.",
        _cells(
            torch=(
                ("memory_efficient", "forward_recomputed"),
                ("memory_efficient", "can_recompute"),
                ("memory_efficient", "_run"),
                ("memory_efficient", "_running_stats_kept"),
            ),
            mxnet=(
                ("memory_efficient", "forward_recomputed"),
                ("memory_efficient", "can_recompute"),
                ("memory_efficient", "_Recomputed"),
                ("memory_efficient", "_concat"),
                ("memory_efficient", "KeepsImperative"),
                ("memory_efficient", "HybridizesByStage"),
            ),
            jax=(
                ("memory_efficient", "forward_recomputed"),
                ("memory_efficient", "can_recompute"),
                ("memory_efficient", "_recomputed"),
                ("memory_efficient", "_dropout"),
            ),
            tf=(
                ("memory_efficient", "forward_recomputed"),
                ("memory_efficient", "can_recompute"),
                ("memory_efficient", "_recomputed_layer"),
                ("memory_efficient", "_update_moving_statistics"),
            ),
        ),
    ),
    Row(
        "training-step",
        "One training step",
        "Forward in training mode, softmax cross-entropy, gradients, one plain SGD update.",
        _cells(
            torch=(("adapter", "TorchAdapter._loss"), ("adapter", "TorchAdapter.train_step")),
            mxnet=(("adapter", "MXNetAdapter._loss_backward"), ("adapter", "MXNetAdapter.train_step")),
            jax=(("adapter", "_loss"), ("adapter", "_sgd_step"), ("adapter", "JaxAdapter.train_step")),
            tf=(
                ("adapter", "TFAdapter._loss_and_grads"),
                ("adapter", "TFAdapter.train_step"),
                ("adapter", "TFAdapter._step"),
            ),
        ),
    ),
    Row(
        "mixed-precision",
        "Mixed precision (not in the book)",
        "--precision bfloat16: convolutions and dense layers in bfloat16, weights, BatchNorm statistics and the "
        "loss in float32, each framework by its own mechanism (docs/precision.md).",
        _cells(
            torch=(("adapter", "TorchAdapter.autocast"), ("adapter", "TorchAdapter._loss")),
            mxnet=(("adapter", "_use_amp"), ("adapter", "_check_amp"), ("adapter", "_float32")),
            jax=(
                ("adapter", "compute_cast"),
                ("adapter", "_batch_norm_as_products::dtype = jnp.promote_types..return Y"),
            ),
            tf=(
                ("adapter", "TFAdapter.build"),
                ("adapter", "_logits"),
            ),
        ),
    ),
    Row(
        "weights",
        "The weight mapping",
        "Every framework's tensors paired, in forward order, with one canonical name and layout.",
        _cells(
            torch=(("adapter", "TorchAdapter._layers"), ("adapter", "TorchAdapter._layer_tensors")),
            mxnet=(
                ("adapter", "_BN_LEAVES"),
                ("adapter", "MXNetAdapter._layers"),
                ("adapter", "MXNetAdapter._layer_tensors"),
            ),
            jax=(
                ("adapter", "_BN_LEAVES"),
                ("adapter", "JaxAdapter._layers"),
                ("adapter", "JaxAdapter._layer_tensors"),
            ),
            tf=(("adapter", "_BN_LEAVES"), ("adapter", "TFAdapter._layers"), ("adapter", "TFAdapter._layer_tensors")),
        ),
    ),
)
