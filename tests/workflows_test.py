"""Differential harness: ordinary Keras workflows, keras_accum vs plain Keras.

Every row of `WORKFLOWS` is a Keras recipe written once (`tests/workflows.py`
has the machinery) and run twice, in float64: with an `AccumulatingModel`
(functional, subclassed or `wrap`ped) fed micro-batches by `fit`, and with a
plain `keras.Model` fed one big batch per window (`fit` with `batch_size` =
the window's examples, `shuffle=False`, same callbacks). The weights, the
number of updates, every logged value and the row's extra values must agree
to a relative error of `RTOL` (1e-9). Where keras_accum refuses a workflow,
the row asserts the documented error or warning instead.

Issue 13: keras_accum must be a drop-in for real Keras workflows, exact or
loudly refusing, never silently wrong. A row that fails names the workflow
that broke; `bug` says what it would catch.
"""

import functools
import itertools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_accum
from tests import helpers
from tests import workflows
from tests.helpers import RTOL
from tests.helpers import NaiveAveragingModel
from tests.helpers import fresh_keras_state
from tests.helpers import relative_error
from tests.workflows import EPOCHS
from tests.workflows import EXAMPLES
from tests.workflows import FEATURES
from tests.workflows import MICRO
from tests.workflows import Expectation
from tests.workflows import Side
from tests.workflows import Workflow
from tests.workflows import dense
from tests.workflows import mlp_class
from tests.workflows import mlp_graph
from tests.workflows import regression
from tests.workflows import two_head_graph

pytestmark = pytest.mark.backends

# ---------------------------------------------------------------------------
# Expected refusals. The library decides what these workflows do; change the
# expectation here, in one place.
# ---------------------------------------------------------------------------

# A subclass that overrides `train_step` bypasses the accumulation: `fit`
# must refuse it before any update (a `TypeError` naming `train_step`).
CUSTOM_TRAIN_STEP = Expectation("raises", TypeError, "train_step")

# `model.trainable = False` after a `fit`, then `compile` and `fit` again:
# nothing is trainable (plain Keras only warns "does not have any trainable
# weights" and trains nothing); keras_accum refuses, as it does for a model
# that never had trainable weights.
NOTHING_TRAINABLE = Expectation("raises", ValueError, "trainable weights")


def _sgd():
    return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)


def _adam(learning_rate=0.01):
    return keras.optimizers.Adam(learning_rate=learning_rate)


# ---------------------------------------------------------------------------
# Workflows. Each takes a `Side` and returns `side.outcome(...)`.
# ---------------------------------------------------------------------------


def simple(side, accumulate=3, optimizer=_sgd, epochs=EPOCHS,
           build_optimizer=False):
    """An MLP, MSE and a metric; the form comes from the row.

    With `build_optimizer`, the optimizer is built before `fit` on both
    sides: plain Keras 3.15 builds a `ScheduleFreeAdamW` inside the first
    traced step, where its `momentum = copy(weight)` initialisation is lost
    (momentum starts at 0); keras_accum builds it eagerly.
    """
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=optimizer(), loss="mse", metrics=["mae"])
    if build_optimizer:
        model.optimizer.build(model.trainable_variables)
    history = side.fit(model, x, y, accumulate=accumulate, epochs=epochs)
    return side.outcome(model, history)


def simple_subclass(side, accumulate=3, epochs=EPOCHS, initial_epoch=0):
    """A subclassed MLP (layers created in `__init__`, unbuilt at `fit`)."""
    x, y = regression()
    model = side.subclass(mlp_class, accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    history = side.fit(
        model, x, y, accumulate=accumulate, epochs=epochs,
        initial_epoch=initial_epoch,
    )
    return side.outcome(model, history)


def wrap_sequential(side, accumulate=3):
    """`keras_accum.wrap` of a built `keras.Sequential`."""
    x, y = regression()
    sequential = keras.Sequential(
        [keras.Input((FEATURES,)), dense(4, 1, "tanh"), dense(1, 2)]
    )
    model = (
        keras_accum.wrap(sequential, accumulate=accumulate)
        if side.accumulating else sequential
    )
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate)
    return side.outcome(model, history)


