"""The harness's view of the MXNet Gluon DenseNet (see ``common.adapter``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.adapter import Adapter, Model, check_dtype, check_precision
from common.arch import min_input_size
from common.config import BN_MOMENTUM, DenseNetConfig
from common.errors import Unsupported
from densenet_mxnet._compat import mxnet as mx
from densenet_mxnet.model import DenseBlock, DenseNet, transition_block
from densenet_mxnet.optim import make_optimizer
from densenet_mxnet.peers import zoo_param_names

autograd, gluon = mx.autograd, mx.gluon

_BN_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}

_amp_on = False
"""Whether this process has turned MXNet's AMP on (``amp.init``), which cannot be undone."""


def _use_amp() -> None:
    """MXNet's mixed precision: ``amp.init(target_dtype="bfloat16")`` rewrites the operator
    namespaces (``mx.nd``, ``mx.sym``) of the whole process so that the operators on its bfloat16
    list (convolutions, dense layers) cast their inputs to bfloat16, those on its float32 list
    (softmax, log-softmax, sums, means, ``Flatten``) to float32, and the rest (BatchNorm, pooling,
    ReLU, concatenation) run in their input's dtype. Parameters stay float32; BatchNorm keeps
    float32 parameters and statistics. It takes the whole process, for good: a float32 network run afterwards
    would silently compute in bfloat16, so the adapter refuses one (:func:`_check_amp`)."""
    global _amp_on
    if not _amp_on:
        from mxnet.contrib import amp

        amp.init(target_dtype="bfloat16")
        _amp_on = True


def _check_amp(model: Model) -> None:
    if _amp_on and model.precision != "bfloat16":
        raise Unsupported(
            f"MXNet's AMP is on in this process (a bfloat16 network was built), and it converts every "
            f"operator for good: a {model.dtype} network would compute in bfloat16. Run it in another process."
        )


def _float32(Y: mx.nd.NDArray) -> mx.nd.NDArray:
    """AMP's bfloat16 outputs (numpy has no bfloat16) as float32; other arrays unchanged."""
    return Y if Y.dtype in (np.float32, np.float64) else Y.astype("float32")


@dataclass
class MXNetRuntime:
    """What the MXNet adapter keeps beside a network."""

    trainer: gluon.Trainer | None = None
    """The ``Trainer`` ``train_step`` steps, with a ``SuiteSGD`` for ``Model.sgd`` (made on first
    use; its learning rate is set on every call)."""
    hybridized: bool | None = None
    """Whether the network is hybridized now (None: not yet decided). ``hybridize()`` discards the
    compiled graph (Gluon's ``clear=True``), so it is called only when this changes."""


MXNetModel = Model[MXNetRuntime]


