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
# # Quickstart: one optimizer update per epoch
#
# *Running it:* from a clone, `jupyter execute examples/notebooks/01_quickstart.ipynb` (after
# `pip install -e ".[examples,notebooks]"`); on Colab, upload the notebook and
# see the first code cell for how it installs keras-accum.
#
# `keras_accum.AccumulatingModel` is a `keras.Model` whose `train_step` adds
# each mini-batch's gradient into accumulators instead of applying it; the
# optimizer applies the accumulated gradient once per *window*. This notebook
# shows the epoch mode (one update per epoch), what `fit` logs, and exactly
# when the updates happen. It runs in a few seconds on a CPU, on either Keras
# backend: TensorFlow (the default here) or JAX.

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
EXTRAS = ""

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
import os

# keras_accum runs on TensorFlow and on JAX. The backend is fixed when Keras
# is imported: keep one chosen before (e.g. `KERAS_BACKEND=jax` in the
# environment), else TensorFlow. Nothing below depends on the backend.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

import keras_accum

print(f"Keras {keras.__version__} on {keras.backend.backend()}")

# %% [markdown]
# A small regression problem: 1000 examples, 8 features. `validation_split=0.2`
# keeps the last 200 for validation.

# %%
rng = np.random.default_rng(0)
x = rng.normal(size=(1000, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(1000, 1))).astype(
    "float32"
)
x_train, y_train, x_val, y_val = x[:800], y[:800], x[800:], y[800:]

# %% [markdown]
# ## Epoch mode in ten lines
#
# Build the model as you would a functional `keras.Model`, with
# `accumulate="epoch"`. `fit` runs the usual mini-batches of 100, but the
# weights move once per epoch, with the gradient of the loss over all 800
# training examples.

# %%
keras.utils.set_random_seed(0)
inputs = keras.Input((8,))
hidden = keras.layers.Dense(16, activation="relu")(inputs)
outputs = keras.layers.Dense(1)(hidden)
model = keras_accum.AccumulatingModel(inputs, outputs, accumulate="epoch")
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
history = model.fit(
    x, y, batch_size=100, epochs=5, validation_split=0.2, verbose=2
)
print("Optimizer updates:", int(model.optimizer.iterations.numpy()))


# %% [markdown]
# `optimizer.iterations` counts *applied updates*: 5 after 5 epochs, not 40
# mini-batches. Learning-rate schedules, weight decay and Adam's bias
# correction therefore follow the updates, as they would with one big batch.
#
# ## What gets logged
#
# In epoch mode the weights do not change during an epoch, so every mini-batch
# of an epoch is evaluated at the same weights. The `loss` that `fit` logs (the
# mean over the epoch's mini-batches, weighted by their size) is therefore the
# loss on the whole training split *at the weights the epoch started from*.
# The update is applied before validation runs, so `val_loss` is measured
# *after* the epoch's update. Both checked against `evaluate`:

# %%
def make_model(accumulate="epoch"):
    """The model above: an AccumulatingModel, or a keras.Model for None."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    outputs = keras.layers.Dense(1)(hidden)
    if accumulate is None:
        model = keras.Model(inputs, outputs)
    else:
        model = keras_accum.AccumulatingModel(
            inputs, outputs, accumulate=accumulate
        )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


model = make_model()
loss_before = model.evaluate(x_train, y_train, batch_size=800, verbose=0)
history = model.fit(
    x_train,
    y_train,
    batch_size=100,
    epochs=1,
    validation_data=(x_val, y_val),
    verbose=0,
)
val_after = model.evaluate(x_val, y_val, verbose=0)
print(f"training loss at the starting weights (evaluate): {loss_before:.6f}")
print(f"`loss` logged by fit for epoch 1:                 "
      f"{history.history['loss'][0]:.6f}")
print(f"validation loss after the update (evaluate):      {val_after:.6f}")
print(f"`val_loss` logged by fit for epoch 1:             "
      f"{history.history['val_loss'][0]:.6f}")


# %% [markdown]
# ## When updates happen
#
# With `accumulate=N` the optimizer applies the window every N mini-batches.
# The mini-batches left over at the end of an epoch (here 800 / 100 = 8
# batches: windows of 3, 3 and a leftover of 2) are applied at the end of the
# epoch, so no gradient crosses an epoch boundary. `model.mini_step` is the
# number of mini-batches in the current window. A callback prints both after
# every batch:

# %%
class WatchUpdates(keras.callbacks.Callback):
    """Prints the update counter and the window's fill after every batch."""

    def _print(self, when):
        iterations = int(self.model.optimizer.iterations.numpy())
        print(f"  {when:<18} optimizer.iterations={iterations}  "
              f"mini_step={self.model.mini_step}")

    def on_epoch_begin(self, epoch, logs=None):
        print(f"epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        self._print(f"after batch {batch + 1}:")

    def on_epoch_end(self, epoch, logs=None):
        self._print("at epoch end:")


for accumulate in (3, "epoch"):
    print(f"--- accumulate={accumulate!r}")
    model = make_model(accumulate)
    model.fit(
        x_train,
        y_train,
        batch_size=100,
        epochs=2 if accumulate == 3 else 1,
        callbacks=[WatchUpdates()],
        verbose=0,
    )

# %% [markdown]
# `fit` installs the `keras_accum.ApplyAccumulatedGradients` callback by
# itself, first in the list, so every other callback's `on_epoch_end` (the
# `WatchUpdates` line "at epoch end", `ModelCheckpoint`, `EarlyStopping`...)
# already sees the epoch's update.
#
# ## The same weights as one big batch
#
# One update per epoch is full-batch gradient descent. With
# `reduction="mean"` (the default) the accumulated gradient is exactly the
# gradient of the mean loss over the epoch, so the weights match a plain
# `keras.Model` trained with `batch_size=800`, up to float32 round-off:

# %%
accumulated = make_model("epoch")
reference = make_model(None)
accumulated.fit(x_train, y_train, batch_size=100, epochs=5, verbose=0)
reference.fit(x_train, y_train, batch_size=800, epochs=5, verbose=0)
difference = max(
    np.max(np.abs(a - b))
    for a, b in zip(accumulated.get_weights(), reference.get_weights())
)
print(f"Largest weight difference after 5 updates: {difference:.1e}")

# %% [markdown]
# ## Next
#
# * [02_big_batch_on_small_memory.ipynb](02_big_batch_on_small_memory.ipynb):
#   an effective batch of 4096 from micro-batches of 64, and the memory it saves.
# * [colab_tpu.ipynb](../colab_tpu.ipynb): on a TPU
#   with JAX and `keras.distribution.DataParallel` (TensorFlow's
#   `TPUStrategy` as the documented alternative).
# * `examples/train_digits.py`: a convnet trained plainly, in epoch mode and with
#   `accumulate=8`, with a table of its updates and of its train step's memory.
