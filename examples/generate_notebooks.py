"""Writes the example notebooks from the cell sources below.

    python examples/generate_notebooks.py          # (re)write the .ipynb files
    python examples/generate_notebooks.py --check  # exit 1 if they differ

The notebooks are committed without outputs; edit them here, regenerate,
and `tests/notebooks_test.py` checks that the two agree and that every
notebook runs top to bottom.
"""

import argparse
import pathlib
import sys
import textwrap

import nbformat

EXAMPLES = pathlib.Path(__file__).resolve().parent
COLAB_URL = (
    "https://colab.research.google.com/github/keras-accum/keras-accum/blob/main"
)
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

INSTALL = """
import sys

# On Colab, install keras-accum first. Anywhere else this cell does nothing:
# install the package with `pip install -e ".[examples]"` from the repository.
if "google.colab" in sys.modules:
    %pip install -q "keras-accum @ git+https://github.com/keras-accum/keras-accum"
"""


def colab_url(path):
    """The Colab address of `examples/<path>` on the main branch."""
    return f"{COLAB_URL}/examples/{path}"


def badge(path):
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(path)})"


BIG_BATCH_URL = colab_url("notebooks/02_big_batch_on_small_memory.ipynb")

QUICKSTART = [
    (
        "markdown",
        f"""
# Quickstart: one optimizer update per epoch

{badge("notebooks/01_quickstart.ipynb")}

`keras_accum.AccumulatingModel` is a `keras.Model` whose `train_step` adds
each mini-batch's gradient into accumulators instead of applying it; the
optimizer applies the accumulated gradient once per *window*. This notebook
shows the epoch mode (one update per epoch), what `fit` logs, and exactly
when the updates happen. It runs in a few seconds on a CPU.
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # keras_accum needs TensorFlow.

import keras
import numpy as np

import keras_accum
""",
    ),
    (
        "markdown",
        """
A small regression problem: 1000 examples, 8 features. `validation_split=0.2`
keeps the last 200 for validation.
""",
    ),
    (
        "code",
        """
rng = np.random.default_rng(0)
x = rng.normal(size=(1000, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(1000, 1))).astype(
    "float32"
)
x_train, y_train, x_val, y_val = x[:800], y[:800], x[800:], y[800:]
""",
    ),
    (
        "markdown",
        """
## Epoch mode in ten lines

Build the model as you would a functional `keras.Model`, with
`accumulate="epoch"`. `fit` runs the usual mini-batches of 100, but the
weights move once per epoch, with the gradient of the loss over all 800
training examples.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
`optimizer.iterations` counts *applied updates*: 5 after 5 epochs, not 40
mini-batches. Learning-rate schedules, weight decay and Adam's bias
correction therefore follow the updates, as they would with one big batch.

## What gets logged

In epoch mode the weights do not change during an epoch, so every mini-batch
of an epoch is evaluated at the same weights. The `loss` that `fit` logs (the
mean over the epoch's mini-batches, weighted by their size) is therefore the
loss on the whole training split *at the weights the epoch started from*.
The update is applied before validation runs, so `val_loss` is measured
*after* the epoch's update. Both checked against `evaluate`:
""",
    ),
    (
        "code",
        '''
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
''',
    ),
    (
        "markdown",
        """
## When updates happen

With `accumulate=N` the optimizer applies the window every N mini-batches.
The mini-batches left over at the end of an epoch (here 800 / 100 = 8
batches: windows of 3, 3 and a leftover of 2) are applied at the end of the
epoch, so no gradient crosses an epoch boundary. `model.mini_step` is the
number of mini-batches in the current window. A callback prints both after
every batch:
""",
    ),
    (
        "code",
        '''
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
''',
    ),
    (
        "markdown",
        """
`fit` installs the `keras_accum.ApplyAccumulatedGradients` callback by
itself, first in the list, so every other callback's `on_epoch_end` (the
`WatchUpdates` line "at epoch end", `ModelCheckpoint`, `EarlyStopping`...)
already sees the epoch's update.

## The same weights as one big batch

One update per epoch is full-batch gradient descent. With
`reduction="mean"` (the default) the accumulated gradient is exactly the
gradient of the mean loss over the epoch, so the weights match a plain
`keras.Model` trained with `batch_size=800`, up to float32 round-off:
""",
    ),
    (
        "code",
        """
accumulated = make_model("epoch")
reference = make_model(None)
accumulated.fit(x_train, y_train, batch_size=100, epochs=5, verbose=0)
reference.fit(x_train, y_train, batch_size=800, epochs=5, verbose=0)
difference = max(
    np.max(np.abs(a - b))
    for a, b in zip(accumulated.get_weights(), reference.get_weights())
)
print(f"Largest weight difference after 5 updates: {difference:.1e}")
""",
    ),
    (
        "markdown",
        f"""
## Next

* [02_big_batch_on_small_memory.ipynb]({BIG_BATCH_URL}):
  an effective batch of 4096 from micro-batches of 64, and the memory it saves.
* [colab_tpu.ipynb]({colab_url("colab_tpu.ipynb")}): the same under
  `tf.distribute.TPUStrategy`, with XLA.
* `examples/train_digits.py`: a convnet trained plainly, in epoch mode and with
  `accumulate=8`, with a comparison table.
""",
    ),
]

