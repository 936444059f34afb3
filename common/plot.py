"""Training curves of one or several runs in one figure (``densenet plot RUN_DIR...``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.errors import DenseNetError


def read_metrics(run: str | os.PathLike) -> tuple[str, list[dict]]:
    """A run's label (its backend and directory) and its per-epoch metrics."""
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise DenseNetError(f"{run} is not a run directory: {path} does not exist")
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    label = run.name
    info = run / "run.json"
    if info.is_file():
        settings = json.loads(info.read_text())["settings"]
        label = f"{settings['backend']} ({run.name})"
    return label, metrics


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Train loss, test loss and test accuracy per epoch, one line per run, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label, metrics = read_metrics(run)
        epochs = [m["epoch"] for m in metrics]
        (line,) = ax_loss.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label=f"{label} train")
        ax_loss.plot(epochs, [m["test_loss"] for m in metrics], ls="--", color=line.get_color(), label=f"{label} test")
        ax_acc.plot(epochs, [m["test_acc"] for m in metrics], marker="o", color=line.get_color(), label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)  # atomic, like every other artefact
    return out
