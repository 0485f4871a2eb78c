# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gradient accumulation on a Colab TPU
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/keras-accum/keras-accum/blob/main/examples/colab_tpu.ipynb)
#
# Choose *Runtime > Change runtime type > TPU* on Colab. Without a TPU the
# notebook falls back to `MirroredStrategy` over several GPUs, or to the default
# strategy (one GPU or the CPU), and runs the same code.
#
# An `AccumulatingModel` is built and compiled under `strategy.scope()` and
# trained with XLA (`jit_compile=True`), several steps per call
# (`steps_per_execution`) and static batch shapes (`drop_remainder=True`).

# %%
import subprocess
import sys

# On Colab, install keras-accum first. Anywhere else this cell does nothing:
# install the package with `pip install -e ".[examples]"` from the repository.
# (A subprocess, not `%pip`, so this file is plain Python for linters.)
if "google.colab" in sys.modules:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q",
         "keras-accum @ git+https://github.com/keras-accum/keras-accum"],
        check=True,
    )

# %%
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # keras_accum needs TensorFlow.

import keras
import numpy as np
import tensorflow as tf

import keras_accum


# %% [markdown]
# ## Pick the strategy

# %%
def make_strategy():
    """TPUStrategy on a TPU, MirroredStrategy on several GPUs, else default."""
    try:
        # Finds the TPU from the environment (TPU_NAME, Colab's variables).
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
    except ValueError:
        # A TPU VM runtime has its chips attached to this machine.
        has_local_tpu = os.path.exists("/dev/accel0") or os.path.exists(
            "/dev/vfio/0"
        )
        resolver = (
            tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
            if has_local_tpu
            else None
        )
    if resolver is not None:
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


strategy = make_strategy()
print(f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} "
      "replica(s)")

# %% [markdown]
# ## Per-replica, global and effective batch
#
# * **Per-replica batch**: the examples one replica (a TPU core, a GPU) sees per
#   step.
# * **Global batch** = per-replica batch x `strategy.num_replicas_in_sync`: what
#   the dataset's `batch()` gets. The strategy splits each global batch across
#   the replicas, and one train step computes the gradient of the global batch.
# * **Effective batch** = global batch x `accumulate`: the examples behind each
#   optimizer update.
#
# On a TPU v2-8 (8 cores) with 128 examples per core and `accumulate=4`, the
# global batch is 1024 and each update sees 4096 examples.
#
# XLA compiles one program per input shape, so batches must all have the same
# shape: `drop_remainder=True` drops the last, smaller batch (the data keep a
# multiple of the global batch here, so nothing is lost). `steps_per_execution`
# runs several train steps per call from the host, which keeps a TPU busy;
# accumulation windows need not line up with it, but it reads best when the
# window is a multiple.

# %%
PER_REPLICA_BATCH = 128
ACCUMULATE = 4
EPOCHS = 3
# Keras 3.15's own `fit` under MirroredStrategy failed in our tests with
# `jit_compile=True` or `steps_per_execution > 1` (a plain keras.Model too),
# so both are used on a TPU or a single device only.
MIRRORED = isinstance(strategy, tf.distribute.MirroredStrategy)
JIT_COMPILE = not MIRRORED
STEPS_PER_EXECUTION = 1 if MIRRORED else 8

GLOBAL_BATCH = PER_REPLICA_BATCH * strategy.num_replicas_in_sync
EFFECTIVE_BATCH = GLOBAL_BATCH * ACCUMULATE
STEPS_PER_EPOCH = 32
NUM_EXAMPLES = GLOBAL_BATCH * STEPS_PER_EPOCH
print(f"global batch {GLOBAL_BATCH} = {PER_REPLICA_BATCH} x "
      f"{strategy.num_replicas_in_sync} replica(s); effective batch "
      f"{EFFECTIVE_BATCH} = {GLOBAL_BATCH} x {ACCUMULATE}")

# %% [markdown]
# ## Data with static shapes
#
# Synthetic classification: 64 features, 10 classes given by a random linear
# teacher.

# %%
rng = np.random.default_rng(0)
features = rng.normal(size=(NUM_EXAMPLES, 64)).astype("float32")
teacher = rng.normal(size=(64, 10))
labels = np.argmax(features @ teacher, axis=1).astype("int32")

dataset = (
    tf.data.Dataset.from_tensor_slices((features, labels))
    .shuffle(NUM_EXAMPLES, seed=0)
    .batch(GLOBAL_BATCH, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
)
print(dataset.element_spec)

# %% [markdown]
# ## Build, compile and train under the strategy
#
# The model, its optimizer and the accumulators (created like optimizer slots)
# must all live under `strategy.scope()`.

# %%
with strategy.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(256, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(x)
    model = keras_accum.AccumulatingModel(
        inputs, outputs, accumulate=ACCUMULATE
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=JIT_COMPILE,
        steps_per_execution=STEPS_PER_EXECUTION,
    )

history = model.fit(dataset, epochs=EPOCHS, shuffle=False, verbose=2)
updates = int(model.optimizer.iterations.numpy())
print(f"{updates} optimizer updates: {STEPS_PER_EPOCH} steps per epoch / "
      f"accumulate={ACCUMULATE} x {EPOCHS} epochs")

# %% [markdown]
# Each update used the gradient of `EFFECTIVE_BATCH` examples, averaged exactly
# (`reduction="mean"`) over all replicas and micro-batches; in between,
# each replica only adds into its own accumulators, with no communication.
