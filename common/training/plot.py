"""Training curves of one or several runs in one figure (``densenet plot RUN_DIR...``).

matplotlib is optional (the ``cli`` extra): without it, :class:`PlotUnavailable` says how to get it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import DenseNetError, Failed

__all__ = ["PlotUnavailable", "figure", "plot_bench", "plot_runs", "read_metrics"]


class PlotUnavailable(Failed):
    """matplotlib is not installed."""


def read_metrics(run: str | os.PathLike) -> tuple[str, list[dict]]:
    """A run's label (its backend and directory) and its per-epoch metrics.

    A directory without ``metrics.jsonl``, a line that is not JSON (a truncated file) or an
    unreadable ``run.json`` is a :class:`DenseNetError` naming the file.
    """
    run = Path(run)
    path = run / "metrics.jsonl"
    if not run.is_dir():
        raise DenseNetError(f"{run} is not a run directory: it does not exist or is not a directory")
    if not path.is_file():
        raise DenseNetError(f"{run} is not a run directory: {path} does not exist")
    metrics = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise DenseNetError(f"{path} line {number} is not valid JSON (a truncated file?): {line[:60]!r}") from None
        if not isinstance(value, dict) or not {"epoch", "train_loss", "test_loss", "test_acc"} <= set(value):
            raise DenseNetError(f"{path} line {number} is not an epoch's metrics: {line[:60]!r}")
        metrics.append(value)
    if not metrics:
        raise DenseNetError(f"{path} holds no finished epoch")
    label = run.name
    info = run / "run.json"
    if info.is_file():
        try:
            label = f"{json.loads(info.read_text())['settings']['backend']} ({run.name})"
        except (ValueError, KeyError, TypeError):
            pass  # the curves do not need it: label the run by its directory
    return label, metrics


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "drawing curves needs matplotlib, which is not installed: pip install 'densenet-suite[cli]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(runs: list[str | os.PathLike]) -> Any:
    """The matplotlib figure of :func:`plot_runs` (every line drawn with markers, so a run of one
    epoch shows its points)."""
    plt = _pyplot()
    data = [read_metrics(run) for run in runs]  # every run checked before drawing any
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, metrics in data:
        epochs = [m["epoch"] for m in metrics]
        (line,) = ax_loss.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label=f"{label} train")
        ax_loss.plot(
            epochs,
            [m["test_loss"] for m in metrics],
            ls="--",
            marker="s",
            color=line.get_color(),
            label=f"{label} test",
        )
        ax_acc.plot(epochs, [m["test_acc"] for m in metrics], marker="o", color=line.get_color(), label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Train loss, test loss and test accuracy per epoch, one line per run, written as a PNG."""
    out = Path(out)
    if out.is_dir():
        raise DenseNetError(f"--out {out} is a directory; name the PNG file to write")
    if not out.parent.is_dir():
        raise DenseNetError(f"--out {out}: the directory {out.parent} does not exist")
    fig = figure(runs)
    plt = _pyplot()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)  # atomic, like every other artefact
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _save(fig: Any, out: Path) -> Path:
    plt = _pyplot()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def plot_bench(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """``densenet bench --plot``: images per second (with the spread of the timed steps) and peak
    memory of every case, one bar each, training and inference side by side; failed and n/a cases
    are named with no bar."""
    out = Path(out)
    if out.is_dir():
        raise DenseNetError(f"--plot {out} is a directory; name the PNG file to write")
    if not out.parent.is_dir():
        raise DenseNetError(f"--plot {out}: the directory {out.parent} does not exist")
    plt = _pyplot()
    batch = report["settings"]["batch_size"]
    phases = [p for p in ("train", "inference") if any(r["phase"] == p for r in report["rows"])]
    fig, axes = plt.subplots(len(phases), 2, figsize=(11, 1.8 * len(phases) + 0.3 * len(report["rows"])), squeeze=False)
    for (ax_speed, ax_mem), phase in zip(axes, phases):
        rows = [r for r in report["rows"] if r["phase"] == phase]
        labels = [
            f"{r['backend']} {r['mode']}"
            + (f" {r['precision']}" if r.get("precision", "float32") != "float32" else "")
            + (" (failed)" if "error" in r else " (n/a)" if "not_applicable" in r else "")
            for r in rows
        ]
        ok = ["median_s" in r for r in rows]  # measured: neither failed nor n/a (a case the backend lacks)
        speed = [r["images_per_s"] if good else 0 for r, good in zip(rows, ok)]
        # images/s at the slowest and fastest timed step: the spread around the median's figure.
        low = [s - batch / r["max_s"] if good else 0 for r, s, good in zip(rows, speed, ok)]
        high = [batch / r["min_s"] - s if good else 0 for r, s, good in zip(rows, speed, ok)]
        y = list(range(len(rows)))
        ax_speed.barh(y, speed, xerr=[low, high], color="tab:blue", capsize=3)
        ax_speed.set(yticks=y, yticklabels=labels, xlabel="images/s (median step; bars: slowest-fastest)")
        ax_speed.set_title(f"{phase}: speed")
        ax_mem.barh(y, [r["peak_mb"] if good else 0 for r, good in zip(rows, ok)], color="tab:orange")
        ax_mem.set(yticks=y, yticklabels=[], xlabel="peak resident memory of the process (MiB)")
        ax_mem.set_title(f"{phase}: memory")
        for ax in (ax_speed, ax_mem):
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
    s = report["settings"]
    fig.suptitle(
        f"densenet bench: {s['config']['describe']}, batch {s['batch_size']} at "
        f"{s['input_size'][0]}x{s['input_size'][1]}" + (", memory-efficient" if s["memory_efficient"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out)
