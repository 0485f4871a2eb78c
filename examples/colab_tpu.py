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
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gradient accumulation on a Colab TPU, with JAX
#
# *Running it:* from a clone, `jupyter execute examples/colab_tpu.ipynb` (after
# `pip install -e ".[jax,examples,notebooks]"`); on Colab, upload the notebook and
# see the first code cell for how it installs keras-accum.
#
# Choose *Runtime > Change runtime type > TPU* on Colab. Colab's TPU runtimes
# ship JAX and no TensorFlow (since 2025), so this notebook runs Keras on the
# JAX backend (`KERAS_BACKEND=jax`) and splits each batch over the TPU cores
# with `keras.distribution.DataParallel`. The same code runs on a GPU or on a
# CPU; CI runs it on a CPU with TensorFlow not importable.
#
# It trains an `AccumulatingModel` with `accumulate=N`, with
# `micro_batch_size` and with `accumulate="epoch"`, checks each against plain
# Keras on the big batch, then repeats the first in `mixed_bfloat16`, the
# precision TPUs compute in.

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
# `pip install -e ".[jax,examples,notebooks]"` and this cell does nothing.
REPOSITORY = ""
EXTRAS = "[jax]"

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

# %% [markdown]
# ## Backend and devices
#
# `KERAS_BACKEND` must be set before Keras is imported. Right after
# `import jax`, before JAX starts, the notebook asks for two CPU devices
# (`jax_num_cpu_devices`, the config form of
# `XLA_FLAGS=--xla_force_host_platform_device_count=2`). That option only
# shapes JAX's CPU platform: on a TPU or GPU runtime `jax.devices()` still
# lists the accelerators, so no test for "is there an accelerator?" is needed
# (such tests, on `/dev/accel*` or environment variables, vary between TPU
# generations). On a CPU it gives `DataParallel` two devices to split over, so
# the distributed path runs everywhere. If JAX was already started by an
# earlier cell, JAX refuses the option and the notebook keeps the devices it
# has.

# %%
import os

os.environ["KERAS_BACKEND"] = "jax"

import jax

try:
    jax.config.update("jax_num_cpu_devices", 2)
except RuntimeError:  # JAX already started: keep its devices.
    pass

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_accum

devices = jax.devices()
print(f"Keras {keras.__version__} on {keras.backend.backend()}, "
      f"{len(devices)} {devices[0].platform.upper()} device(s)")

# %% [markdown]
# ## Per-device, global and effective batch
#
# `DataParallel` replicates the weights on every device and splits each
# batch along its first axis; one jitted train step computes the gradient of
# the whole (global) batch.
#
# * **Per-device batch**: the examples one device (a TPU core) sees per step.
# * **Global batch** = per-device batch x devices: the `batch_size` given to
#   `fit`. It must divide by the device count.
# * **Effective batch** = global batch x `accumulate`: the examples behind each
#   optimizer update.
#
# XLA compiles one program per input shape, so the notebook keeps a whole
# number of windows of data: every batch has the same shape, and no ragged
# last batch triggers a second compilation. (keras_accum is exact on a ragged
# last batch too; it just costs a compilation.) `steps_per_execution` runs
# several train steps per call from the host, which keeps a TPU busy; the
# window is a multiple of it here.

# %%
PER_DEVICE_BATCH = 16
ACCUMULATE = 4
EPOCHS = 3

keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=devices)
)
GLOBAL_BATCH = PER_DEVICE_BATCH * len(devices)
EFFECTIVE_BATCH = GLOBAL_BATCH * ACCUMULATE

digits = load_digits()  # 1797 8x8 images, shipped with scikit-learn.
n = len(digits.target) // EFFECTIVE_BATCH * EFFECTIVE_BATCH
x = (digits.data[:n] / 16.0).astype("float32")
y = digits.target[:n].astype("int32")
print(f"{n} examples; global batch {GLOBAL_BATCH} = {PER_DEVICE_BATCH} x "
      f"{len(devices)} device(s); effective batch {EFFECTIVE_BATCH} = "
      f"{GLOBAL_BATCH} x {ACCUMULATE}")