BIG_BATCH = [
    (
        "markdown",
        f"""
# A big batch on small memory

{badge("notebooks/02_big_batch_on_small_memory.ipynb")}

A big batch needs memory in proportion to its size: every activation of the
forward pass is kept for the backward pass. `AccumulatingModel` computes the
same gradient from micro-batches, so training with an **effective batch of
4096 from micro-batches of 64** needs the memory of a batch of 64. Below, the
same convolutional model trains twice on the same synthetic images: once with
`batch_size=4096`, once with `batch_size=64, accumulate=64`. The loss curves
coincide; the memory does not.

`FULL_SIZE = False` (the default) runs a CI-sized version in under a minute
on a CPU: effective batch 1024 = 16 x 64, 4096 examples, 8 filters. Set it to
`True` for the real thing (effective batch 4096, 65536 examples, 64 filters;
the big batch then needs several GB).
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
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
""",
    ),
    (
        "code",
        """
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # keras_accum needs TensorFlow.
# TensorFlow's CPU allocator keeps the statistics read below only in its BFC
# mode, which must be chosen before TensorFlow starts. (GPUs always keep them.)
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import keras_accum

MEMORY_DEVICE = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
""",
    ),
    (
        "markdown",
        """
## Synthetic images, streamed

Each image is one of 10 fixed random patterns (its class) plus noise twice
as strong. Examples are generated from their index with stateless random
ops, so the data take no memory, both runs see exactly the same examples in
the same order, and only the batch size differs between them.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
## The model

A 3x3 convolution at full resolution dominates the activation memory
(batch x 32 x 32 x filters floats, kept for the backward pass, plus their
gradients). No dropout or batch normalisation, which would make micro-batches
differ from the big batch.
""",
    ),
    (
        "code",
        '''
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
''',
    ),
    ("markdown", "## Train both ways"),
    (
        "code",
        """
accumulated = make_model(accumulate=ACCUMULATE)
accumulated_history, accumulated_mb = fit_and_measure(accumulated, MICRO_BATCH)

big = make_model()
big_history, big_mb = fit_and_measure(big, EFFECTIVE_BATCH)

print(f"accumulate={ACCUMULATE} x {MICRO_BATCH}: "
      f"{int(accumulated.optimizer.iterations.numpy())} updates, "
      f"peak {accumulated_mb:.0f} MB")
print(f"batch_size={EFFECTIVE_BATCH}: {int(big.optimizer.iterations.numpy())} "
      f"updates, peak {big_mb:.0f} MB")
""",
    ),
    (
        "markdown",
        """
## Curves and memory side by side

The memory is the peak of what TensorFlow's allocator held on
`MEMORY_DEVICE` during `fit`: weights, optimizer state, the batch, the
activations kept for the backward pass and the gradients. On a CPU it
includes about 34 MB of scratch space that TensorFlow's convolution gradient
takes even for a tiny batch.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
The accumulated run makes the same number of updates as the big batch, with
the same gradients (up to float32 round-off), at a fraction of the memory.
It takes about as long on a CPU; on an accelerator that a big batch would
fill, the micro-batches run one after the other, so accumulation trades
speed for memory only when the big batch does not fit.
""",
    ),
]