def fine_tuning(side, equal_shapes, accumulate=3):
    """The Keras transfer-learning guide: freeze, fit, unfreeze, recompile.

    With `equal_shapes` the base's layer and the head have the same weight
    shapes (3x3 kernels), so a stale, positional pairing of gradients with
    accumulators does not crash: it trains the wrong weights.
    """
    width = FEATURES if equal_shapes else 4
    x, y = regression(outputs=width if equal_shapes else 1)
    inputs = keras.Input((FEATURES,))
    base = keras.Sequential(
        [keras.Input((FEATURES,)), dense(width, 1, "tanh")], name="base"
    )
    features = base(inputs, training=False)
    outputs = dense(width if equal_shapes else 1, 2)(features)
    model = side.model(inputs, outputs, accumulate)
    base.trainable = False
    model.compile(optimizer=_adam(0.01), loss="mse")
    frozen = [w.numpy().copy() for w in base.weights]
    first = side.fit(model, x, y, accumulate=accumulate)
    side.require(
        all(np.array_equal(a, w.numpy()) for a, w in zip(frozen, base.weights)),
        "the frozen base moved",
    )
    base.trainable = True
    model.compile(optimizer=_adam(0.001), loss="mse")
    second = side.fit(
        model, x, y, accumulate=accumulate, initial_epoch=EPOCHS,
        epochs=2 * EPOCHS,
    )
    side.require(
        not np.array_equal(frozen[0], base.weights[0].numpy()),
        "the unfrozen base did not train",
    )
    return side.outcome(model, first, second)


def partial_freezing(side, accumulate=3):
    """One layer frozen from the start; the rest trains."""
    x, y = regression()
    inputs = keras.Input((FEATURES,))
    frozen_layer = dense(4, 1, "tanh")
    hidden = dense(4, 3, "tanh")(frozen_layer(inputs))
    model = side.model(inputs, dense(1, 2)(hidden), accumulate)
    frozen_layer.trainable = False
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate)
    return side.outcome(model, history)


