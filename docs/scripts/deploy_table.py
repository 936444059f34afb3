"""The table of docs/deploy.md: every backend's ONNX and native export of one weight file, each
exported by ``densenet export`` and then loaded and checked in a fresh process (size, load time,
worst error against the float64 oracle and its bound, img/s), and what each ONNX exporter wrote
(the graph's operators, counted). Run it alone on an idle machine: the img/s column is a benchmark.

    .venv/bin/python docs/scripts/deploy_table.py --weights runs/torch-recipe/weights.safetensors \
        --input-size 96 --speed-batch 64 --threads 2 --json docs/results/deploy.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common.deploy.check import check_in_child
from common.deploy.export import read_manifest

BACKENDS = ("torch", "tf", "jax", "mxnet")
FORMATS = ("onnx", "native")
# The operators that show what an exporter did to the book's layers.
SHOWN = (
    "Conv",
    "BatchNormalization",
    "Mul",
    "Add",
    "Sub",
    "Relu",
    "Max",
    "Transpose",
    "Pad",
    "Concat",
    "Gemm",
    "MatMul",
)


def _ops(path: Path) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _onnx_pairs(root: Path, backends: list[str], args: argparse.Namespace) -> list[dict]:
    """The ONNX files against each other, all run by ONNX Runtime on the check's inputs."""
    from common.config import DenseNetConfig
    from common.deploy.check import BATCH_SIZES, relative_error, seeded_images
    from common.deploy.runtime import runner
    from common.verify.parity import bound

    runs = {b: runner(root / f"{b}-onnx", read_manifest(root / f"{b}-onnx"), args.threads) for b in backends}
    if not runs:
        return []
    config = DenseNetConfig.from_dict(read_manifest(root / f"{backends[0]}-onnx")["config"])
    out = []
    for a, b in itertools.combinations(backends, 2):
        error = 0.0
        for batch in BATCH_SIZES:
            X = seeded_images(config, args.input_size, batch)
            error = max(error, relative_error(runs[a](X), runs[b](X).astype("float64")))
        out.append({"a": a, "b": b, "error": error, "bound": bound("inference", "float32", pairwise=True)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-table-") as tmp:
        for backend in BACKENDS:
            for fmt in FORMATS:
                out = Path(tmp) / f"{backend}-{fmt}"
                command = [sys.executable, "-m", "common", "export", "--backend", backend, "--format", fmt]
                command += ["--weights", args.weights, "--out", str(out), "--input-size", str(args.input_size)]
                command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    rows.append({"backend": backend, "format": fmt, "error": done.stderr.strip().splitlines()[-1]})
                    print(f"{backend} {fmt}: {rows[-1]['error']}", file=sys.stderr)
                    continue
                manifest = read_manifest(out)
                report = check_in_child(out, args.weights, args.threads, args.speed_batch)
                worst = max(report["cases"], key=lambda c: c["error"])
                row = {
                    "backend": backend,
                    "format": fmt,
                    "what": manifest["native_format"] or f"ONNX opset {manifest['opset']}",
                    "exporter": manifest["exporter"],
                    "bytes": sum(manifest["files"].values()),
                    "export_s": manifest["export_seconds"],
                    "load_s": report["load_seconds"],
                    "error": worst["error"],
                    "bound": worst["bound"],
                    "ok": report["ok"],
                    "images_per_s": report["images_per_s"],
                }
                if fmt == "onnx":
                    row["ops"] = _ops(out / manifest["artefact"])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        pairs = _onnx_pairs(Path(tmp), [r["backend"] for r in rows if r["format"] == "onnx" and "ops" in r], args)
    print("| backend | format | exporter | size | load s | worst error (bound) | img/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r and "bound" not in r:
            print(f"| {r['backend']} | {r['format']} | failed: {r['error']} | | | | |")
            continue
        print(
            f"| {r['backend']} | {r['what']} | {r['exporter']} | {r['bytes'] / 2**20:.2f} MiB | {r['load_s']:.2f} | "
            f"{r['error']:.2e} ({r['bound']:.2e}) | {r['images_per_s']:,.0f} |"
        )
    print()
    print("| ONNX from | " + " | ".join(SHOWN) + " | other |")
    print("|---|" + "---|" * (len(SHOWN) + 1))
    for r in rows:
        if "ops" in r:
            other = {k: v for k, v in r["ops"].items() if k not in SHOWN}
            cells = [str(r["ops"].get(op, 0)) for op in SHOWN]
            print(
                f"| {r['backend']} | "
                + " | ".join(cells)
                + " | "
                + ", ".join(f"{k} {v}" for k, v in sorted(other.items()))
                + " |"
            )
    print()
    print("| ONNX files | worst difference of the logits (bound) |")
    print("|---|---|")
    for p in pairs:
        print(f"| {p['a']} and {p['b']} | {p['error']:.2e} ({p['bound']:.2e}) |")
    if args.json:
        record = {"settings": vars(args), "rows": rows, "onnx_pairs": pairs}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