class MXNetAdapter(Adapter[MXNetRuntime]):
    name = "mxnet"
    export_module = "densenet_mxnet.export"
    framework = "MXNet Gluon"
    layout = "NCHW"
    running_var_unbiased = False
    # Gluon's BatchNorm keeps its momentum parameter as a float32 (0.9 -> 0.89999998).
    bn_momentum = 1 - float(np.float32(1 - BN_MOMENTUM))
    bench_modes = ("eager", "hybridize")

    def version(self) -> str:
        return mx.__version__

    def gluon_zoo_names(self, name: str, num_classes: int) -> list[str]:
        """Parameter names, in forward order, of the Gluon model zoo's ``name`` network (for the
        ``gluon`` peer format, whose names only the zoo can produce)."""
        return zoo_param_names(name, num_classes)

    def build(
        self,
        config: DenseNetConfig,
        seed: int = 0,
        dtype: str = "float32",
        *,
        memory_efficient: bool = False,
        precision: str = "float32",
    ) -> MXNetModel:
        dtype = check_dtype(dtype)
        precision = check_precision(precision, dtype)
        if precision == "bfloat16" and memory_efficient:
            # Measured with MXNet 1.9.1: the recomputation's backward pass (an autograd.Function)
            # stops with "Backward shape inconsistent with the forward shape" under AMP.
            raise Unsupported(
                "MXNet cannot run the memory-efficient network in bfloat16: AMP's casts break "
                "its autograd.Function's backward pass (docs/precision.md); use one or the other"
            )
        if precision == "bfloat16":
            _use_amp()
        mx.random.seed(seed)
        net = DenseNet.for_config(config, memory_efficient=memory_efficient)
        net.initialize(mx.init.Xavier())  # the book's initialiser
        size = min_input_size(config)
        net(mx.nd.zeros((1, config.in_channels, size, size)))  # finish the deferred initialisation
        if dtype == "float64":
            net.cast(dtype)  # Gluon's way: parameters and the dtype the graph expects
        model = Model(config, net, MXNetRuntime(), dtype=dtype, precision=precision)
        _check_amp(model)
        return model

    def _to_native(self, X: np.ndarray) -> mx.nd.NDArray:
        return mx.nd.array(X, dtype=X.dtype)

    def _to_numpy(self, Y: mx.nd.NDArray) -> np.ndarray:
        return _float32(Y).asnumpy()

    def trains_compiled(self, model: MXNetModel) -> bool:
        # A memory-efficient network's dense blocks stay imperative when hybridized, and the
        # compiled stages between them keep static memory plans: eagerly on MXNet's NaiveEngine
        # (common.process.allocator) it takes less memory in about the same time
        # (docs/performance.md#memory-and-time-measured).
        return self.prefers_compiled and not model.net.memory_efficient

    @staticmethod
    def _hybridize(model: MXNetModel, active: bool) -> None:
        """Compile (or stop compiling) the network, only when that changes: every ``hybridize()``
        call throws the cached graph away. ``static_alloc`` and ``static_shape`` let the cached
        graph keep its memory plan and shapes between calls with the same batch shape."""
        if model.runtime.hybridized is not active:
            model.net.hybridize(active, static_alloc=active, static_shape=active)
            model.runtime.hybridized = active

    def _forward(self, model: MXNetModel, X, training: bool, compiled: bool):
        _check_amp(model)
        self._hybridize(model, compiled)
        # train_mode switches BatchNorm to batch statistics without recording a graph.
        if training:
            with autograd.train_mode():
                return _float32(model.net(X))
        return _float32(model.net(X))

    def _stages(self, model: MXNetModel, X, training: bool) -> list:
        _check_amp(model)
        self._hybridize(model, False)
        outs = []
        with autograd.train_mode() if training else autograd.predict_mode():
            for i in range(len(model.net.net)):
                X = model.net.net[i](X)
                outs.append(X)
        return outs

    def _block(self, kind: str, X: mx.nd.NDArray, num_channels: int, *, num_convs: int) -> mx.nd.NDArray:
        blk = DenseBlock(num_convs, num_channels) if kind == "dense" else transition_block(num_channels)
        blk.initialize(mx.init.Xavier())
        return blk(X)

    def _layers(self, model: MXNetModel) -> list[tuple[str, gluon.Block]]:
        kinds = ((gluon.nn.Conv2D, "conv"), (gluon.nn.BatchNorm, "bn"), (gluon.nn.Dense, "fc"))
        out = []

        def walk(block: gluon.Block) -> None:
            for child in block._children.values():  # registration order is forward order here
                kind = next((k for cls, k in kinds if isinstance(child, cls)), None)
                out.append((kind, child)) if kind else walk(child)

        walk(model.net)
        return out

    def _layer_tensors(self, kind: str, layer: gluon.Block) -> dict[str, gluon.Parameter]:
        if kind == "bn":
            return {leaf: getattr(layer, native) for leaf, native in _BN_LEAVES.items()}
        return {"weight": layer.weight} | ({"bias": layer.bias} if layer.bias is not None else {})

    def _read(self, model: MXNetModel) -> dict[str, np.ndarray]:
        return {k: p.data().asnumpy() for k, p in self._tensors(model).items()}

    def _write(self, model: MXNetModel, weights: dict[str, np.ndarray]) -> None:
        for k, p in self._tensors(model).items():
            p.set_data(mx.nd.array(weights[k], dtype=weights[k].dtype))

    def _loss_backward(self, model: MXNetModel, X, y: np.ndarray):
        _check_amp(model)
        y = mx.nd.array(self.check_labels(X, y, model.config.num_classes), dtype=model.dtype)
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        tensors = self._tensors(model)
        factors = self.running_stat_factors(model, X.shape)
        old = {k: tensors[k].data().copy() for k in factors}
        with autograd.record():
            logits = _float32(model.net(X))
            loss = loss_fn(logits, y).mean()
        # MXNet updates BatchNorm's running statistics only here, in the backward pass (CPU).
        loss.backward()
        # Wait for the backward pass to finish before reading the statistics it wrote: with
        # static_alloc the cached graph's BatchNorm updates are not ordered before a later read
        # (measured: one step in two read the stem's running variance before its update), and the
        # memory-efficient blocks' recomputations run on the engine's custom-function thread.
        mx.nd.waitall()
        for k, factor in factors.items():  # see running_var_unbiased and bn_momentum
            tensors[k].set_data(self.canonical_running_stat(old[k], tensors[k].data(), factor))
        return float(loss.asscalar()), logits

    def loss_and_grads(self, model, X, y):
        X = self.prepare(model, X)
        X.attach_grad()
        self._hybridize(model, False)
        loss, _ = self._loss_backward(model, X, y)
        grads = {k: p.grad().asnumpy() for k, p in self._tensors(model).items() if p.grad_req != "null"}
        return loss, X.grad.asnumpy(), grads

    def _trainer(self, model: MXNetModel) -> gluon.Trainer:
        if model.runtime.trainer is None:
            # kvstore=None: the updates run in this process's Updater, whose states we read and write.
            model.runtime.trainer = gluon.Trainer(model.net.collect_params(), make_optimizer(model.sgd), kvstore=None)
        return model.runtime.trainer

    def _reset_optimizer(self, model: MXNetModel) -> None:
        model.runtime.trainer = None

    def _velocity_slots(self, model: MXNetModel) -> tuple[dict, dict[str, int]]:
        """The Trainer's updater states (index -> velocity) and each canonical parameter's index."""
        trainer = self._trainer(model)
        index = {k: trainer._param2idx[p.name] for k, p in self._tensors(model).items() if p.grad_req != "null"}
        return trainer._updaters[0], index

    def _read_velocities(self, model: MXNetModel) -> dict[str, np.ndarray]:
        updater, index = self._velocity_slots(model)
        return {k: updater.states[i].asnumpy() for k, i in index.items() if updater.states.get(i) is not None}

    def _write_velocities(self, model: MXNetModel, velocities: dict[str, np.ndarray]) -> None:
        updater, index = self._velocity_slots(model)
        for k, i in index.items():
            updater.states[i] = mx.nd.array(velocities[k], dtype=velocities[k].dtype)
            updater.states_synced[i] = True

    def train_step(self, model, X, y, lr, compiled=False):
        self._hybridize(model, compiled)
        trainer = self._trainer(model)
        loss, logits = self._loss_backward(model, self.prepare(model, X), y)
        # SuiteSGD applies the rate with NDArray arithmetic, in the model's dtype (float64 stays exact).
        trainer.set_learning_rate(lr)
        trainer.step(1)  # the loss is already a batch mean
        return loss, logits.asnumpy()
