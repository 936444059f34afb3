"""``densenet init`` and ``densenet convert``: canonical weight files from the command line.

``init`` writes a seeded canonical initialisation; ``convert`` reads a canonical file, passes the
tensors through each named backend in turn (load with ``set_weights``, export with
``get_weights``), insists that every round trip is bit-identical, and writes the result in the
format the output suffix names (``.safetensors`` or ``.npz``). ``--from-format`` reads a peer's
weight file or an ONNX DenseNet (common.deploy.onnx_import) instead of a canonical file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from common.arch import count_bn_stats, count_params
from common.cli.options import add_config_options, backend_names, config_from_args, config_options_given, seed
from common.config import CONFIGS, DenseNetConfig, named_config
from common.deploy.onnx_import import confirm_config, read_onnx
from common.errors import BackendError, Interrupted, WeightFileError
from common.registry import BACKENDS, load_backend
from common.weights import peers
from common.weights.canonical import init_canonical, load_canonical, save_weights
from common.weights.safetensors_io import SUFFIXES, read_weights, write_weights

__all__ = ["GluonZoo", "add_convert", "add_init", "add_parsers", "cmd_convert", "cmd_init"]

# ONNX is read (any exporter's DenseNet graph, common.deploy.onnx_import), not written here:
# `densenet export` writes it.
FROM_FORMATS = ("canonical", *peers.FORMATS, "onnx")
TO_FORMATS = ("canonical", *peers.FORMATS)


@runtime_checkable
class GluonZoo(Protocol):
    """A backend that can name the Gluon model zoo's parameters (the MXNet adapter)."""

    def gluon_zoo_names(self, name: str, num_classes: int) -> list[str]: ...