def freeze_after_training(side, accumulate=3):
    """Train everything, then freeze the first layer and recompile."""
    x, y = regression()
    inputs = keras.Input((FEATURES,))
    first_layer = dense(4, 1, "tanh")
    hidden = dense(4, 3, "tanh")(first_layer(inputs))
    model = side.model(inputs, dense(1, 2)(hidden), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    first = side.fit(model, x, y, accumulate=accumulate)
    first_layer.trainable = False
    model.compile(optimizer=_sgd(), loss="mse")
    second = side.fit(
        model, x, y, accumulate=accumulate, initial_epoch=EPOCHS,
        epochs=2 * EPOCHS,
    )
    return side.outcome(model, first, second)


def freeze_without_recompile(side, accumulate=3):
    """Freeze a layer between two `fit` calls without `compile()`.

    Plain Keras keeps the traced step, so the layer keeps training until
    the next `compile()`; keras_accum must do the same, not pair the old
    gradients with a new variable list.
    """
    x, y = regression()
    inputs = keras.Input((FEATURES,))
    first_layer = dense(4, 1, "tanh")
    model = side.model(inputs, dense(1, 2)(first_layer(inputs)), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    first = side.fit(model, x, y, accumulate=accumulate)
    first_layer.trainable = False
    second = side.fit(
        model, x, y, accumulate=accumulate, initial_epoch=EPOCHS,
        epochs=2 * EPOCHS,
    )
    return side.outcome(model, first, second)


def nothing_trainable(side, accumulate=3):
    """`model.trainable = False` after a `fit`, then recompile and fit."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    side.fit(model, x, y, accumulate=accumulate)
    model.trainable = False
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate)
    return side.outcome(model, history)


def _two_head_targets(seed=0):
    x, y = regression(outputs=2, seed=seed)
    return x, {"a": y[:, :1], "b": y[:, 1:]}


def head_without_loss(side, optimizer, accumulate=3):
    """Two heads, `loss={"a": "mse", "b": None}`: head b has no gradient."""
    x, y = _two_head_targets()
    model = side.model(*two_head_graph(), accumulate)
    model.compile(optimizer=optimizer(), loss={"a": "mse", "b": None})
    head_b = [w.numpy().copy() for w in model.get_layer("b").weights]
    history = side.fit(model, x, y, accumulate=accumulate)
    # Plain Keras on TensorFlow passes head b a `None` gradient, so its
    # optimizer leaves it alone; on JAX a zero gradient, which weight decay
    # moves. The comparison holds keras_accum to the same either way.
    side.require(
        keras.backend.backend() == "jax"
        or all(
            np.array_equal(a, w.numpy())
            for a, w in zip(head_b, model.get_layer("b").weights)
        ),
        "head b (no loss) moved",
    )
    return side.outcome(model, history)


def two_heads(side, accumulate=3, loss=None, loss_weights=None,
              sample_weight=None, **options):
    """A two-head model with dict losses (and optional weights).

    `loss` may be a callable returning the losses: `Loss` objects must be
    made inside the run, where floatx is float64 (see `_mse`).
    """
    x, y = _two_head_targets()
    if callable(loss):
        loss = loss()
    model = side.model(*two_head_graph(), accumulate, **options)
    model.compile(
        optimizer=_adam(), loss=loss or {"a": "mse", "b": "huber"},
        loss_weights=loss_weights, metrics={"a": ["mae"]},
    )
    history = side.fit(
        model, x, y, accumulate=accumulate,
        sample_weight=None if sample_weight is None else sample_weight(),
    )
    return side.outcome(model, history)


def _mse(reduction):
    """`MeanSquaredError(reduction=...)`, made when called.

    A `keras.losses.Loss` fixes its dtype to `floatx()` when constructed
    and casts `y_true`, `y_pred` and the sample weights to it. Made at
    import, when floatx is still float32, it computed in float32 on both
    sides: the reference's `sum / sum(weights)` over a big batch and the
    window's per-micro-batch `sum / sum(weights)` then round differently
    (measured: 4.6e-8 relative in the weights, Adam; SGD 5.4e-7), which
    no float64 comparison can tell from a bug.
    """
    return keras.losses.MeanSquaredError(reduction=reduction)


def _per_output_weights():
    rng = np.random.default_rng(5)
    return {
        "a": rng.uniform(0.0, 3.0, EXAMPLES),
        "b": rng.uniform(0.0, 3.0, EXAMPLES) * (rng.random(EXAMPLES) > 0.3),
    }


def validation_split(side, accumulate=3):
    """`validation_split=0.25`: windows of the first 33 examples (24, 9)."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse", metrics=["mae"])
    history = side.fit(
        model, x, y, accumulate=accumulate, validation_split=0.25
    )
    return side.outcome(model, history)


def initial_epoch(side, accumulate=3):
    """`fit(initial_epoch=2, epochs=4)` on a fresh model."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate, initial_epoch=2,
                       epochs=4)
    return side.outcome(model, history)


def repeated_dataset(side, accumulate=2):
    """`batch(8).repeat()` with `steps_per_epoch=4` micro-batches.

    The 44 examples make micro-batches 8, 8, 8, 8, 8, 4, 8, ...: epochs
    begin mid-pass and one window holds the ragged batch. The reference
    concatenates each window's micro-batches of the same stream.
    """
    x, y = regression()
    micro = tf.data.Dataset.from_tensor_slices((x, y)).batch(MICRO)
    steps = 4
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    if side.accumulating:
        dataset = micro.repeat()
    else:
        batches = [
            (np.asarray(a), np.asarray(b)) for a, b in micro.as_numpy_iterator()
        ]
        def windows():
            # Called once per iterator: on TensorFlow, Keras keeps one
            # across epochs when `steps_per_epoch` is set; on JAX it makes
            # one per epoch, and the accumulating side's `.repeat()`
            # restarts too.
            stream = itertools.cycle(batches)
            while True:
                window = [next(stream) for _ in range(accumulate)]
                yield tuple(np.concatenate(part) for part in zip(*window))

        spec = (
            tf.TensorSpec((None, FEATURES), "float64"),
            tf.TensorSpec((None, 1), "float64"),
        )
        dataset = tf.data.Dataset.from_generator(
            windows, output_signature=spec
        )
        steps //= accumulate
    history = side.fit(
        model, dataset, accumulate=accumulate, steps_per_epoch=steps,
        epochs=3,
    )
    return side.outcome(model, history)


def steps_per_execution(side, accumulate=4):
    """`steps_per_execution=3` with windows of 4 (6 micro-batches/epoch)."""
    if keras.backend.backend() == "torch":
        pytest.skip("Keras on torch runs one step per execution")
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_sgd(), loss="mse", steps_per_execution=3)
    history = side.fit(model, x, y, accumulate=accumulate, epochs=3)
    return side.outcome(model, history)


def class_weight(side, accumulate=3):
    """Binary classification with `class_weight`."""
    x, y = regression()
    labels = (y > 0.3).astype("float64")
    inputs = keras.Input((FEATURES,))
    outputs = dense(1, 2, "sigmoid")(dense(4, 1, "tanh")(inputs))
    model = side.model(inputs, outputs, accumulate)
    model.compile(optimizer=_sgd(), loss="binary_crossentropy",
                  metrics=["accuracy"])
    history = side.fit(
        model, x, labels, accumulate=accumulate,
        class_weight={0: 0.4, 1: 2.5},
    )
    return side.outcome(model, history)


def dataset_sample_weight(side, accumulate=3):
    """Sample weights as the third element of a `tf.data` dataset."""
    x, y = regression()
    weights = np.random.default_rng(3).uniform(0.0, 3.0, EXAMPLES)
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(
        model, side.dataset((x, y, weights), accumulate),
        accumulate=accumulate,
    )
    return side.outcome(model, history)


def reduce_lr_on_plateau(side, accumulate=3):
    """`ReduceLROnPlateau` that fires every epoch after the first."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e3
    )
    history = side.fit(
        model, x, y, accumulate=accumulate, epochs=3, callbacks=[callback]
    )
    learning_rate = float(model.optimizer.learning_rate.numpy())
    side.require(learning_rate < 0.1, "ReduceLROnPlateau never fired")
    return side.outcome(model, history, learning_rate=learning_rate)