# %% [markdown]
# ## Train with `accumulate=N`
#
# The model is built after `set_distribution`, so its weights and the
# accumulators (kept in the jitted step's state, sharded like the weights) are
# laid out on the devices. In between updates a step only adds its gradient
# into the accumulators; the optimizer runs once per window.

# %%
def build(model_class=keras.Model, **kwargs):
    keras.utils.set_random_seed(0)  # The same initial weights every time.
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(hidden)
    return model_class(inputs, outputs, **kwargs)


def compile_and_fit(model, batch_size, steps_per_execution=1):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False,
              verbose=0)
    return model


accumulated = compile_and_fit(
    build(keras_accum.AccumulatingModel, accumulate=ACCUMULATE),
    GLOBAL_BATCH,
    steps_per_execution=ACCUMULATE,
)
updates = int(accumulated.optimizer.iterations.numpy())
loss, accuracy = accumulated.evaluate(x, y, batch_size=GLOBAL_BATCH,
                                      verbose=0)
print(f"{updates} updates = {n // EFFECTIVE_BATCH} windows x {EPOCHS} "
      f"epochs; loss {loss:.3f}, accuracy {accuracy:.3f}")
assert updates == n // EFFECTIVE_BATCH * EPOCHS


# %% [markdown]
# ## The same as plain Keras on the big batch
#
# A plain `keras.Model` with the same initial weights, trained on batches of
# `EFFECTIVE_BATCH` in the same order (`shuffle=False`), makes the same
# updates: the weights agree to float32 round-off (about 1e-6 relative on a
# CPU; TPUs multiply float32 in bfloat16 passes by default, so expect more
# there).

# %%
def relative_difference(model, reference):
    difference = sum(
        np.sum((np.asarray(a) - np.asarray(b)) ** 2)
        for a, b in zip(model.get_weights(), reference.get_weights())
    )
    size = sum(np.sum(np.asarray(b) ** 2) for b in reference.get_weights())
    return float(np.sqrt(difference / size))


big_batch = compile_and_fit(build(), EFFECTIVE_BATCH)
difference = relative_difference(accumulated, big_batch)
print(f"accumulate={ACCUMULATE} vs plain batch {EFFECTIVE_BATCH}: "
      f"relative difference {difference:.1e}")
assert difference < 1e-3

# %% [markdown]
# ## One host call per update: `micro_batch_size`
#
# Above, the host calls the device once per micro-batch (`steps_per_execution`
# groups those calls). With `micro_batch_size`, `fit` hands each step the
# whole effective batch and the compiled step loops over it, `jax.lax.scan`
# over micro-batches of `PER_DEVICE_BATCH` examples per device: the memory of
# the micro-batch, one call per update. The update is the same big batch's.

# %%
micro_batched = compile_and_fit(
    build(keras_accum.AccumulatingModel, accumulate=1,
          micro_batch_size=PER_DEVICE_BATCH),
    EFFECTIVE_BATCH,
)
difference = relative_difference(micro_batched, big_batch)
print(f"micro_batch_size={PER_DEVICE_BATCH} at batch {EFFECTIVE_BATCH}: "
      f"{int(micro_batched.optimizer.iterations.numpy())} updates; relative "
      f"difference to plain batch {EFFECTIVE_BATCH} {difference:.1e}")
assert int(micro_batched.optimizer.iterations.numpy()) == updates
assert difference < 1e-3

# %% [markdown]
# ## Epoch mode: one update per epoch
#
# `accumulate="epoch"` applies the gradient of the whole training set once
# per epoch, at its end: full-batch training with only `GLOBAL_BATCH`
# examples in memory per step.

# %%
epoch_mode = compile_and_fit(
    build(keras_accum.AccumulatingModel, accumulate="epoch"), GLOBAL_BATCH
)
full_batch = compile_and_fit(build(), n)
difference = relative_difference(epoch_mode, full_batch)
print(f"{int(epoch_mode.optimizer.iterations.numpy())} updates; "
      f"epoch mode vs plain batch {n}: relative difference {difference:.1e}")
