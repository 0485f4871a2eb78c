# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A big batch on small memory
#
# *Running it:* from a clone, `jupyter execute examples/notebooks/02_big_batch_on_small_memory.ipynb` (after
# `pip install -e ".[examples,notebooks]"`); on Colab, upload the notebook and
# see the first code cell for how it installs keras-accum.
#
# A big batch needs memory in proportion to its size: every activation of the
# forward pass is kept for the backward pass. `AccumulatingModel` computes the
# same gradient from micro-batches, so training with an **effective batch of
# 4096 from micro-batches of 64** needs the memory of a batch of 64. Below, the
# same convolutional model trains twice on the same synthetic images: once with
# `batch_size=4096`, once with `batch_size=64, accumulate=64`. The loss curves
# coincide; the memory does not.
#
# `FULL_SIZE = False` (the default) runs a CI-sized version in under a minute
# on a CPU: effective batch 1024 = 16 x 64, 4096 examples, 8 filters. Set it to
# `True` for the real thing (effective batch 4096, 65536 examples, 64 filters;
# the big batch then needs several GB).

# %%
import glob
import importlib.util
import subprocess
import sys

# Where keras-accum comes from when it is not installed yet (on Colab, say).
# REPOSITORY: the project's public Git repository, as pip spells it
# ("git+https://..."); left empty, the cell installs a wheel uploaded next to
# the notebook (`keras_accum-*.whl`, which `python -m build` writes to dist/
# in a clone). From a clone, install it instead with
# `pip install -e ".[examples,notebooks]"` and this cell does nothing.
REPOSITORY = ""
EXTRAS = "[tensorflow]"

if importlib.util.find_spec("keras_accum") is None:
    wheels = sorted(glob.glob("keras_accum-*.whl"))
    if REPOSITORY:
        requirement = f"keras-accum{EXTRAS} @ {REPOSITORY}"
    elif wheels:
        requirement = wheels[-1] + EXTRAS
    else:
        raise RuntimeError(
            "keras_accum is not installed: set REPOSITORY above, or upload a "
            "keras_accum-*.whl next to this notebook."
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", requirement],
        check=True,
    )

# %%
FULL_SIZE = False

MICRO_BATCH = 64
IMAGE_SIZE = 32
NUM_CLASSES = 10
SEED = 0
if FULL_SIZE:
    EFFECTIVE_BATCH, NUM_EXAMPLES, EPOCHS, FILTERS = 4096, 65536, 10, 64
else:
    EFFECTIVE_BATCH, NUM_EXAMPLES, EPOCHS, FILTERS = 1024, 4096, 4, 8
ACCUMULATE = EFFECTIVE_BATCH // MICRO_BATCH
print(f"effective batch {EFFECTIVE_BATCH} = {ACCUMULATE} micro-batches of "
      f"{MICRO_BATCH}; {NUM_EXAMPLES // EFFECTIVE_BATCH} updates per epoch")

# %%
import os

# This notebook measures memory with TensorFlow's allocator statistics, so it
# runs on the TensorFlow backend. (keras_accum itself runs on TensorFlow and
# JAX alike; on JAX, `examples/train_digits.py` measures a compiled step's
# memory with XLA's own analysis.)
os.environ["KERAS_BACKEND"] = "tensorflow"
# TensorFlow's CPU allocator keeps the statistics read below only in its BFC
# mode, which must be chosen before TensorFlow starts. (GPUs always keep them.)
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import keras_accum

MEMORY_DEVICE = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"

# %% [markdown]
# ## Synthetic images, streamed
#
# Each image is one of 10 fixed random patterns (its class) plus noise twice
# as strong. Examples are generated from their index with stateless random
# ops, so the data take no memory, both runs see exactly the same examples in
# the same order, and only the batch size differs between them.

# %%
templates = tf.constant(
    np.random.default_rng(SEED).normal(
        size=(NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE, 3)
    ),
    tf.float32,
)


def make_example(index):
    seed = tf.stack([tf.constant(SEED, tf.int64), index])
    label = tf.random.stateless_uniform(
        (), seed, maxval=NUM_CLASSES, dtype=tf.int32
    )
    noise = tf.random.stateless_normal((IMAGE_SIZE, IMAGE_SIZE, 3), seed + 1)
    return 0.5 * tf.gather(templates, label) + noise, label


