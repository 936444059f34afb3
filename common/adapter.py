"""The interface the harness drives: one small adapter per backend, the same for all four.

An adapter hides one framework behind numpy: it builds a network or block from a configuration,
runs it on a float32 NCHW array (converting layout at the edge), reports every stage's output in
NCHW, and reads and writes the weights in the canonical format (``common.weights.canonical``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from common.arch import bn_counts, canonical_layers, canonical_spec, is_state, min_input_size, stage_names
from common.checks import check_images
from common.config import BN_MOMENTUM, DenseNetConfig
from common.errors import Unsupported
from common.layout import from_layout, param_from_native, param_to_native, to_layout
from common.training.optim import MOMENTUM_BUFFER, SGD, check_state, state_spec
from common.weights.canonical import check_weights

RuntimeT = TypeVar("RuntimeT")


@dataclass
class Model(Generic[RuntimeT]):
    """A backend's network together with what its adapter keeps beside it.

    Only the adapter that built a model may drive it: ``runtime`` has that backend's type
    (``TorchRuntime``, ``MXNetRuntime``, ``JaxRuntime``, ``TFRuntime``, each in its package's
    ``adapter.py``). Not called "state": that word means the BatchNorm running statistics here
    (``common.arch.is_state``).
    """

    config: DenseNetConfig
    """The configuration the network was built from, intact (``in_channels`` included)."""
    net: Any
    """The framework's own object: a ``torch.nn.Module``, a Gluon ``HybridBlock``, a Keras
    ``Model`` or a Flax ``Module``."""
    runtime: RuntimeT
    """The adapter's own objects for this model (compiled callables, optimizer, dropout seed),
    mostly made on first use; never part of the weights."""
    dtype: str = "float32"
    """Floating-point type of every weight and activation: ``"float32"``, what people train in,
    or ``"float64"``, in which the four frameworks must agree with the numpy oracle to the last
    few digits (docs/parity.md)."""
    variables: dict[str, Any] | None = None
    """Flax's variable collections (``{"params": ..., "batch_stats": ...}``, nested dicts of
    arrays); ``None`` in the other frameworks, which keep their weights inside ``net``."""
    precision: str = "float32"
    """``"float32"``, or ``"bfloat16"``: mixed precision, by the framework's own mechanism
    (docs/precision.md). Convolutions and dense layers compute in bfloat16; the weights, the
    BatchNorm statistics, the loss, the gradients the optimiser applies and its state stay
    float32, so weight files are the same canonical float32 ones. Only with ``dtype`` float32."""
    sgd: SGD = field(default_factory=SGD)
    """What ``train_step`` computes (``common.training.optim.SGD``; plain SGD unless
    ``Adapter.configure_optimizer`` says otherwise); the framework's optimizer is in ``runtime``."""


DTYPES = ("float32", "float64")
PRECISIONS = ("float32", "bfloat16")


def check_dtype(dtype: Any) -> str:
    """``"float32"`` or ``"float64"`` (numpy dtypes accepted); anything else is a ValueError."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def check_precision(precision: str, dtype: str = "float32") -> str:
    """``"float32"`` or ``"bfloat16"``; bfloat16 (mixed precision) keeps float32 weights, so it
    goes with ``dtype`` float32 only. Anything else is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "float32" and dtype != "float32":
        raise ValueError(f"precision {precision} keeps float32 weights; it cannot go with dtype {dtype}")
    return precision