def add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a seeded canonical weight file (.safetensors or .npz)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file; the suffix picks the format")
    p.add_argument("--seed", type=seed, default=0, help="initialisation seed")
    add_config_options(p)
    p.set_defaults(func=cmd_init)


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="round-trip a canonical weight file through backends and write it (.safetensors <-> .npz)",
    )
    p.add_argument(
        "--from", dest="src", required=True, metavar="FILE", help="weight file to read (--from-format names its layout)"
    )
    p.add_argument("--to", dest="dst", required=True, metavar="FILE", help="file to write; the suffix picks the format")
    p.add_argument(
        "--backend",
        dest="backends",
        action="append",
        default=[],
        metavar="NAME",
        help=f"pass the weights through this backend ({', '.join(BACKENDS)}); repeatable or comma-separated, "
        "applied in order; none: only convert the file format",
    )
    p.add_argument("--from-format", default="canonical", help=f"layout of --from: {', '.join(FROM_FORMATS)}")
    p.add_argument("--to-format", default="canonical", help=f"layout of --to: {', '.join(TO_FORMATS)}")
    add_config_options(
        p,
        title="network the file holds (default: what a canonical file records, or what a peer file's tensors "
        "show; --config and these options state or adjust it, e.g. --config densenet121 --num-classes 10)",
    )
    p.set_defaults(func=cmd_convert)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``init`` and ``convert`` subcommands to ``sub`` (an ``add_subparsers()`` object)."""
    add_init(sub)
    add_convert(sub)


def _file_size(path: str | os.PathLike) -> str:
    try:
        return f"{os.path.getsize(path):,} bytes"
    except OSError:
        return "size unknown"


def cmd_init(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    weights = init_canonical(config, args.seed)
    save_weights(args.out, weights, config, source="numpy-init")
    print(f"DenseNet {config.describe()}")
    print(
        f"wrote {args.out}: {len(weights)} tensors, {count_params(config):,} parameters + "
        f"{count_bn_stats(config):,} BatchNorm statistics, seed {args.seed}, {_file_size(args.out)}"
    )
    return 0


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass  # one of them does not exist (yet)
    return a.resolve() == b.resolve()


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
    """Names whose exported tensor is not bit-for-bit the one loaded (with the largest difference)."""
    out = []
    for k, a in before.items():
        b = after.get(k)
        if b is None:
            out.append(f"{k} (missing from the export)")
        elif a.shape != b.shape or b.dtype != np.float32:
            out.append(f"{k} (exported as {b.dtype} {b.shape}, loaded float32 {a.shape})")
        elif not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            n = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
            out.append(f"{k} ({n} of {a.size} values differ, max |difference| {np.nanmax(diff):.3g})")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if _same_file(src, dst):
        raise WeightFileError(f"--to {dst} is the input file; write the conversion to another file")
    if dst.suffix.lower() not in SUFFIXES:
        raise WeightFileError(
            f"{dst}: unsupported weight file suffix {dst.suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}"
        )
    if dst.is_dir():
        raise WeightFileError(f"--to {dst} is a directory; name the file to write")
    if not dst.parent.is_dir():
        raise WeightFileError(f"--to {dst}: the directory {dst.parent} does not exist")
    for fmt, known in ((args.from_format, FROM_FORMATS), (args.to_format, TO_FORMATS)):
        if fmt not in known:
            raise WeightFileError(f"unknown format {fmt!r}; expected one of {', '.join(known)}")
    names = [n for text in args.backends for n in backend_names(text)]
    adapters = [load_backend(n) for n in names]  # refuse unknown or missing backends before any work
    try:
        return _convert(args, src, dst, adapters)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; nothing written to {dst}") from None


def _convert(args: argparse.Namespace, src: Path, dst: Path, adapters: list) -> int:
    if args.from_format == "canonical":
        # Network options state what the file must hold; the file's own record is the configuration.
        found = load_canonical(src, config_from_args(args) if config_options_given(args) else None)
        config, weights = found.config, found.weights
        source = found.metadata.get("source", "unknown")
        running_var = found.metadata["running_var"]  # load_canonical requires it
    elif args.from_format == "onnx":
        config, weights, metadata = _read_onnx(src, args)
        source, running_var = metadata["source"], metadata["running_var"]
    else:
        config, weights = _read_peer(src, args.from_format, args)
        source = args.from_format
        # Keras and Gluon feed their running variances the biased batch variance; the values are
        # kept as they are (inference reads them as they are everywhere) and the file says so.
        running_var = "unbiased" if args.from_format == "torchvision" else "biased"
    print(f"DenseNet {config.describe()}")
    print(
        f"read  {src}: {len(weights)} tensors, {count_params(config):,} parameters + "
        f"{count_bn_stats(config):,} BatchNorm statistics, {_file_size(src)} (source: {source})"
    )
    if args.from_format == "onnx":
        print(f"running variances: {running_var} ({metadata['running_var_basis']})")
    for adapter in adapters:
        model = adapter.build(config)
        adapter.set_weights(model, weights)
        exported = adapter.get_weights(model)
        changed = _changed(weights, exported)
        label = f"{adapter.name} {adapter.version()}"
        if changed:
            print(
                f"FAILED: {label} round trip changed {len(changed)} of {len(weights)} tensor(s):\n  "
                + "\n  ".join(changed)
                + f"\nnothing written to {dst}",
                file=sys.stderr,
            )
            return 1
        print(f"{label}: round trip bit-identical ({len(weights)} tensors)")
        weights, source = {k: exported[k] for k in weights}, adapter.name
    if args.to_format == "canonical":
        save_weights(dst, weights, config, source=source, running_var=running_var)
    else:
        tensors = _to_peer(weights, config, args.to_format)
        metadata = {"format": f"{args.to_format} (exported by densenet-suite)", "config": json.dumps(config.to_dict())}
        write_weights(tensors, dst, metadata)
        weights = tensors
    print(f"wrote {dst}: {len(weights)} tensors in {args.to_format} layout, {_file_size(dst)} (source: {source})")
    return 0


def _read_peer(src: Path, fmt: str, args: argparse.Namespace) -> tuple[DenseNetConfig, dict[str, np.ndarray]]:
    """A peer's weights, saved as safetensors or npz under the peer's own names.

    The configuration is the one the tensors show (``peers.infer_config``), or ``--config``, with
    any network option applied on top (``--num-classes 10`` for a fine-tuned head).
    """
    tensors, _ = read_weights(src)
    if args.config:
        base = named_config(args.config)
    else:
        base = peers.infer_config(list(tensors), {k: v.shape for k, v in tensors.items()}, fmt)
    # --config is already in base; what remains are the field options, applied on top.
    config = config_from_args(argparse.Namespace(**{**vars(args), "config": None}), default=base)
    convert = {"torchvision": peers.from_torchvision, "keras": peers.from_keras, "gluon": peers.from_gluon}[fmt]
    return config, convert(tensors, config)


def _read_onnx(src: Path, args: argparse.Namespace) -> tuple[DenseNetConfig, dict[str, np.ndarray], dict[str, str]]:
    """An ONNX DenseNet's weights; ``--config`` and the network options state what it must hold."""
    config, weights, metadata = read_onnx(src)
    if config_options_given(args):
        config = confirm_config(src, config, config_from_args(args, default=config))
    return config, weights, metadata


def _to_peer(weights: dict[str, np.ndarray], config: DenseNetConfig, fmt: str) -> dict[str, np.ndarray]:
    if fmt == "torchvision":
        return peers.to_torchvision(weights, config)
    if fmt == "keras":
        return peers.to_keras(weights, config)
    # Gluon's parameter names come from the model zoo itself, so the MXNet backend must load. The
    # zoo builds any number of classes, and its first convolution takes any number of channels.
    zoo_like = config.replace(num_classes=1000, in_channels=3)
    name = next((n for n, c in CONFIGS.items() if c == zoo_like and n != "d2l"), None)
    if name is None:
        raise WeightFileError(
            f"gluon export needs one of the model zoo's networks (densenet121 ...), not {config.describe()}"
        )
    zoo = load_backend("mxnet")
    if not isinstance(zoo, GluonZoo):
        raise BackendError("the mxnet backend cannot name the Gluon model zoo's parameters")
    return peers.to_gluon(weights, config, zoo.gluon_zoo_names(name, config.num_classes))