def early_stopping(side, accumulate=3):
    """`EarlyStopping(restore_best_weights=True)` on a worsening val_loss."""
    x, y = regression()
    x_val, y_val = regression(n=20, seed=1)
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    callback = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=1, restore_best_weights=True
    )
    history = side.fit(
        model, x, y, accumulate=accumulate, epochs=6, callbacks=[callback],
        validation_data=(x_val, -y_val),  # Gets worse as training goes on.
    )
    side.require(len(history["loss"]) < 6, "EarlyStopping never stopped")
    return side.outcome(model, history)


def learning_rate_scheduler(side, accumulate=3):
    """`LearningRateScheduler` halving the rate every epoch."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    callback = keras.callbacks.LearningRateScheduler(
        lambda epoch, rate: 0.1 * 0.5**epoch
    )
    history = side.fit(
        model, x, y, accumulate=accumulate, epochs=3, callbacks=[callback]
    )
    return side.outcome(
        model, history,
        learning_rate=float(model.optimizer.learning_rate.numpy()),
    )


def learning_rate_schedule(side, accumulate=3):
    """A `keras.optimizers.schedules` rate: evaluated per update."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.7)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate, epochs=3)
    return side.outcome(model, history)


def fit_evaluate_fit(side, accumulate=3):
    """`fit`, `evaluate`, `fit` again."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse", metrics=["mae"])
    first = side.fit(model, x, y, accumulate=accumulate)
    evaluated = model.evaluate(x, y, batch_size=MICRO, verbose=0)
    second = side.fit(
        model, x, y, accumulate=accumulate, initial_epoch=EPOCHS,
        epochs=2 * EPOCHS,
    )
    return side.outcome(model, first, second, evaluated=evaluated)


def two_wraps(side):
    """One base model trained by `wrap(base, 2)`, then by `wrap(base, 4)`."""
    x, y = regression()
    base = keras.Model(*mlp_graph())
    models = []
    histories = []
    for accumulate, optimizer in ((2, _sgd), (4, _adam)):
        model = (
            keras_accum.wrap(base, accumulate=accumulate)
            if side.accumulating else base
        )
        model.compile(optimizer=optimizer(), loss="mse")
        histories.append(side.fit(model, x, y, accumulate=accumulate))
        models.append(model)
    return side.outcome(models[-1], *histories)


SCHEDULE = {0: 2, 1: 4}


def schedule_functional(side, accumulate=SCHEDULE):
    """A dict schedule on a functional model (3 epochs)."""
    return simple(side, accumulate=accumulate, optimizer=_adam, epochs=3)


def schedule_two_fits(side, accumulate=SCHEDULE):
    """A schedule across two `fit` calls (`initial_epoch=1` the second)."""
    x, y = regression()
    model = side.model(*mlp_graph(), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    first = side.fit(model, x, y, accumulate=accumulate, epochs=1)
    second = side.fit(model, x, y, accumulate=accumulate, initial_epoch=1,
                      epochs=3)
    return side.outcome(model, first, second)


def _schedule_callable(epoch):
    return 2 if epoch == 0 else 4


def custom_train_step_class(base):
    """A GAN-style subclass with its own `train_step`."""

    class CustomStep(mlp_class(base)):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((self(x, training=True) - y) ** 2)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            return {"loss": loss}

    class TorchCustomStep(mlp_class(base)):
        train_step = helpers.own_torch_update

    return TorchCustomStep if keras.backend.backend() == "torch" else CustomStep


def custom_train_step(side, accumulate="epoch"):
    """A subclass overriding `train_step` (gets no accumulation)."""
    x, y = regression()
    model = side.subclass(custom_train_step_class, accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate)
    return side.outcome(model, history)


def dropout(side, accumulate=3):
    """Seeded `Dropout`, shuffled data: reruns must be bit-identical."""
    x, y = regression()
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dropout(0.5, seed=5)(dense(8, 1, "tanh")(inputs))
    model = side.model(inputs, dense(1, 2)(hidden), accumulate)
    model.compile(optimizer=_adam(), loss="mse")
    history = side.fit(model, x, y, accumulate=accumulate, shuffle=True)
    return side.outcome(model, history)


def embedding(side, accumulate=3):
    """Padded token sequences, `Embedding(mask_zero=True)`, SGD."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 7, EXAMPLES)
    tokens = rng.integers(1, 10, (EXAMPLES, 6)) * (
        np.arange(6) < lengths[:, None]
    )
    y = rng.normal(size=(EXAMPLES, 1))
    inputs = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(
        10, 3, mask_zero=True,
        embeddings_initializer=keras.initializers.RandomNormal(seed=4),
    )(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    model = side.model(inputs, dense(1, 2)(pooled), accumulate)
    model.compile(optimizer=_sgd(), loss="mse")
    history = side.fit(model, tokens, y, accumulate=accumulate)
    return side.outcome(model, history)


def _multi_optimizer():
    return keras.optimizers.MultiOptimizer(
        lambda variable: (
            keras.optimizers.Adam(0.01) if "kernel" in variable.path
            else keras.optimizers.SGD(0.1)
        )
    )


# One row per optimizer *feature* that meets the window: the library has no
# optimizer-specific code, so optimizers whose update is an element-wise
# function of the gradient and their own slots (SGD with Nesterov momentum,
# Adamax, Adagrad, Adadelta, RMSprop, Ftrl, Lion) behave as SGD with
# momentum and Adam, which most other rows use. What remains: slots that
# depend on `iterations` (Adam's bias correction with AMSGrad's maximum,
# Nadam's momentum schedule), decoupled weight decay, whole-tensor norms
# (Lamb's trust ratio, `clipnorm`), factored slots (Adafactor), shape-split
# updates (Muon), a build that plain Keras gets wrong (ScheduleFreeAdamW),
# nested optimizers (MultiOptimizer) and EMA weights overwritten every
# `ema_overwrite_frequency` updates.
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "adafactor": lambda: keras.optimizers.Adafactor(0.01),
    "muon": lambda: keras.optimizers.Muon(0.01),
    "schedule-free-adamw": lambda: keras.optimizers.ScheduleFreeAdamW(0.01),
    "multi-optimizer": _multi_optimizer,
    "sgd-clipnorm-ema": lambda: keras.optimizers.SGD(
        0.1, momentum=0.9, clipnorm=0.5, use_ema=True,
        ema_overwrite_frequency=2,
    ),
}