def make_dataset(batch_size):
    examples = tf.data.Dataset.range(NUM_EXAMPLES).map(make_example)
    return examples.batch(batch_size).prefetch(1)


# %% [markdown]
# ## The model
#
# A 3x3 convolution at full resolution dominates the activation memory
# (batch x 32 x 32 x filters floats, kept for the backward pass, plus their
# gradients). No dropout or batch normalisation, which would make micro-batches
# differ from the big batch.

# %%
def make_model(accumulate=None):
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(FILTERS, 3, padding="same", activation="relu")(
        inputs
    )
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    if accumulate is None:
        model = keras.Model(inputs, outputs)
    else:
        model = keras_accum.AccumulatingModel(
            inputs, outputs, accumulate=accumulate
        )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit_and_measure(model, batch_size):
    """Trains; returns the history and TensorFlow's peak memory in MB."""
    tf.config.experimental.reset_memory_stats(MEMORY_DEVICE)
    history = model.fit(
        make_dataset(batch_size), epochs=EPOCHS, shuffle=False, verbose=2
    )
    peak = tf.config.experimental.get_memory_info(MEMORY_DEVICE)["peak"]
    return history.history, peak / 2**20


# %% [markdown]
# ## Train both ways

# %%
accumulated = make_model(accumulate=ACCUMULATE)
accumulated_history, accumulated_mb = fit_and_measure(accumulated, MICRO_BATCH)

big = make_model()
big_history, big_mb = fit_and_measure(big, EFFECTIVE_BATCH)

print(f"accumulate={ACCUMULATE} x {MICRO_BATCH}: "
      f"{int(accumulated.optimizer.iterations.numpy())} updates, "
      f"peak {accumulated_mb:.0f} MB")
print(f"batch_size={EFFECTIVE_BATCH}: {int(big.optimizer.iterations.numpy())} "
      f"updates, peak {big_mb:.0f} MB")

# %% [markdown]
# ## Curves and memory side by side
#
# The memory is the peak of what TensorFlow's allocator held on
# `MEMORY_DEVICE` during `fit`: weights, optimizer state, the batch, the
# activations kept for the backward pass and the gradients. On a CPU it
# includes about 34 MB of scratch space that TensorFlow's convolution gradient
# takes even for a tiny batch.

# %%
epochs = np.arange(1, EPOCHS + 1)
figure, (curves, memory) = plt.subplots(1, 2, figsize=(10, 4))
curves.plot(epochs, big_history["loss"], linewidth=4, alpha=0.5,
            label=f"batch_size={EFFECTIVE_BATCH}")
curves.plot(epochs, accumulated_history["loss"], "--",
            label=f"batch_size={MICRO_BATCH}, accumulate={ACCUMULATE}")
curves.set(xlabel="epoch", ylabel="training loss", xticks=epochs,
           title=f"Same updates: effective batch {EFFECTIVE_BATCH}")
curves.legend()
bars = memory.bar(
    [f"batch {EFFECTIVE_BATCH}", f"{ACCUMULATE} x {MICRO_BATCH}"],
    [big_mb, accumulated_mb],
    color=["tab:blue", "tab:orange"],
)
memory.bar_label(bars, fmt="%.0f MB")
memory.set(ylabel="peak memory during fit (MB)",
           ylim=(0, 1.15 * max(big_mb, accumulated_mb)),
           title=f"Peak TensorFlow memory on {MEMORY_DEVICE}")
figure.tight_layout()
plt.show()

difference = np.max(
    np.abs(np.subtract(big_history["loss"], accumulated_history["loss"]))
)
print(f"Largest difference between the two loss curves: {difference:.1e}")
print(f"Memory: {big_mb / accumulated_mb:.1f}x less with accumulation.")

# %% [markdown]
# The accumulated run makes the same number of updates as the big batch, with
# the same gradients (up to float32 round-off), at a fraction of the memory.
# It takes about as long on a CPU; on an accelerator that a big batch would
# fill, the micro-batches run one after the other, so accumulation trades
# speed for memory only when the big batch does not fit.
