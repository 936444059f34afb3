"""``densenet export``: a backend's network, from a weight file, as ONNX or the framework's own
serving format, checked against the float64 oracle in a fresh process (``--check``)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import data
from common.cli.options import add_config_options, config_from_args, config_options_given, positive_int
from common.data.pipeline import sha256
from common.deploy import check as deploy_check
from common.deploy.export import DEFAULT_OPSET, FORMATS, export
from common.errors import Failed, InputError
from common.process import threads
from common.registry import BACKENDS, load_backend
from common.weights.canonical import RUNNING_VAR, save_weights
from common.weights.starting import FORMATS as WEIGHT_FORMATS
from common.weights.starting import read_init

__all__ = ["add_export", "cmd_export"]


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a backend's network as ONNX or its framework's serving format (docs/deploy.md)",
        description="Builds the network in --backend from --weights and writes it, in inference mode, for images of "
        "--input-size and any batch size, into the new directory --out with a manifest (densenet-export.json).",
    )
    p.add_argument("--backend", required=True, help=", ".join(BACKENDS))
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx: through the framework's own ONNX exporter; native: torch.export .pt2, a TensorFlow "
        "SavedModel, jax.export StableHLO, a Gluon symbol + params pair; onnx-int8: the ONNX export quantised "
        "by ONNX Runtime (static, calibrated on Fashion-MNIST training images)",
    )
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=512,
        help="onnx-int8: training images (a seeded sample of Fashion-MNIST's) the activation ranges are taken over",
    )
    p.add_argument("--data-dir", help="onnx-int8: Fashion-MNIST's four .gz files (default: found or downloaded)")
    p.add_argument("--weights", required=True, metavar="FILE", help="weight file to export")
    p.add_argument("--weights-format", choices=WEIGHT_FORMATS, default="canonical", help="layout of --weights")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create (never an existing path)")
    p.add_argument("--input-size", type=positive_int, default=96, help="image side the artefact takes")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help="ONNX opset (MXNet writes 13)")
    p.add_argument(
        "--check",
        action="store_true",
        help="load the artefact in a fresh process and compare it with the float64 oracle at two batch sizes",
    )
    p.add_argument("--json", action="store_true", help="print the manifest (and the check) as JSON")
    add_config_options(p, title="network the file must hold (default: whatever it holds)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.check and args.format == "onnx-int8":
        raise InputError(
            "an int8 model has no float32 error model to check against; judge it by its accuracy: "
            "densenet evaluate --runtime onnxruntime --weights DIR"
        )
    adapter = load_backend(args.backend)  # an unknown or missing backend is refused before any work
    found = read_init(args.weights, args.weights_format)
    config = found.config
    if config_options_given(args):
        config = config_from_args(args, default=config)
    source = {"path": str(Path(args.weights).resolve()), "format": args.weights_format, "sha256": sha256(args.weights)}
    source["running_var"] = found.metadata.get("running_var", RUNNING_VAR)
    manifest = export(
        adapter,
        config,
        found.weights,
        args.format,
        args.out,
        image_size=args.input_size,
        opset=args.opset,
        source=source,
        calibration=_calibration(args, config) if args.format == "onnx-int8" else None,
    )
    result: dict[str, object] = {"manifest": manifest}
    if not args.json:
        size = sum(manifest["files"].values())
        what = manifest["native_format"] or f"ONNX opset {manifest['opset']}"
        print(
            f"wrote {args.out}: {adapter.name} {args.format} ({what}) "
            f"by {manifest['exporter']}, {size / 2**20:.1f} MiB, {manifest['export_seconds']:.1f} s"
        )
    if args.check:
        report = _check(args.out, found.weights, config)
        result["check"] = report
        if not args.json:
            for case in report["cases"]:
                print(
                    f"check (fresh process, loaded in {report['load_seconds']:.2f} s): batch {case['batch']}: "
                    f"error {case['error']:.3g} of the logits' scale, bound {case['bound']:.3g} "
                    f"({'margin ' + format(case['margin'], '.1f') + 'x' if case['margin'] else 'exact'})"
                )
    if args.json:
        print(json.dumps(result))
    if args.check and not result["check"]["ok"]:  # type: ignore[index]
        raise Failed(f"{args.out} is further from the float64 oracle than the float32 error model allows")
    return 0


def _calibration(args: argparse.Namespace, config) -> np.ndarray:
    """A seeded sample of Fashion-MNIST's training images at the export's size (NCHW float32)."""
    train = data.load("train", args.data_dir)
    n = min(args.calibration_images, len(train.labels))
    chosen = np.sort(np.random.default_rng(0).choice(len(train.labels), n, replace=False))
    sample = data.Split(train.images[chosen], train.labels[chosen])
    return np.concatenate(
        [X for X, _ in data.batches(sample, 256, args.input_size, shuffle=False, channels=config.in_channels)]
    )


def _check(directory: str, weights: dict, config) -> dict:
    # The child reads canonical weights; --weights may be a peer's file, so it gets a canonical copy.
    with tempfile.TemporaryDirectory(prefix="densenet-check-") as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_weights(path, weights, config, source="densenet export --check")
        report = deploy_check.check_in_child(directory, path, threads.current())
    if not report["ok"]:
        print(f"{directory}: FAILED the check", file=sys.stderr)
    return report