def _row(name, run, bug, **kwargs):
    return Workflow(name=name, run=run, bug=bug, **kwargs)


P = functools.partial

WORKFLOWS = [
    # Forms.
    _row("functional-every-n", simple, "exactness of the basic step"),
    _row("functional-epoch", P(simple, accumulate="epoch"),
         "epoch mode, ragged last batch"),
    _row("subclass-every-n", simple_subclass,
         "a subclassed model built inside the first trace"),
    _row("subclass-wrapping-functional", simple, "subclass form",
         form="subclass"),
    _row("wrap-functional", simple, "wrap() of a functional model",
         form="wrap"),
    _row("wrap-sequential", wrap_sequential, "wrap() of a Sequential"),
    # Trainable-set changes (issue 13, bug 1).
    _row("fine-tuning-equal-shapes", P(fine_tuning, equal_shapes=True),
         "stale positional pairing trains the wrong weights silently"),
    _row("fine-tuning-different-shapes-wrap",
         P(fine_tuning, equal_shapes=False),
         "accumulators kept from the first fit: shape error; fine-tuning "
         "through wrap()", form="wrap"),
    _row("fine-tuning-subclass", P(fine_tuning, equal_shapes=True),
         "fine-tuning a subclassed model", form="subclass"),
    _row("partial-freezing", partial_freezing, "frozen layer in the window"),
    _row("freeze-after-training", freeze_after_training,
         "a layer frozen between fits (fewer trainable weights)"),
    # Plain Keras on JAX fails in the retraced step (its optimizer was
    # built for the old variables): keras_accum refuses there, clearly.
    _row("freeze-without-recompile", freeze_without_recompile,
         "trainable toggled without compile: follow plain Keras",
         eager_reference=False,
         **({"mode": "refusal", "expectation": Expectation(
             "raises", ValueError, "changed since `compile\\(\\)`")}
            if keras.backend.backend() == "jax" else {})),
    _row("model-trainable-false-recompile", nothing_trainable,
         "nothing trainable after a fit trains silently",
         mode="refusal", expectation=NOTHING_TRAINABLE),
    # Heads without loss (bug 2).
    _row("head-without-loss-adamw",
         P(head_without_loss,
           optimizer=lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)),
         "weight decay applied to a head without gradient"),
    _row("head-without-loss-sgd-momentum-decay",
         P(head_without_loss,
           optimizer=lambda: keras.optimizers.SGD(
               0.1, momentum=0.9, weight_decay=0.1)),
         "momentum/decay applied to a head without gradient"),
    # Several losses (bug 5).
    _row("multi-output-dict-losses", two_heads, "dict losses"),
    _row("loss-weights",
         P(two_heads, loss={"a": "mse", "b": "mse"},
           loss_weights={"a": 0.3, "b": 2.0}),
         "loss_weights"),
    _row("mixed-reductions-sum-and-mean",
         P(two_heads, loss=lambda: {"a": _mse("sum"), "b": "mse"}),
         "a sum loss next to a mean under the default normalisation"),
    _row("mean-with-sample-weight-per-output",
         P(two_heads, loss=lambda: {
             "a": _mse("mean_with_sample_weight"),
             "b": _mse("mean_with_sample_weight")},
           sample_weight=_per_output_weights),
         "per-output weight sums under the default normalisation"),
    # fit arguments.
    _row("validation-split", validation_split,
         "validation_split windows and val_ logs"),
    _row("initial-epoch", initial_epoch, "initial_epoch"),
    _row("steps-per-epoch-repeated-dataset", repeated_dataset,
         "steps_per_epoch on an endless dataset"),
    _row("steps-per-execution-3-window-4", steps_per_execution,
         "steps_per_execution not dividing the window"),
    _row("class-weight", class_weight, "class_weight"),
    _row("dataset-sample-weight", dataset_sample_weight,
         "(x, y, sample_weight) datasets"),
    # Callbacks and repeated fits.
    _row("reduce-lr-on-plateau", reduce_lr_on_plateau,
         "ReduceLROnPlateau acting per epoch"),
    _row("early-stopping-restore-best", early_stopping,
         "EarlyStopping(restore_best_weights=True)"),
    _row("learning-rate-scheduler", learning_rate_scheduler,
         "LearningRateScheduler"),
    _row("learning-rate-schedule-object", learning_rate_schedule,
         "schedules evaluated per update, not per micro-batch"),
    _row("fit-evaluate-fit", fit_evaluate_fit, "evaluate between fits"),
    _row("two-wraps-different-accumulate", two_wraps,
         "two fits with different windows on shared weights"),
    # Window schedules (bug 3).
    _row("schedule-dict-functional", schedule_functional,
         "dict schedule, functional"),
    _row("schedule-dict-subclass", P(simple_subclass, accumulate=SCHEDULE,
                                     epochs=3),
         "schedule ignored in the first epoch of a subclassed model"),
    _row("schedule-dict-subclass-initial-epoch-1",
         P(simple_subclass, accumulate=SCHEDULE, epochs=3, initial_epoch=1),
         "schedule ignored with initial_epoch=1 on a subclassed model"),
    _row("schedule-callable-subclass",
         P(simple_subclass, accumulate=_schedule_callable, epochs=3),
         "callable schedule on a subclassed model"),
    _row("schedule-wrap", schedule_functional, "schedule through wrap()",
         form="wrap"),
    _row("schedule-two-fits", schedule_two_fits,
         "schedule continued by a second fit"),
    # Custom steps (bug 4).
    _row("custom-train-step", custom_train_step,
         "a train_step override silently gets no accumulation",
         mode="refusal", expectation=CUSTOM_TRAIN_STEP),
    # Layers.
    _row("dropout-seeded-rerun", dropout,
         "non-deterministic micro-steps", mode="rerun"),
    _row("embedding-masked-sgd", embedding, "masked Embedding, SGD"),
] + [
    _row(f"optimizer-{name}",
         P(simple, optimizer=optimizer, build_optimizer=True),
         f"{name}: one update per window")
    for name, optimizer in OPTIMIZERS.items()
]