class Adapter(ABC, Generic[RuntimeT]):
    """Same methods for every backend; arrays in and out are numpy, activations NCHW.

    Generic over the type of ``Model.runtime`` its backend keeps (``TorchAdapter`` is an
    ``Adapter[TorchRuntime]``)."""

    name: ClassVar[str]
    framework: ClassVar[str]
    layout: ClassVar[str]
    # Whether the framework's BatchNorm feeds its running variance the unbiased batch variance
    # (n/(n-1)), as PyTorch does, or the biased one used for normalising (MXNet, Keras, Flax).
    # The canonical convention is the unbiased one (common.weights.canonical.RUNNING_VAR): adapters of the
    # other frameworks correct every training step they run (``canonical_running_stat``).
    running_var_unbiased: ClassVar[bool]
    # Weight of the new batch statistic in the framework's running averages, as it computes it:
    # BN_MOMENTUM, except where a framework rounds its momentum parameter (MXNet: float32).
    bn_momentum: ClassVar[float] = BN_MOMENTUM
    # Whether training and evaluation should take the compiled path (see densenet_torch).
    prefers_compiled: ClassVar[bool] = True
    # Execution modes `densenet bench` measures: "eager" and the framework's compiled paths by
    # their own names; :meth:`bench_step` knows each.
    bench_modes: ClassVar[tuple[str, ...]] = ("eager", "compiled")
    # The backend's module that writes and loads deployment artefacts (``densenet_torch.export``),
    # the same public names in all four; ``common.deploy`` drives it.
    export_module: ClassVar[str | None] = None

    # --- framework specifics -------------------------------------------------------------

    @abstractmethod
    def version(self) -> str:
        """The framework's version string."""

    @abstractmethod
    def build(
        self,
        config: DenseNetConfig,
        seed: int = 0,
        dtype: str = "float32",
        *,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> Model[RuntimeT]:
        """The network with the framework's own (seeded) initialisation, built for its inputs,
        with every weight in ``dtype`` (``"float32"`` or ``"float64"``). ``memory_efficient``
        builds the same network (same weights for the same seed) whose training recomputes each
        dense layer's concatenation, BatchNorm and ReLU in the backward pass instead of keeping them.
        ``precision="bfloat16"`` runs it in mixed precision (:attr:`Model.precision`); the weights
        are the same for the same seed."""

    @abstractmethod
    def _stages(self, model: Model[RuntimeT], X: Any, training: bool) -> list[Any]:
        """Native outputs of every stage (stem, dense/transition blocks, head), in order."""

    @abstractmethod
    def _forward(self, model: Model[RuntimeT], X: Any, training: bool, compiled: bool) -> Any:
        """Native logits; ``compiled`` selects torch.compile / hybridize / jit / tf.function."""

    @abstractmethod
    def _block(self, kind: str, X: Any, num_channels: int, *, num_convs: int) -> Any:
        """Build the book's ``DenseBlock(num_convs, num_channels)`` (kind ``"dense"``) or
        ``transition_block(num_channels)`` (kind ``"transition"``) and apply it to ``X``."""

    @abstractmethod
    def _to_native(self, X: np.ndarray) -> Any:
        """A numpy array (already in this backend's layout) as a framework tensor."""

    @abstractmethod
    def _to_numpy(self, Y: Any) -> np.ndarray:
        """A framework tensor as numpy."""

    @abstractmethod
    def _layers(self, model: Model[RuntimeT]) -> list[tuple[str, Any]]:
        """Every conv (``"conv"``), BatchNorm (``"bn"``) and dense (``"fc"``) layer, in forward order."""

    @abstractmethod
    def _layer_tensors(self, kind: str, layer: Any) -> dict[str, Any]:
        """A layer's tensors by canonical leaf (``weight``, ``bias``, ``running_mean``,
        ``running_var``), as whatever handle ``_read`` and ``_write`` work with."""

    @abstractmethod
    def _read(self, model: Model[RuntimeT]) -> dict[str, np.ndarray]:
        """Every tensor by canonical name, in the framework's native layout."""

    @abstractmethod
    def _write(self, model: Model[RuntimeT], weights: dict[str, np.ndarray]) -> None:
        """Overwrite every tensor (canonical names, native layout, already checked)."""

    def _tensors(self, model: Model[RuntimeT]) -> dict[str, Any]:
        """Canonical name -> the framework's handle on that tensor, by pairing the network's layers
        with ``common.arch.canonical_layers`` (the one place the naming is defined)."""
        expected = canonical_layers(model.config)
        layers = self._layers(model)
        if [k for _, k in expected] != [k for k, _ in layers]:
            raise RuntimeError(
                f"{self.name}: the network's layers ({len(layers)}) do not follow the canonical order "
                f"({len(expected)}); the model and common.arch.canonical_spec disagree"
            )
        return {
            f"{prefix}.{leaf}": handle
            for (prefix, _), (kind, layer) in zip(expected, layers)
            for leaf, handle in self._layer_tensors(kind, layer).items()
        }

    @abstractmethod
    def loss_and_grads(
        self, model: Model[RuntimeT], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy in training mode and its gradients, without changing the
        weights: ``(loss, dloss/dX in NCHW, {canonical name: gradient in canonical layout})``.
        Running statistics may be updated as a training-mode forward does in the framework."""

    @abstractmethod
    def train_step(
        self, model: Model[RuntimeT], X: np.ndarray, y: np.ndarray, lr: float, compiled: bool = False
    ) -> tuple[float, np.ndarray]:
        """One step of ``model.sgd`` at rate ``lr`` in training mode (BatchNorm statistics updated),
        by the framework's own optimizer: ``(loss before the step, logits (N, num_classes))``.
        ``compiled`` runs the framework's compiled step (hybridize, jit, tf.function), as training does."""

    @abstractmethod
    def _reset_optimizer(self, model: Model[RuntimeT]) -> None:
        """Forget the framework's optimizer (and any compiled step holding it): the next
        ``train_step`` makes one for ``model.sgd``, its velocities zero."""

    @abstractmethod
    def _read_velocities(self, model: Model[RuntimeT]) -> dict[str, np.ndarray]:
        """The framework optimizer's velocity by canonical parameter name, in native layout; a
        parameter without one yet (before its first step) may be left out: it is zero."""

    @abstractmethod
    def _write_velocities(self, model: Model[RuntimeT], velocities: dict[str, np.ndarray]) -> None:
        """Set every parameter's velocity (canonical parameter names, native layout, model dtype)."""

    # --- the optimiser (common.training.optim) ---------------------------------------------------------

    def configure_optimizer(self, model: Model[RuntimeT], sgd: SGD) -> None:
        """Train ``model`` with ``sgd`` from its next step on, velocities starting at zero."""
        if not isinstance(sgd, SGD):
            raise TypeError(f"expected a common.training.optim.SGD, got {type(sgd).__name__}")
        model.sgd = sgd
        self._reset_optimizer(model)

    def get_optimizer_state(self, model: Model[RuntimeT]) -> dict[str, np.ndarray]:
        """Every velocity as ``<param>.momentum_buffer`` in canonical layout and the model's dtype,
        forward order (zeros before the first step); empty without momentum."""
        spec = state_spec(model.config, model.sgd)
        native = self._read_velocities(model) if spec else {}
        out = {}
        for name, shape in spec.items():
            param = name[: -len(MOMENTUM_BUFFER)]
            v = native.get(param)
            value = np.zeros(shape) if v is None else self.canonical_param(param, v)
            out[name] = np.array(value, model.dtype)
        return out

    def set_optimizer_state(self, model: Model[RuntimeT], state: dict[str, np.ndarray]) -> None:
        """Load velocities from :meth:`get_optimizer_state` (of any backend); checks every name and
        shape first and loads nothing on error (``common.training.optim.OptimizerError``)."""
        check_state(model.config, model.sgd, state)
        if state:
            self._write_velocities(
                model,
                {
                    k[: -len(MOMENTUM_BUFFER)]: np.ascontiguousarray(
                        param_to_native(np.asarray(v, model.dtype), self.layout)
                    )
                    for k, v in state.items()
                },
            )

    def running_stat_factors(self, model: Model[RuntimeT], X_shape: tuple[int, ...]) -> dict[str, float]:
        """The running statistics this framework's training step leaves in a non-canonical
        convention, by canonical name, with the factor the batch term needs (n/(n-1) for a
        variance fed the biased batch variance, n = N*H*W for a batch of NCHW shape ``X_shape``;
        1 where only the momentum needs re-applying)."""
        exact_momentum = self.bn_momentum == BN_MOMENTUM
        factors: dict[str, float] = {}
        for prefix, n in bn_counts(model.config, tuple(X_shape[2:]), X_shape[0]).items():
            if not exact_momentum:
                factors[f"{prefix}.bn.running_mean"] = 1.0
            if not (self.running_var_unbiased and exact_momentum):
                factors[f"{prefix}.bn.running_var"] = 1.0 if self.running_var_unbiased else n / (n - 1)
        return factors

    def canonical_running_stat(self, old: Any, new: Any, factor: float) -> Any:
        """A running statistic after the framework's update, re-expressed in the canonical one.

        The framework computed ``new = (1 - b) * old + b * v`` with its own ``b`` (``bn_momentum``)
        and batch statistic ``v``; the canonical update is ``(1 - m) * old + m * factor * v`` with
        ``m = BN_MOMENTUM``. Works on numpy arrays and framework tensors alike.
        """
        m, b = BN_MOMENTUM, self.bn_momentum
        if b == m:  # the cheaper form: a small correction added to ``new``
            return new + (new - (1 - m) * old) * (factor - 1)
        return (1 - m) * old + (new - (1 - b) * old) * (m / b * factor)

    def use_max_pool_in_transitions(self, model: Model[RuntimeT]) -> int:
        """Replace the 2x2/2 average pool of every transition block of a built network with a
        2x2/2 max pool, in the framework's own idiom (the book's exercise 1); returns how many were
        replaced. The pool holds no weights, so the canonical weights stay as they are."""
        raise Unsupported(
            f"a max-pool transition is swapped into a built network in PyTorch or TensorFlow, not {self.name!r}"
        )

    def trains_compiled(self, model: Model[RuntimeT]) -> bool:
        """Whether ``densenet train`` steps ``model`` through its compiled path:
        :attr:`prefers_compiled`, unless this adapter knows that ``model`` trains better eagerly."""
        return self.prefers_compiled

    def bench_step(
        self, model: Model[RuntimeT], phase: str, mode: str, X: np.ndarray, y: np.ndarray, lr: float = 0.01
    ) -> Callable[[], None]:
        """One timed unit of ``densenet bench``: a training step (``phase="train"``) or a forward
        pass in inference mode (``"inference"``) in ``mode`` (one of :attr:`bench_modes`); it
        returns once the framework has finished (results read back as numpy)."""
        if mode not in self.bench_modes:
            raise Unsupported(f"{self.name} has no mode {mode!r}; its modes are {', '.join(self.bench_modes)}")
        compiled = mode != "eager"

        def step() -> None:
            if phase == "train":
                self.train_step(model, X, y, lr, compiled=compiled)
            else:
                self.forward(model, X, compiled=compiled)

        return step

    def exporter(self) -> ModuleType:
        """The backend's ``export`` module: ``export_onnx``, ``export_native``, ``load_native`` and
        ``NATIVE_FORMAT`` (``common.deploy.export`` says what each does)."""
        if self.export_module is None:
            raise Unsupported(f"{self.name} has no exporter")
        return importlib.import_module(self.export_module)

    # --- shared -------------------------------------------------------------------------

    def prepare(self, model: Model[RuntimeT] | None, X: np.ndarray, min_size: int | None = None) -> Any:
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
        dtype = model.dtype if model is not None else "float32"
        return self._to_native(to_layout(np.ascontiguousarray(X, dtype=dtype), self.layout))

    def forward(
        self, model: Model[RuntimeT], X: np.ndarray, *, training: bool = False, compiled: bool = False
    ) -> np.ndarray:
        """Logits ``(N, num_classes)`` for an NCHW float batch."""
        return self._to_numpy(self._forward(model, self.prepare(model, X), training, compiled))

    def stages(self, model: Model[RuntimeT], X: np.ndarray, *, training: bool = False) -> dict[str, np.ndarray]:
        """Every stage's output in NCHW (the head's as ``(N, num_classes)``), by stage name."""
        outs = self._stages(model, self.prepare(model, X), training)
        names = stage_names(model.config)
        assert len(outs) == len(names), f"{self.name}: {len(outs)} stages, expected {len(names)}"
        return {n: self.canonical_activation(self._to_numpy(o)) for n, o in zip(names, outs)}

    def block(self, kind: str, X: np.ndarray, num_channels: int, *, num_convs: int = 0) -> np.ndarray:
        """Output (NCHW) of a freshly built dense block or transition block applied to ``X``.

        ``num_convs`` is keyword-only because the book's ``DenseBlock(num_convs, num_channels)``
        takes the two counts the other way round; a transition block ignores it."""
        if kind not in ("dense", "transition"):
            raise ValueError(f"block kind must be 'dense' or 'transition', got {kind!r}")
        # A transition's 2x2 pooling needs at least 2x2 pixels; a dense block keeps the size.
        X = self.prepare(None, X, min_size=2 if kind == "transition" else 1)
        out = self._block(kind, X, num_channels, num_convs=num_convs)
        return self.canonical_activation(self._to_numpy(out))

    def num_params(self, model: Model[RuntimeT]) -> int:
        return sum(int(v.size) for k, v in self._read(model).items() if not is_state(k))

    def num_state(self, model: Model[RuntimeT]) -> int:
        return sum(int(v.size) for k, v in self._read(model).items() if is_state(k))

    def get_weights(self, model: Model[RuntimeT]) -> dict[str, np.ndarray]:
        """Every tensor in canonical names and layout, in forward order (copies in the model's dtype)."""
        native = self._read(model)
        out = {k: np.array(self.canonical_param(k, v), dtype=model.dtype) for k, v in native.items()}
        spec = canonical_spec(model.config)
        check_weights(spec, out, source=f"{self.name} network")
        return {k: out[k] for k in spec}

    def set_weights(self, model: Model[RuntimeT], weights: dict[str, np.ndarray]) -> None:
        """Load canonical weights; checks every name and shape first and loads nothing on error."""
        spec = canonical_spec(model.config)
        check_weights(spec, weights, source="weights")
        native = {
            k: np.ascontiguousarray(param_to_native(np.asarray(weights[k], model.dtype), self.layout)) for k in spec
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