assert int(epoch_mode.optimizer.iterations.numpy()) == EPOCHS
assert difference < 1e-3

# %% [markdown]
# ## `mixed_bfloat16`
#
# TPUs compute in bfloat16. Under the `mixed_bfloat16` policy layers compute
# in bfloat16 and keep float32 weights; keras_accum sums the gradients in
# float32 accumulators, so accumulating does not lose bits to bfloat16
# additions. Both sides compute in bfloat16 (8 bits of mantissa), so they
# agree only to bfloat16's round-off: on a CPU about 1e-2 after these 42
# updates, less than bfloat16 itself moves the big batch from its float32
# run (about 2e-2), and far less than a different batch size would (3e-1).

# %%
keras.config.set_dtype_policy("mixed_bfloat16")
try:
    accumulated_bf16 = compile_and_fit(
        build(keras_accum.AccumulatingModel, accumulate=ACCUMULATE),
        GLOBAL_BATCH,
    )
    big_batch_bf16 = compile_and_fit(build(), EFFECTIVE_BATCH)
finally:
    keras.config.set_dtype_policy("float32")
layer = accumulated_bf16.layers[1]
difference = relative_difference(accumulated_bf16, big_batch_bf16)
print(f"compute {layer.compute_dtype}, weights {layer.kernel.dtype}; "
      f"relative difference to the big batch {difference:.1e} (bfloat16 vs "
      f"float32 big batch: "
      f"{relative_difference(big_batch_bf16, big_batch):.1e})")
assert layer.kernel.dtype == "float32"
assert difference < 5e-2

# %% [markdown]
# ## Alternative: TensorFlow's `TPUStrategy`
#
# keras_accum runs on the TensorFlow backend too, where a TPU is driven by
# `tf.distribute.TPUStrategy`. That path needs a TensorFlow build with TPU
# support: **TensorFlow 2.19.1 is the last release that has it**, and Colab's
# TPU runtimes ship no TensorFlow since March 2025. Use it on a Cloud TPU VM
# (or a runtime where you install it yourself), with the TPU wheel pinned:
#
# ```bash
# pip install "tensorflow-tpu==2.19.1" \
#     -f https://storage.googleapis.com/libtpu-tf-releases/index.html
# pip install keras_accum-*.whl scikit-learn   # the wheel (or REPOSITORY),
#     # without the [tensorflow] extra: it would pull a newer TensorFlow
#     # that has no TPU support
# ```
#
# Then, in a fresh process (not after the JAX cells above: the backend is
# chosen once, when Keras is imported), build and compile the model under
# the strategy's scope; `fit` needs no change:
#
# ```python
# import os
# os.environ["KERAS_BACKEND"] = "tensorflow"  # before importing Keras
#
# import tensorflow as tf
# import keras
# import keras_accum
#
# resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
# tf.config.experimental_connect_to_cluster(resolver)
# tf.tpu.experimental.initialize_tpu_system(resolver)
# strategy = tf.distribute.TPUStrategy(resolver)
# print("TPU cores:", strategy.num_replicas_in_sync)
#
# GLOBAL_BATCH = 16 * strategy.num_replicas_in_sync
# with strategy.scope():  # weights, optimizer slots and accumulators on the TPU
#     model = build(keras_accum.AccumulatingModel, accumulate=ACCUMULATE)
#     model.compile(
#         optimizer=keras.optimizers.Adam(1e-2),
#         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
#         steps_per_execution=ACCUMULATE,
#     )
# model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False)
# ```
#
# (`tpu="local"` on a TPU VM; on an old-style Colab TPU node
# `TPUClusterResolver()` finds the address itself.) `build`, `x`, `y`,
# `ACCUMULATE` and `EPOCHS` are the ones defined above. With
# `TPUStrategy` every batch's examples are split over the replicas and
# keras_accum sums the replicas' gradients into its accumulators, exactly as
# under `DataParallel` on JAX; the repository's tests check the
# TensorFlow strategies (`MirroredStrategy`, multi-worker) on CPUs.