def _run(workflow, accumulating):
    fresh_keras_state()
    side = Side(
        accumulating, form=workflow.form,
        eager_reference=workflow.eager_reference,
    )
    return workflow.run(side)


def _compared(history):
    """The logs both runs must agree on.

    Per-output losses (`a_loss`, `val_b_loss`) are left out: plain Keras
    weights each batch's by its static batch size, which is unknown in a
    traced step, so its own logs then average batches unweighted and change
    with the batching (measured: `a_loss` 2.1593 traced vs 2.1388 eager for
    the same weights). The total `loss` and compiled metrics are weighted by
    examples in both modes, and are compared.
    """
    return {
        key: values for key, values in history.items()
        if key in ("loss", "val_loss") or not key.endswith("_loss")
    }


def _differences(outcome, reference):
    """Relative error of everything two outcomes must agree on."""
    errors = {"weights": relative_error(outcome.weights, reference.weights)}
    if outcome.iterations != reference.iterations:
        errors["iterations"] = float("inf")
    values = {
        f"history[{k!r}]": v for k, v in _compared(reference.history).items()
    }
    values.update({f"extra[{k!r}]": v for k, v in reference.extra.items()})
    observed = {
        f"history[{k!r}]": v for k, v in _compared(outcome.history).items()
    }
    observed.update({f"extra[{k!r}]": v for k, v in outcome.extra.items()})
    for key in sorted(set(values) | set(observed)):
        if key not in values or key not in observed:
            errors[key] = float("inf")
            continue
        a = np.asarray(observed[key], np.float64)
        b = np.asarray(values[key], np.float64)
        errors[key] = (
            relative_error([a], [b]) if a.shape == b.shape else float("inf")
        )
    return errors


