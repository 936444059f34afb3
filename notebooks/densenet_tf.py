# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
# %% [markdown]
# # DenseNet in TensorFlow/Keras, with densenet-suite
#
# Section 8.7 of *Dive into Deep Learning*, walked with this suite's `densenet_tf`: the pieces,
# the book's shape examples, the layer summary, a short training run and the trained weights
# evaluated in another framework. The same notebook exists for PyTorch, MXNet Gluon and JAX/Flax
# (`notebooks/densenet_<backend>.ipynb`); `densenet teach --out site` shows the four
# implementations side by side.
#
# Keras's idiom: layers built on their first call, NHWC with channels last, and a `training=`
# argument that every layer passes on to its BatchNorm (the book's TF code drops it, so its
# BatchNorm never trains: docs/departures.md).

# %%
import os

import tensorflow as tf

from densenet_tf import DenseBlock, DenseNet, conv_block, transition_block

BACKEND = "tf"
tf.keras.utils.set_random_seed(0)

# %% [markdown]
# ## Dense blocks
#
# A conv block is BN, ReLU and a 3x3 convolution; it returns only its new features. The dense
# block feeds each conv block the concatenation of the block's input and every earlier output,
# along the channel axis (`axis=-1` in NHWC). The book's example: 2 conv blocks of 10 channels on
# 4 images of 3 channels give 3 + 2 x 10 = 23 channels.

# %%
print(conv_block(10))
blk = DenseBlock(2, 10)
X = tf.random.uniform((4, 8, 8, 3))
Y = blk(X, training=False)
assert tuple(Y.shape) == (4, 8, 8, 23)
Y.shape

# %% [markdown]
# ## Transition layers
#
# BN, ReLU, a 1x1 convolution to fewer channels and 2x2 average pooling halve the width and the
# height.

# %%
blk = transition_block(10)
Z = blk(Y, training=False)
assert tuple(Z.shape) == (4, 4, 4, 10)
Z.shape

# %% [markdown]
# ## The model
#
# The stem (`b1`), four dense blocks of 4 conv blocks with growth rate 32, a transition between
# each pair, and the head. The book's `layer_summary`: one 96x96 image through each stage.

# %%
net = DenseNet()
X = tf.random.uniform((1, 96, 96, 1))
for layer in net.net.layers:
    X = layer(X, training=False)
    print(f"{layer.__class__.__name__:16s} output shape: {X.shape}")
print(f"{sum(int(tf.size(v)) for v in net.trainable_variables):,} parameters")

# %% [markdown]
# The suite's summary of the same network (any configuration, every stage's parameters):

# %%
from common.verify.summary import summarize

print(summarize(BACKEND, net.config, 96).to_text())

# %% [markdown]
# ## A short training run
#
# The suite's training engine (`common.training`) drives this framework's own step, the one the
# side-by-side site shows in its "one training step" row. The defaults here are the recipe of
# docs/training.md (32x32, 5 epochs, SGD 0.1 with cosine annealing: minutes on a laptop CPU);
# `DENSENET_NOTEBOOK_TINY=1`, as CI sets it, trains a narrow network on 256 images for one epoch
# so the notebook runs in seconds and never rots.

# %%
import tempfile
from pathlib import Path

from common.config import D2L, DenseNetConfig
from common.training.run import train
from common.training.settings import TrainSettings

TINY = os.environ.get("DENSENET_NOTEBOOK_TINY") == "1"
settings = TrainSettings(
    backend=BACKEND,
    epochs=1 if TINY else 5,
    batch_size=64 if TINY else 128,
    lr=0.1,
    lr_schedule="cosine",
    resize=32,
    limit=256 if TINY else None,
    test_limit=256 if TINY else None,
    config=DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2)) if TINY else D2L,
)
run = Path(tempfile.mkdtemp(prefix=f"densenet-{BACKEND}-")) if TINY else Path(f"runs/notebook-{BACKEND}")
metrics = train(settings, run, progress=not TINY)
for m in metrics:
    print(f"epoch {m['epoch']}: train loss {m['train_loss']:.4f}, test accuracy {m['test_acc']:.4f}")

# %% [markdown]
# ## Evaluating the result in another framework
#
# The run wrote `weights.safetensors` in the canonical layout (`common.weights.canonical`): any backend
# loads it. Here the next installed framework evaluates it on the same test images, and the
# numpy reference (`common.oracle.reference`, no framework at all) computes the same logits.

# %%
import numpy as np

from common import data
from common.errors import BackendUnavailable
from common.oracle import reference
from common.registry import BACKENDS, load_backend
from common.training.engine import evaluate
from common.weights.canonical import load_weights

config, weights = load_weights(run / "weights.safetensors")
test = data.subset(data.load("test"), settings.test_limit)
names = list(BACKENDS)
other = None
for name in names[names.index(BACKEND) + 1 :] + names[: names.index(BACKEND)]:  # the next one installed
    try:
        other = load_backend(name)
        break
    except BackendUnavailable as exc:
        print(f"{name}: {exc}")
if other is not None:
    model = other.build(config)
    other.set_weights(model, weights)
    loss, acc = evaluate(other, model, test, 256, settings.resize)
    print(f"trained in {BACKEND}, evaluated in {other.name}: accuracy {acc:.4f} (here: {metrics[-1]['test_acc']:.4f})")
    assert abs(acc - metrics[-1]["test_acc"]) <= 2 / len(test.labels)

X, y = next(data.batches(test, 64, settings.resize, shuffle=False))
logits, _, _ = reference.forward(config, weights, X, training=False, dtype=np.float64)
print(f"numpy reference on {len(y)} test images: accuracy {(logits.argmax(axis=1) == y).mean():.4f}")
