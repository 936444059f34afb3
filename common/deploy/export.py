"""``densenet export``: one backend's network, from canonical weights, written for a serving runtime.

Each export is a new directory holding the artefact and ``densenet-export.json`` (the manifest:
backend, format, exporter and its version, opset, input layout and shape, the network's
configuration, the weights it came from). Formats:

- ``onnx``: ONNX through the framework's own exporter (``torch.onnx.export``, tf2onnx for Keras,
  ``jax2tf`` + tf2onnx for Flax, ``mx.onnx.export_model`` for Gluon);
- ``native``: the framework's own serving format (``torch.export`` ``.pt2``, a TensorFlow
  SavedModel, ``jax.export`` serialized StableHLO, a Gluon symbol + params pair);
- ``onnx-int8``: the ``onnx`` export quantised by ONNX Runtime (:mod:`common.deploy.quantize`).

Every artefact is in inference mode (BatchNorm with its running statistics), float32, for images of
one size and any batch size, in its framework's layout (NCHW for PyTorch and MXNet, NHWC for Keras
and Flax). The directory is written beside its final place and renamed into it, so a failed or
interrupted export leaves nothing behind, and an existing path is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from common.adapter import Adapter
from common.arch import min_input_size
from common.config import DenseNetConfig
from common.errors import DenseNetError, Failed, InputError
from common.weights.canonical import RUNNING_VAR

__all__ = ["DEFAULT_OPSET", "FORMATS", "MANIFEST", "ExportError", "export", "read_manifest"]

FORMATS = ("onnx", "native", "onnx-int8")
MANIFEST = "densenet-export.json"
DEFAULT_OPSET = 18  # the newest opset all three ONNX exporters that take one write without complaint
SCHEMA = 1


class ExportError(Failed):
    """An exporter failed on the network: the message names the exporter and its own error."""


def _layout_shape(adapter: Adapter, config: DenseNetConfig, image_size: int, batch: int) -> tuple[int, ...]:
    c = config.in_channels
    return (batch, c, image_size, image_size) if adapter.layout == "NCHW" else (batch, image_size, image_size, c)


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise InputError(f"--out {out} exists; name a new directory (an export never replaces a path)")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the directory {out.parent} does not exist")


def export(
    adapter: Adapter,
    config: DenseNetConfig,
    weights: dict[str, np.ndarray],
    fmt: str,
    out: str | os.PathLike,
    *,
    image_size: int,
    opset: int = DEFAULT_OPSET,
    source: dict[str, Any] | None = None,
    calibration: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``adapter``'s network with ``weights`` as ``fmt`` into the new directory ``out``;
    returns the manifest written beside the artefact. ``onnx-int8`` quantises the backend's ONNX
    export, calibrated on ``calibration`` (NCHW float32 images of ``image_size``)."""
    if fmt == "onnx-int8" and (calibration is None or not len(calibration)):
        raise InputError("onnx-int8 needs calibration images")
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if image_size < min_input_size(config):
        raise InputError(
            f"--input-size {image_size} is too small for DenseNet {config.describe()}: "
            f"it needs at least {min_input_size(config)}"
        )
    out = Path(out)
    _check_out(out)
    module = adapter.exporter()
    model = adapter.build(config)
    adapter.set_weights(model, weights)
    # The example batch the exporters trace with; the artefacts take any batch size.
    shape = _layout_shape(adapter, config, image_size, 2)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        start = time.perf_counter()
        try:
            if fmt == "onnx":
                info = module.export_onnx(model, staging, shape, opset)
            elif fmt == "onnx-int8":
                info = _int8(module, model, staging, shape, opset, calibration, adapter.layout)
            else:
                info = module.export_native(model, staging, shape)
        except DenseNetError:
            raise
        except Exception as e:  # the exporter's own failure, reported with its words
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"{adapter.name} {fmt} export failed: {type(e).__name__}: {first}") from e
        seconds = time.perf_counter() - start
        manifest = {
            "schema": SCHEMA,
            "backend": adapter.name,
            "framework": f"{adapter.framework} {adapter.version()}",
            "format": fmt,
            "native_format": module.NATIVE_FORMAT if fmt == "native" else None,
            "exporter": info["exporter"],
            "opset": info.get("opset", opset) if fmt != "native" else None,
            "quantization": info.get("quantization"),
            "artefact": info["files"][0],
            # Everything the exporter wrote (an exporter may add files beside the one it was asked for).
            "files": {p.name: _size(p) for p in sorted(staging.iterdir())},
            "layout": adapter.layout,
            "input": {"shape": [None, *shape[1:]], "dtype": "float32"},
            "output": {"shape": [None, config.num_classes], "what": "logits"},
            "config": config.to_dict(),
            "weights": source or {},
            "export_seconds": round(seconds, 3),
        }
        if fmt != "native":
            manifest["input"]["name"] = _stamp(staging / manifest["artefact"], manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _int8(module, model, staging: Path, shape, opset: int, calibration: np.ndarray, layout: str) -> dict[str, Any]:
    from common.deploy.quantize import quantize

    float_dir = staging / "float32"
    float_dir.mkdir()
    info = module.export_onnx(model, float_dir, shape, opset)
    try:
        quantization = quantize(float_dir / info["files"][0], staging / "model.onnx", calibration, layout)
    finally:
        shutil.rmtree(float_dir)
    return {**info, "files": ["model.onnx"], "quantization": quantization}


def _stamp(path: Path, manifest: dict[str, Any]) -> str:
    """Say in the ONNX file itself what it holds (``metadata_props``), for whoever gets the file
    without its manifest: ``densenet convert --from-format onnx`` reads the running-variance
    convention from it. Returns the graph's input name (each exporter picks its own)."""
    import onnx

    model = onnx.load(str(path))
    props = {
        "densenet.backend": manifest["backend"],
        "densenet.config": json.dumps(manifest["config"]),
        "densenet.layout": manifest["layout"],
        "densenet.running_var": manifest["weights"].get("running_var", RUNNING_VAR),
    }
    if not model.producer_name:  # MXNet's exporter leaves it empty
        model.producer_name, _, model.producer_version = manifest["framework"].rpartition(" ")
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return model.graph.input[0].name


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export directory; a clear error where there is none."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not an export directory (`densenet export --out DIR` writes one)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{directory} holds no {MANIFEST}; it was not written by `densenet export`") from None
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"{path}: manifest schema {manifest.get('schema')!r}, expected {SCHEMA}")
    return manifest