def _describe(errors, outcome, reference):
    worst = max(errors, key=errors.get)
    text = (
        f"weights relative error {errors['weights']:.3g}; worst: {worst} "
        f"relative error {errors[worst]:.3g}"
    )
    if "iterations" in errors:
        text += (
            f"; iterations {outcome.iterations} vs reference "
            f"{reference.iterations}"
        )
    return text


# Known, documented gaps: strict, so a fix shows up as an XPASS to remove.
KNOWN_GAPS = {
    # "row-name": "what differs, by how much, and what was ruled out",
}


# Rows left out of CI's JAX run (`-m backends`), to keep CI within its budget:
# their library code is backend-neutral (schedules, callbacks, fit
# arguments, forms) or an optimizer whose window meets the same JAX step as
# the rows kept. All 50 rows passed on JAX on 2026-12-03;
# `KERAS_ACCUM_FULL_HARNESS=1` runs them there too.
TENSORFLOW_RUN_ONLY = frozenset({
    "subclass-wrapping-functional", "wrap-sequential",
    "fine-tuning-subclass", "head-without-loss-sgd-momentum-decay",
    "loss-weights", "initial-epoch", "class-weight",
    "reduce-lr-on-plateau", "learning-rate-scheduler",
    "learning-rate-schedule-object", "fit-evaluate-fit",
    "schedule-dict-functional", "schedule-dict-subclass-initial-epoch-1",
    "schedule-callable-subclass", "schedule-wrap",
    "optimizer-adamw", "optimizer-nadam", "optimizer-lamb",
    "optimizer-adafactor",
})