COLAB_TPU = [
    (
        "markdown",
        f"""
# Gradient accumulation on a Colab TPU

{badge("colab_tpu.ipynb")}

Choose *Runtime > Change runtime type > TPU* on Colab. Without a TPU the
notebook falls back to `MirroredStrategy` over several GPUs, or to the default
strategy (one GPU or the CPU), and runs the same code.

An `AccumulatingModel` is built and compiled under `strategy.scope()` and
trained with XLA (`jit_compile=True`), several steps per call
(`steps_per_execution`) and static batch shapes (`drop_remainder=True`).
""",
    ),
    ("code", INSTALL),
    (
        "code",
        """
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # keras_accum needs TensorFlow.

import keras
import numpy as np
import tensorflow as tf

import keras_accum
""",
    ),
    ("markdown", "## Pick the strategy"),
    (
        "code",
        '''
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
''',
    ),
    (
        "markdown",
        """
## Per-replica, global and effective batch

* **Per-replica batch**: the examples one replica (a TPU core, a GPU) sees per
  step.
* **Global batch** = per-replica batch x `strategy.num_replicas_in_sync`: what
  the dataset's `batch()` gets. The strategy splits each global batch across
  the replicas, and one train step computes the gradient of the global batch.
* **Effective batch** = global batch x `accumulate`: the examples behind each
  optimizer update.

On a TPU v2-8 (8 cores) with 128 examples per core and `accumulate=4`, the
global batch is 1024 and each update sees 4096 examples.

XLA compiles one program per input shape, so batches must all have the same
shape: `drop_remainder=True` drops the last, smaller batch (the data keep a
multiple of the global batch here, so nothing is lost). `steps_per_execution`
runs several train steps per call from the host, which keeps a TPU busy;
accumulation windows need not line up with it, but it reads best when the
window is a multiple.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
## Data with static shapes

Synthetic classification: 64 features, 10 classes given by a random linear
teacher.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
## Build, compile and train under the strategy

The model, its optimizer and the accumulators (created like optimizer slots)
must all live under `strategy.scope()`.
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "markdown",
        """
Each update used the gradient of `EFFECTIVE_BATCH` examples, averaged exactly
(`reduction="mean"`) over all replicas and micro-batches; in between,
each replica only adds into its own accumulators, with no communication.
""",
    ),
]

NOTEBOOKS = {
    "notebooks/01_quickstart.ipynb": QUICKSTART,
    "notebooks/02_big_batch_on_small_memory.ipynb": BIG_BATCH,
    "colab_tpu.ipynb": COLAB_TPU,
}


def build_notebook(cells, colab_accelerator=None):
    """An nbformat notebook with stable cell ids and no outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {
            "display_name": "Python 3",
            "language": "python",
            "name": "python3",
        },
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    if colab_accelerator:
        notebook.metadata["accelerator"] = colab_accelerator
    for index, (kind, source) in enumerate(cells):
        source = textwrap.dedent(source).strip("\n")
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{index:02d}"
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


def build_notebooks():
    """`{path relative to examples/: notebook}` for every notebook."""
    return {
        path: build_notebook(
            cells, colab_accelerator="TPU" if "tpu" in path else None
        )
        for path, cells in NOTEBOOKS.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only compare with the committed notebooks",
    )
    args = parser.parse_args(argv)
    stale = []
    for path, notebook in build_notebooks().items():
        target = EXAMPLES / path
        text = nbformat.writes(notebook) + "\n"
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"Wrote {target}")
    if stale:
        print(
            "Out of date (run examples/generate_notebooks.py): "
            + ", ".join(stale)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
