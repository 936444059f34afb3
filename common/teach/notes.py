"""What differs between the four implementations of each row, and why it matters, with numbers.

Each note is ``(aspect, what differs, why it matters)``; the numbers come from the facts
computed when the page is built (:class:`Context`), never typed in. The notes are text, not HTML:
backticks mark code and ``[text](#id)`` a link within the page; the template escapes everything
else (``common.teach.page.inline_md``), so a number or a name can never break the markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.arch import CONV3, STEM_CONV, STEM_POOL, canonical_spec, count_bn_stats, count_params
from common.config import BN_EPS, BN_MOMENTUM, DenseNetConfig
from common.teach.facts import PaddingFact, StageFact

__all__ = ["Context", "book_jax_params", "row_notes"]


@dataclass
class Context:
    """The facts the notes quote."""

    config: DenseNetConfig
    input_size: int
    stages: list[StageFact]
    padding: list[PaddingFact]
    naive: list[dict[str, Any]]

    def stage(self, name: str) -> StageFact:
        return next(s for s in self.stages if s.stage == name)

    def naive_row(self, default: str, affects: str) -> dict[str, Any]:
        return next(r for r in self.naive if r["default"].startswith(default) and r["affects"].startswith(affects))

    def naive_text(self, default: str, affects: str) -> str:
        r = self.naive_row(default, affects)
        return f"max abs {r['max_abs']:.1e}, max rel {r['max_rel']:.1e} ({r['affects']})"


def book_jax_params(config: DenseNetConfig) -> int:
    """Trainable parameters of the book's JAX network, whose channel count restarts from
    ``num_channels`` on every pass of its loop (departure 1): each transition is sized from
    ``num_channels + num_convs * growth_rate``, not from the channels it actually receives."""
    g = config.growth_rate
    bn = 2  # scale and shift per channel
    total = config.in_channels * config.num_channels * 49 + config.num_channels + bn * config.num_channels
    channels = config.num_channels
    for i, n in enumerate(config.arch):
        for _ in range(n):
            total += bn * channels + channels * g * 9 + g
            channels += g
        if i != len(config.arch) - 1:
            out = (config.num_channels + n * g) // 2  # the book's restart
            total += bn * channels + channels * out + out
            channels = out
    return total + bn * channels + channels * config.num_classes + config.num_classes


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def row_notes(key: str, ctx: Context) -> list[tuple[str, str, str]]:
    """The notes of one row: plain text, with `code` spans and ``[text](#id)`` links to the page's
    own sections, which the page's ``md`` filter turns into markup (and escapes the rest)."""
    return _NOTES[key](ctx)


def _conv_block(ctx: Context) -> list[tuple[str, str, str]]:
    k, _, p = CONV3
    return [
        (
            "layout",
            "PyTorch and MXNet hold activations NCHW, JAX and Keras NHWC; conv kernels are OIHW and HWIO.",
            "The same weights need a transpose at the boundary: `common/layout.py` is the one place "
            "that does it, so every file you read here is the framework's own idiom.",
        ),
        (
            "input width",
            "No constructor names its input channels: `LazyConv2d`/`LazyBatchNorm2d` "
            "materialise on the first forward, Gluon defers initialisation to the first call, Flax infers "
            "shapes in `init(key, X)`, Keras builds a layer on its first call.",
            "The book's `conv_block(num_channels)` works unchanged in all four; the adapters run "
            "one image of the smallest size at build time so the weights exist before they are loaded.",
        ),
        (
            "BatchNorm",
            f"Every BatchNorm gets epsilon {BN_EPS:g} and momentum {BN_MOMENTUM:g} in PyTorch's meaning (weight of "
            f"the new batch); MXNet, Keras and Flax take the old value's weight, {1 - BN_MOMENTUM:g}. Flax is "
            "told to use the two-pass variance.",
            "Each framework's own default, measured on the book's network with the numpy oracle: Keras epsilon "
            f"1e-3 moves {ctx.naive_text('BN epsilon', 'inference')}; momentum 0.99 moves "
            f"{ctx.naive_text('momentum', 'inference')}; Flax's fast variance moves "
            f"{ctx.naive_text('fast variance E[x^2]-E[x]^2, float32, input mean 100', 'training')} "
            "on inputs of mean 100.5.",
        ),
        (
            "padding",
            f"PyTorch, MXNet and Flax pad the {k}x{k} conv by {p} in the layer; Keras gets an explicit "
            f"`ZeroPadding2D({p})` before a valid conv.",
            "At stride 1 'same' would also pad (1, 1), so no harm here; the explicit form is kept everywhere for "
            "the stride-2 stem, where 'same' is asymmetric (see the stem).",
        ),
    ]


def _dense_block(ctx: Context) -> list[tuple[str, str, str]]:
    c = ctx.config
    return [
        (
            "concat axis",
            "`torch.cat(dim=1)`, `F.concat(dim=1)`, `jnp.concatenate(axis=-1)`, "
            "`tf.concat(axis=-1)`: the channel axis of each layout.",
            "The book's example, `DenseBlock(2, 10)` on 4 images of 3 channels at 8x8, gives "
            "(4, 23, 8, 8) in NCHW and (4, 8, 8, 23) in NHWC: 3 + 2 x 10 channels "
            "(`tests/test_backends.py::test_book_examples_native_api`).",
        ),
        (
            "contract",
            "The book's JAX and TF conv blocks concatenate inside themselves, its PyTorch and MXNet ones do not. "
            "Here a conv block returns only its new features in all four and the dense block concatenates.",
            "The blocks are interchangeable and the four files read alike (departure 6).",
        ),
        (
            "growth",
            f"Each block adds `num_convs x growth_rate` channels: the book's network grows "
            f"{c.num_channels} stem channels to {ctx.stage('dense1').nchw[1]} after the first block "
            f"({c.arch[0]} x {c.growth_rate}).",
            "Concatenation keeps every earlier feature map alive until the block ends: memory grows with the "
            "square of the block length, parameters only linearly (docs/exercises.md, exercise 3).",
        ),
        (
            "compilation",
            "MXNet's block is a `HybridBlock` whose `hybrid_forward(F, X)` works on "
            "symbols and arrays; the book's is a plain `Block`.",
            "`hybridize()` compiles the whole network, not just the parts between dense blocks (departure 4).",
        ),
        (
            "memory-efficient",
            "`memory_efficient=True` (off by default) hands the block, in training, to "
            "`memory_efficient.forward_recomputed`: two lines in each file; the row "
            "[below](#memory-efficient) shows the four modules.",
            "Everything else here is the book's loop, so this row reads the same with the option on or off "
            "(departure 10).",
        ),
    ]


def _transition(ctx: Context) -> list[tuple[str, str, str]]:
    c = ctx.config
    t1 = ctx.stage("transition1")
    return [
        (
            "channels",
            "All four call `config.transition_channels(channels)`, "
            f"`int(channels * {c.compression:g})`: the book's `//= 2`.",
            f"In the book's network the first transition takes {ctx.stage('dense1').nchw[1]} channels to "
            f"{t1.nchw[1]} and {ctx.stage('dense1').nchw[2]}x{ctx.stage('dense1').nchw[3]} to "
            f"{t1.nchw[2]}x{t1.nchw[3]}; the book's example `transition_block(10)` on the dense "
            "block's 23 channels at 8x8 gives 10 channels at 4x4.",
        ),
        (
            "pooling",
            "`AvgPool2d`, `AvgPool2D`, `nn.avg_pool`, `AvgPool2D`: "
            "2x2 windows at stride 2, no padding, odd sides floored in all four.",
            "The book asks what max pooling would change here: `densenet exercise pooling` trains both "
            "(docs/exercises.md, exercise 1).",
        ),
    ]


def _stem(ctx: Context) -> list[tuple[str, str, str]]:
    conv, pool = ctx.padding
    stem = ctx.stage("stem")
    return [
        (
            "padding",
            f"The book's TF and Flax stems pad 'same'. At {conv.input_side}x{conv.input_side} that is "
            f"{conv.same} for the {STEM_CONV[0]}x{STEM_CONV[0]}/{STEM_CONV[1]} conv and {pool.same} for the "
            f"{STEM_POOL[0]}x{STEM_POOL[0]}/{STEM_POOL[1]} pool on its {pool.input_side}x{pool.input_side} input; "
            f"PyTorch and MXNet pad {conv.explicit} and {pool.explicit}. Here all four pad symmetrically.",
            "The size of the damage, same weights and input, numpy oracle: 'same' padding moves "
            f"{ctx.naive_text(chr(39) + 'same', 'inference')}: the stem samples the image one pixel off, and "
            "every activation after it moves. At odd sides "
            "'same' is symmetric and costs nothing.",
        ),
        (
            "max-pool padding",
            "PyTorch, MXNet and Flax pad max pooling with -inf. Keras has no padded max pool: "
            "`MaxPoolPadded` pads with -inf by `tf.pad`, then pools 'valid'.",
            "Padding never wins the max, whatever the sign of the input.",
        ),
        (
            "shape",
            f"{ctx.input_size}x{ctx.input_size} in, {_shape(stem.nchw)} out (NCHW), {_shape(stem.nhwc)} (NHWC).",
            f"{stem.params:,} parameters, {stem.macs / 1e6:.1f} M multiply-adds per image: the stem alone is "
            f"{stem.macs / sum(s.macs for s in ctx.stages):.0%} of the network's cost.",
        ),
    ]


def _assembly(ctx: Context) -> list[tuple[str, str, str]]:
    c = ctx.config
    ours, book = count_params(c), book_jax_params(c)
    widths = [ctx.stage(f"transition{i}").nchw[1] for i in range(1, len(c.arch))]
    return [
        (
            "channel count",
            "The book's JAX `create_net` restarts from `self.num_channels` on every pass; "
            "PyTorch, MXNet and TF accumulate. Here all four accumulate.",
            f"The book's JAX network is another network: {book:,} parameters against {ours:,} "
            f"(transitions {'/'.join(map(str, widths))} here). Departure 1.",
        ),
        (
            "training mode",
            "PyTorch: `net.train()` flips a flag on every module. MXNet: `autograd.record()` "
            "/ `train_mode()`, a global scope. Flax: a `training` field, so a training "
            "network is another module (`net.clone(training=True)`). Keras: a `training=` "
            "argument every layer must pass on.",
            "The book's TF layers drop it, so its BatchNorm never trains and the book's TF run stops at 0.828 "
            "accuracy; here it reaches 0.9110 like the others (docs/training.md, departure 2).",
        ),
        (
            "stage names",
            "Stages are attributes (`dense_blk1`) in PyTorch, list entries elsewhere; Flax modules "
            "are built in `setup`, lazily, when the network is bound.",
            "The harness reads the stages by position; `densenet compare` checks every backend's "
            "stage shapes against the plan below.",
        ),
    ]


def _head(ctx: Context) -> list[tuple[str, str, str]]:
    c = ctx.config
    head = ctx.stage("head")
    return [
        (
            "pooling",
            "`AdaptiveAvgPool2d((1, 1))` + `Flatten`, `GlobalAvgPool2D` + "
            "`Flatten`, `jnp.mean(axis=(1, 2))`, `GlobalAvgPool2D` (its "
            "`Flatten` is a no-op kept from the book).",
            f"A global pool takes any size the network can take ({ctx.stage(f'dense{len(c.arch)}').nchw[2]}x"
            f"{ctx.stage(f'dense{len(c.arch)}').nchw[3]} here); the book's JAX head pooled over "
            "`x.shape[1:3]` with a lambda (departure 9).",
        ),
        (
            "dense layer",
            "PyTorch and MXNet store the dense weight (out, in), Keras and Flax (in, out).",
            f"{head.params:,} parameters: {ctx.stage(f'dense{len(c.arch)}').nchw[1]} channels x "
            f"{c.num_classes} classes + biases + the last BatchNorm.",
        ),
    ]


def _memory_efficient(ctx: Context) -> list[tuple[str, str, str]]:
    # The measurements are docs/performance.md's (DenseNet-121, batch 32, 224x224, one process per
    # case): minutes per backend, too slow to rerun when the page is built.
    return [
        (
            "mechanism",
            "Each framework's own: PyTorch runs the layer under `torch.utils.checkpoint`; MXNet "
            "through an `autograd.Function` whose forward runs under `autograd.pause` "
            "and whose backward records the layer again; JAX through a `jax.custom_vjp` around the "
            "conv block's own `apply`; Keras through a `tf.custom_gradient` whose "
            "forward runs under `record.stop_recording()`.",
            "DenseNet-121's training step, against the standard network (docs/performance.md): memory 0.28x "
            "for 1.22x the time in PyTorch, 0.40x for 1.07x in JAX, 0.22x for 1.19x in Keras eager and 0.32x "
            "for 1.27x in `tf.function`, 0.38x for 0.89x in MXNet eager on its NaiveEngine.",
        ),
        (
            "3x3 convolution",
            "PyTorch and MXNet run it again in the backward pass. JAX and Keras do not: its backward needs its "
            "input, not its output, so XLA drops the unused forward value and Keras calls "
            "`Conv2DBackpropInput` / `Conv2DBackpropFilter` directly.",
            "The 3x3 convolutions are 43% of DenseNet-121's forward FLOPs, yet in PyTorch skipping them bought "
            "nothing (4.22 s a step against 4.28 s for the checkpoint), so PyTorch keeps its own mechanism.",
        ),
        (
            "running statistics",
            "A recomputed BatchNorm runs its training forward twice. PyTorch puts the statistics back after the "
            "recomputation (`_running_stats_kept`); MXNet updates them in BatchNorm's backward pass "
            "on the CPU, which runs once; Flax writes the forward pass's update and drops the recomputation's; "
            "Keras normalises with `keras.ops` and applies its moving-average update once, outside.",
            "Counting a batch twice would move a statistic by about 0.1 of the batch statistic, four orders of "
            "magnitude above the bounds `tests/test_memory_efficient.py` holds every backend to.",
        ),
        (
            "compilers",
            "XLA and TensorFlow's graph optimiser merge a recomputation that needs nothing new back into the "
            "forward pass (`jax.checkpoint` was undone that way): the JAX and graph-mode TF backward "
            "passes make it read the output's gradient `dY`. Gluon cannot recompute inside a "
            "compiled graph: a memory-efficient MXNet network hybridizes stage by stage "
            "(`HybridizesByStage`), its dense blocks staying imperative (`KeepsImperative`).",
            "With `nn.remat` XLA:CPU kept the standard program's 990.5 MiB of temporary buffers "
            "(DenseNet-121, batch 8); the `custom_vjp` needs 387.0 MiB. Hybridized MXNet reaches "
            "only 0.80-0.88x the memory for 1.69-1.87x the time, so `densenet train` trains it "
            "eagerly.",
        ),
        (
            "dropout",
            "DenseNet-BC's dropout stays outside the recomputed part in all four. JAX draws its masks from the "
            "dense block's `dropout` rng (`_dropout`: a Flax module declared in `setup` cannot be made "
            "there), the others run the conv block's own dropout layer.",
            "Same function and weights as the standard network in all four; JAX's dropout masks differ from "
            "its standard network's (Flax derives them from the module's path).",
        ),
    ]


def _training_step(ctx: Context) -> list[tuple[str, str, str]]:
    return [
        (
            "running statistics",
            "Updated by the training-mode forward in PyTorch and Keras, returned as a new "
            "`batch_stats` collection by Flax (only when it is mutable), and written in the "
            "backward pass by MXNet on CPU.",
            "A step must read the statistics after forward and backward; the parity suite compares them after "
            "one full step.",
        ),
        (
            "running variance",
            "PyTorch feeds the running variance the unbiased batch variance n/(n-1); MXNet, Keras and Flax the "
            "biased one. Each adapter re-expresses its update in PyTorch's convention.",
            f"Left alone it would move {ctx.naive_text('running variance', 'running statistics')} and "
            f"{ctx.naive_text('running variance', 'inference logits after')}.",
        ),
        (
            "compilation",
            "PyTorch runs eagerly in channels-last memory, on TCMalloc (torch.compile costs 43 s per batch "
            "shape on these CPUs and trains no faster); MXNet hybridizes; JAX jits the whole step, optax "
            "included; TF wraps it in "
            "`tf.function`.",
            "Each is the framework's fast path; `tests/test_backends.py::test_compiled_equals_eager` "
            "checks the compiled forward against the eager one.",
        ),
        (
            "state",
            "PyTorch, MXNet and Keras mutate the network; Flax's step is a pure function returning new "
            "`params` and `batch_stats`.",
            "Which is why the JAX step is a module-level jitted function and the others are methods.",
        ),
    ]


def _mixed_precision(ctx: Context) -> list[tuple[str, str, str]]:
    # The measurements are docs/precision.md's (the parity sweep over seeds 0-15 and the bench of the
    # book's network at 96x96, batch 128): minutes per backend, too slow to rerun when the page is built.
    return [
        (
            "mechanism",
            "PyTorch wraps the forward pass in `torch.autocast`; MXNet's AMP (`amp.init`) rewrites the "
            "operators of the whole process; Flax computes in the dtype of what it is given, so the float32 "
            "parameters and the input are cast on their way in (`compute_cast`); Keras builds the layers under "
            "the `mixed_bfloat16` dtype policy.",
            "The same function to bfloat16's precision in all four: against the float64 oracle, the forward "
            "passes within 4-6 u (u = 2**-8) and the gradients within 44-81 u, with every bound at least "
            "5.8x above the worst of seeds 0-15 on one and two threads.",
        ),
        (
            "kept in float32",
            "Weights, BatchNorm statistics and the loss in all four. The normalisation itself: float32 in "
            "Keras (BatchNormalization casts its input) and JAX (promoted, as Flax's statistics are), "
            "float32 accumulation on bfloat16 data in PyTorch and MXNet's oneDNN kernels.",
            "Cast to bfloat16 whole, PyTorch's network loses more than a whole SGD step's update at "
            "lr 0.01 (1.15 of its size, against 0.48 in mixed precision): a bfloat16 weight cannot take an "
            "update below 2**-9 of itself.",
        ),
        (
            "scope",
            "An autocast region, a dtype policy and a cast are per network; MXNet's AMP is per process and "
            "cannot be undone, so the adapter refuses a float32 MXNet network once a bfloat16 one exists, "
            "and MXNet's memory-efficient network, whose `autograd.Function` fails under AMP.",
            "Weight files stay float32 and canonical: a bfloat16-trained file evaluates in float32 in any framework.",
        ),
        (
            "speed",
            "bfloat16 over float32 on the development machine's AMX (the book's network, batch 128): PyTorch "
            "2.03x in training and 2.37x in inference; Keras 1.04x and 1.00x (`tf.function`); MXNet 0.74x and "
            "0.65x; JAX 0.81x and 0.80x.",
            "XLA:CPU runs every bfloat16 convolution in float32 between conversions (387 converts in the "
            "compiled forward, none in float32's); MXNet's oneDNN picks AVX512-BF16 kernels, not AMX, "
            "amid hundreds of reorders.",
        ),
    ]


def _weights(ctx: Context) -> list[tuple[str, str, str]]:
    c = ctx.config
    return [
        (
            "names",
            "BatchNorm: `weight/bias/running_mean/running_var` (PyTorch), "
            "`gamma/beta/running_mean/running_var` (MXNet), "
            "`gamma/beta/moving_mean/moving_variance` (Keras), `scale/bias` in "
            "`params` and `mean/var` in `batch_stats` (Flax).",
            f"One canonical name per tensor ({len(canonical_spec(c))} tensors: {count_params(c):,} parameters and "
            f"{count_bn_stats(c):,} running statistics), so a file written by one framework loads bit-identically "
            "in the others (`tests/test_weights.py`).",
        ),
        (
            "order",
            "Every adapter lists its conv, BatchNorm and dense layers in forward order and pairs them with "
            "`common.arch.canonical_layers`.",
            "`jax.jit` returns dicts with sorted keys (`net_10` before `net_2`): "
            "the JAX adapter rebuilds the order from Flax's names.",
        ),
        (
            "layout",
            "Conv kernels OIHW (PyTorch, MXNet) or HWIO (Keras, Flax); dense (out, in) or (in, out).",
            "Converted once, in `common/layout.py`, at the edge of each adapter.",
        ),
    ]


_NOTES = {
    "conv-block": _conv_block,
    "dense-block": _dense_block,
    "transition-block": _transition,
    "stem": _stem,
    "assembly": _assembly,
    "head": _head,
    "memory-efficient": _memory_efficient,
    "training-step": _training_step,
    "mixed-precision": _mixed_precision,
    "weights": _weights,
}
