"""Training on Fashion-MNIST, the same loop for every backend (the step itself is each
framework's own: ``Adapter.train_step``).

A run directory holds ``run.json`` (settings and versions), ``metrics.jsonl`` (one line per
epoch), ``checkpoint.safetensors`` (canonical weights after the last finished epoch, written
atomically), ``weights.safetensors`` (the final weights, loadable by any backend) and
``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import data
from common.adapter import Adapter, Model
from common.config import DenseNetConfig, plan
from common.errors import DenseNetError
from common.registry import load_backend
from common.weights import load_canonical, save_weights


class TrainingError(DenseNetError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


@dataclass
class TrainSettings:
    """The book's recipe by default: batch 128, plain SGD at 0.01, 10 epochs, 96x96."""

    backend: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    resize: int = 96
    limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    config: DenseNetConfig = field(default_factory=DenseNetConfig)
    # "constant" (the book) or "cosine": lr * (1 + cos(pi * step / total)) / 2, annealed every step.
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise TrainingError(f"the learning rate must be positive, got {self.lr}")

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    # Settings a resumed run must share with the run it continues (epochs may grow).
    RESUMABLE_DIFFERENCES = ("epochs",)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(adapter: Adapter, model: Model, split: data.Split, batch_size: int, resize: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in inference mode over a whole split."""
    total_loss, correct = 0.0, 0
    for X, y in data.batches(split, batch_size, resize, shuffle=False):
        logits = adapter.forward(model, X, compiled=adapter.prefers_compiled).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss += float(-log_p[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return total_loss / len(split.labels), correct / len(split.labels)


def train(
    settings: TrainSettings,
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train (or continue) a run; returns the metrics of every epoch."""
    out = Path(out)
    adapter = load_backend(settings.backend)
    config = settings.config
    if config.in_channels != 1 or config.num_classes != 10:
        raise TrainingError("Fashion-MNIST needs in_channels=1 and num_classes=10")
    plan(config, settings.resize)  # refuses a resize too small for the network
    train_split = data.subset(data.load("train", data_dir), settings.limit)
    test_split = data.subset(data.load("test", data_dir), settings.test_limit)

    model = adapter.build(config, seed=settings.seed)
    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = out / "checkpoint.safetensors"
    if resume:
        if not checkpoint.exists():
            raise TrainingError(f"--resume: {checkpoint} does not exist")
        found = load_canonical(checkpoint, config)
        saved = json.loads(found.metadata.get("settings", "{}"))
        differs = [
            k
            for k, v in settings.to_dict().items()
            if k not in TrainSettings.RESUMABLE_DIFFERENCES and saved.get(k) != v
        ]
        if differs:
            raise TrainingError(
                f"--resume: {checkpoint} was written with other settings ({', '.join(differs)}); "
                "resume with the same options or start a new --out"
            )
        adapter.set_weights(model, found.weights)
        start_epoch = int(found.metadata["epoch"])
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:start_epoch]
    else:
        out.mkdir(parents=True, exist_ok=True)
    run_info = {"settings": settings.to_dict(), "framework": adapter.framework, "version": adapter.version()}
    _write_atomic(out / "run.json", json.dumps(run_info, indent=2) + "\n")

    steps = math.ceil(len(train_split.labels) / settings.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.epochs * steps, initial=start_epoch * steps, unit="batch", dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, settings.epochs):
            if bar is not None:
                bar.set_description(f"{adapter.name} epoch {epoch + 1}/{settings.epochs}")
            started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            for step, (X, y) in enumerate(
                data.batches(train_split, settings.batch_size, settings.resize, seed=settings.seed, epoch=epoch)
            ):
                lr = settings.lr_at(epoch * steps + step, settings.epochs * steps)
                loss, logits = adapter.train_step(model, X, y, lr, compiled=adapter.prefers_compiled)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at epoch {epoch + 1}, step {step + 1} "
                        f"(learning rate {lr:g}); stopped instead of training on garbage. "
                        f"The checkpoint of epoch {epoch} in {out} is intact; try a lower --lr"
                    )
                seen += len(y)
                loss_sum += loss * len(y)
                correct += int((logits.argmax(axis=1) == y).sum())
                if bar is not None:
                    rate = seen / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
                    bar.update(1)
            train_seconds = time.perf_counter() - started
            test_loss, test_acc = evaluate(adapter, model, test_split, 256, settings.resize)
            metrics.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / seen,
                    "train_acc": correct / seen,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "images_per_s": seen / train_seconds,
                    "seconds": time.perf_counter() - started,
                }
            )
            if bar is not None:
                bar.write(
                    f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}, "
                    f"test loss {test_loss:.4f} acc {test_acc:.4f}, {seen / train_seconds:.0f} img/s"
                )
            _write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
            save_weights(
                checkpoint,
                adapter.get_weights(model),
                config,
                source=adapter.name,
                extra_metadata={"epoch": str(epoch + 1), "settings": json.dumps(settings.to_dict())},
            )
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        done = len(metrics)
        raise TrainingError(
            f"interrupted; {checkpoint} holds the weights after epoch {done} "
            f"(continue with the same command and --resume)"
        ) from None
    if bar is not None:
        bar.close()
    save_weights(
        out / "weights.safetensors",
        adapter.get_weights(model),
        config,
        source=adapter.name,
        extra_metadata={"epoch": str(len(metrics)), "settings": json.dumps(settings.to_dict())},
    )
    from common.plot import plot_runs

    plot_runs([out], out / "curves.png")
    return metrics
