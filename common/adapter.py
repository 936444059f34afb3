"""The interface the harness drives: one small adapter per backend, the same for all four.

An adapter hides one framework behind numpy: it builds a network or block from a configuration,
runs it on a float32 NCHW array (converting layout at the edge), reports every stage's output in
NCHW, and reads and writes the weights in the canonical format (``common.weights``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from common.checks import check_images
from common.config import DenseNetConfig, canonical_layers, canonical_spec, is_state, min_input_size, stage_names
from common.layout import from_layout, param_from_native, param_to_native, to_layout
from common.weights import check_weights


@dataclass
class Model:
    """A backend's network together with what the adapter needs to drive it.

    ``net`` is the framework's own object (a ``torch.nn.Module``, a Gluon ``HybridBlock``, a
    Keras ``Model``, a Flax ``Module``); ``variables`` holds Flax's params and batch_stats (the
    other frameworks keep their state inside ``net``); ``cache`` keeps compiled callables.
    """

    config: DenseNetConfig
    net: Any
    variables: Any = None
    cache: dict[str, Any] = field(default_factory=dict)


class Adapter(ABC):
    """Same methods for every backend; arrays in and out are numpy, activations NCHW."""

    name: ClassVar[str]
    framework: ClassVar[str]
    layout: ClassVar[str]
    # Whether BatchNorm feeds its running variance the unbiased batch variance (n/(n-1)),
    # as PyTorch does, or the biased one used for normalising (MXNet, Keras, Flax).
    running_var_unbiased: ClassVar[bool]
    # Whether training and evaluation should take the compiled path (see densenet_torch).
    prefers_compiled: ClassVar[bool] = True

    # --- framework specifics -------------------------------------------------------------

    @abstractmethod
    def version(self) -> str:
        """The framework's version string."""

    @abstractmethod
    def build(self, config: DenseNetConfig, seed: int = 0) -> Model:
        """The network with the framework's own (seeded) initialisation, built for its inputs."""

    @abstractmethod
    def _stages(self, model: Model, X: Any, training: bool) -> list[Any]:
        """Native outputs of every stage (stem, dense/transition blocks, head), in order."""

    @abstractmethod
    def _forward(self, model: Model, X: Any, training: bool, compiled: bool) -> Any:
        """Native logits; ``compiled`` selects torch.compile / hybridize / jit / tf.function."""

    @abstractmethod
    def _block(self, kind: str, num_convs: int, num_channels: int, X: Any) -> Any:
        """Build the book's ``DenseBlock(num_convs, num_channels)`` (kind ``"dense"``) or
        ``transition_block(num_channels)`` (kind ``"transition"``) and apply it to ``X``."""

    @abstractmethod
    def _to_native(self, X: np.ndarray) -> Any:
        """A numpy array (already in this backend's layout) as a framework tensor."""

    @abstractmethod
    def _to_numpy(self, Y: Any) -> np.ndarray:
        """A framework tensor as numpy."""

    @abstractmethod
    def _layers(self, model: Model) -> list[tuple[str, Any]]:
        """Every conv (``"conv"``), BatchNorm (``"bn"``) and dense (``"fc"``) layer, in forward order."""

    @abstractmethod
    def _layer_tensors(self, kind: str, layer: Any) -> dict[str, Any]:
        """A layer's tensors by canonical leaf (``weight``, ``bias``, ``running_mean``,
        ``running_var``), as whatever handle ``_read`` and ``_write`` work with."""

    @abstractmethod
    def _read(self, model: Model) -> dict[str, np.ndarray]:
        """Every tensor by canonical name, in the framework's native layout."""

    @abstractmethod
    def _write(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        """Overwrite every tensor (canonical names, native layout, already checked)."""

    def _tensors(self, model: Model) -> dict[str, Any]:
        """Canonical name -> the framework's handle on that tensor, by pairing the network's layers
        with ``common.config.canonical_layers`` (the one place the naming is defined)."""
        expected = canonical_layers(model.config)
        layers = self._layers(model)
        if [k for _, k in expected] != [k for k, _ in layers]:
            raise RuntimeError(
                f"{self.name}: the network's layers ({len(layers)}) do not follow the canonical order "
                f"({len(expected)}); the model and common.config.canonical_spec disagree"
            )
        return {
            f"{prefix}.{leaf}": handle
            for (prefix, _), (kind, layer) in zip(expected, layers)
            for leaf, handle in self._layer_tensors(kind, layer).items()
        }

    @abstractmethod
    def loss_and_grads(
        self, model: Model, X: np.ndarray, y: np.ndarray
    ) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy in training mode and its gradients, without changing the
        weights: ``(loss, dloss/dX in NCHW, {canonical name: gradient in canonical layout})``.
        Running statistics may be updated as a training-mode forward does in the framework."""

    @abstractmethod
    def train_step(
        self, model: Model, X: np.ndarray, y: np.ndarray, lr: float, compiled: bool = False
    ) -> tuple[float, np.ndarray]:
        """One plain SGD step in training mode (BatchNorm statistics updated):
        ``(loss before the step, logits (N, num_classes))``. ``compiled`` runs the framework's
        compiled step (hybridize, jit, tf.function), as training does."""

    def sgd_step(self, model: Model, X: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One plain SGD step, eager; returns the loss."""
        return self.train_step(model, X, y, lr)[0]

    # --- shared -------------------------------------------------------------------------

    def prepare(self, model: Model | None, X: np.ndarray, min_size: int | None = None) -> Any:
        """Check an NCHW numpy batch and hand it to the framework in its own layout.

        ``min_size`` defaults to the network's smallest input (1 without a model)."""
        X = np.asarray(X)
        config = model.config if model is not None else None
        check_images(
            X.shape,
            np.issubdtype(X.dtype, np.floating),
            str(X.dtype),
            layout="NCHW",
            in_channels=config.in_channels if config else None,
            min_size=min_size or (min_input_size(config) if config else 1),
        )
        return self._to_native(to_layout(np.ascontiguousarray(X, dtype=np.float32), self.layout))

    def forward(self, model: Model, X: np.ndarray, *, training: bool = False, compiled: bool = False) -> np.ndarray:
        """Logits ``(N, num_classes)`` for an NCHW float batch."""
        return self._to_numpy(self._forward(model, self.prepare(model, X), training, compiled))

    def stages(self, model: Model, X: np.ndarray, *, training: bool = False) -> dict[str, np.ndarray]:
        """Every stage's output in NCHW (the head's as ``(N, num_classes)``), by stage name."""
        outs = self._stages(model, self.prepare(model, X), training)
        names = stage_names(model.config)
        assert len(outs) == len(names), f"{self.name}: {len(outs)} stages, expected {len(names)}"
        return {n: self.canonical_activation(self._to_numpy(o)) for n, o in zip(names, outs)}

    def block(self, kind: str, X: np.ndarray, num_channels: int, num_convs: int = 0) -> np.ndarray:
        """Output (NCHW) of a freshly built dense block or transition block applied to ``X``."""
        if kind not in ("dense", "transition"):
            raise ValueError(f"block kind must be 'dense' or 'transition', got {kind!r}")
        # A transition's 2x2 pooling needs at least 2x2 pixels; a dense block keeps the size.
        X = self.prepare(None, X, min_size=2 if kind == "transition" else 1)
        out = self._block(kind, num_convs, num_channels, X)
        return self.canonical_activation(self._to_numpy(out))

    def num_params(self, model: Model) -> int:
        return sum(int(v.size) for k, v in self._read(model).items() if not is_state(k))

    def num_state(self, model: Model) -> int:
        return sum(int(v.size) for k, v in self._read(model).items() if is_state(k))

    def get_weights(self, model: Model) -> dict[str, np.ndarray]:
        """Every tensor in canonical names and layout, in forward order (float32 copies)."""
        native = self._read(model)
        out = {k: np.array(self.canonical_param(k, v), dtype=np.float32) for k, v in native.items()}
        spec = canonical_spec(model.config)
        check_weights(spec, out, source=f"{self.name} network")
        return {k: out[k] for k in spec}

    def set_weights(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        """Load canonical weights; checks every name and shape first and loads nothing on error."""
        spec = canonical_spec(model.config)
        check_weights(spec, weights, source="weights")
        native = {
            k: np.ascontiguousarray(param_to_native(np.asarray(weights[k], np.float32), self.layout)) for k in spec
        }
        self._write(model, native)

    def canonical_param(self, name: str, value: np.ndarray) -> np.ndarray:
        """A tensor (or its gradient) from this framework's layout to the canonical one."""
        return param_from_native(value, self.layout)

    def canonical_activation(self, value: np.ndarray) -> np.ndarray:
        """An activation (or its gradient) from this framework's layout to NCHW."""
        return from_layout(value, self.layout)

    @staticmethod
    def check_labels(X: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (len(X),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be {len(X)} integers, got {y.dtype} array of shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        return y.astype(np.int64)