def _marks(workflow):
    marks = []
    if workflow.name in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True,
                                       reason=KNOWN_GAPS[workflow.name]))
    if (workflow.name in TENSORFLOW_RUN_ONLY
            and not os.environ.get("KERAS_ACCUM_FULL_HARNESS")):
        marks.append(pytest.mark.tensorflow_only)
    return marks


def _params(workflows):
    return [pytest.param(w, id=w.name, marks=_marks(w)) for w in workflows]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("workflow", _params(WORKFLOWS))
def test_workflow(workflow, record_property):
    """Each row: keras_accum equals plain Keras' big batch, or refuses."""
    if workflow.mode == "refusal":
        expected = workflow.expectation
        context = (
            pytest.raises(expected.category, match=expected.match)
            if expected.kind == "raises"
            else pytest.warns(expected.category, match=expected.match)
        )
        with context:
            _run(workflow, accumulating=True)
        return
    outcome = _run(workflow, accumulating=True)
    assert all(w.dtype == np.float64 for w in outcome.weights)
    if workflow.mode == "rerun":
        again = _run(workflow, accumulating=True)
        errors = _differences(again, outcome)
        record_property("relative_error", float(max(errors.values())))
        identical = all(
            np.array_equal(a, b) for a, b in zip(again.weights, outcome.weights)
        )
        assert identical, (
            f"{workflow.name}: reruns differ, "
            f"{_describe(errors, again, outcome)}"
        )
        return
    reference = _run(workflow, accumulating=False)
    errors = _differences(outcome, reference)
    record_property("relative_error", float(max(errors.values())))
    assert max(errors.values()) <= RTOL, (
        f"{workflow.name} ({workflow.bug}): "
        f"{_describe(errors, outcome, reference)}"
    )


@pytest.mark.usefixtures("float64")
def test_harness_rejects_naive_averaging(monkeypatch):
    """The harness can fail: naive per-step averaging misses its reference.

    Catches a harness whose two sides train alike whatever the library does
    (e.g. a reference fed micro-batches).
    """
    monkeypatch.setattr(workflows, "AccumulatingModel", NaiveAveragingModel)
    workflow = next(w for w in WORKFLOWS if w.name == "functional-every-n")
    errors = _differences(
        _run(workflow, accumulating=True), _run(workflow, accumulating=False)
    )
    assert errors["weights"] > 1e3 * RTOL, errors


def _keras_objects(value):
    """`Loss` and `Metric` objects inside a row's arguments."""
    if isinstance(value, (keras.losses.Loss, keras.metrics.Metric)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [o for v in value for o in _keras_objects(v)]
    return []


def test_rows_make_losses_inside_the_run():
    """No row holds a `Loss` or `Metric` made at import.

    Those fix their dtype to floatx when constructed, which is float32 at
    import: the row would compare float32 arithmetic at float64 tolerance
    (the cause of 4.6e-8 in "mean-with-sample-weight-per-output").
    """
    for workflow in WORKFLOWS:
        run = workflow.run
        arguments = list(getattr(run, "args", ())) + list(
            getattr(run, "keywords", {}).values()
        )
        assert not _keras_objects(arguments), workflow.name
