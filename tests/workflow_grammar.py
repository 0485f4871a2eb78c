"""A grammar of Keras workflows, drawn at random and built on either side.

`draw(seed)` draws a workflow: a dict of *features* (model form, loss
set-up, regularisers, optimizer features, window, `fit` arguments, devices,
the gradient noise scale measured or not)
that users combine, with the combinations Keras itself does not support
resolved away at draw time, so the dict alone says what runs. `run(features,
side)` builds and trains that workflow on a `tests.workflows.Side`: on the
accumulating side an `AccumulatingModel` fed micro-batches (under two logical
devices where `features["devices"] == 2`), on the plain side a
`keras.Model` fed one big batch per window on one device. Both return an
`Outcome`; `tests/generated_workflows_test.py` compares them.

`describe(features)` prints only what differs from `BASE`, the simplest
workflow, and `shrink(features, fails)` drops features one at a time while
`fails(candidate)` stays true, for a minimal reproducer.

Models are tiny (float64, relu or linear, small learning rates, summed
losses at a tenth of the rate) so that training is not chaotic: a reference
whose weights or losses blow up is reported as diverged, not compared.
"""

import dataclasses
import os
import random
import tempfile

import keras
import numpy as np
from keras import ops

import keras_accum
from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests.workflows import FEATURES
from tests.workflows import dense

TIME = 4  # Time steps of the sequence inputs.
VOCABULARY = 10
VALIDATION = 12  # Even: divides over two devices.
EPOCHS = 2  # Per `fit` call.
REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight")
# How a custom `compute_loss` combines its Keras losses: exact (a sum, a
# weighted sum) or refused (a hand-written mean beside them, the square
# root of the sum: no normaliser Keras reports, not linear).
COMBINATIONS = ("sum", "sum", "weighted", "hand_written_mean", "sqrt")

# The simplest workflow; `draw` changes some of these, `shrink` resets them.
BASE = {
    "form": "functional",
    "input": "dense",
    "task": "regression",
    "activation": "linear",
    "outputs": 1,
    "reductions": ["sum_over_batch_size"],
    "loss_weights": None,
    "loss": "compiled",
    "custom_reductions": None,
    "custom_combination": "sum",
    "sample_weight": False,
    "class_weight": False,
    "kernel_regularizer": False,
    "activity_regularizer": False,
    "add_loss": False,
    "optimizer": "sgd",
    "clip": None,
    "weight_decay": False,
    "ema": False,
    "lr_schedule": False,
    "accumulate": 2,
    "examples": 44,
    "steps_per_execution": 1,
    "validation": False,
    "fits": 1,
    "freeze": False,
    "devices": 1,
    "micro_batch_size": None,
    # `AccumulatingModel(noise_scale=True)`: measures the gradient noise
    # scale, must never change training (refused where it cannot measure).
    "noise_scale": False,
}

FORMS = ("functional", "wrap_functional", "wrap_sequential", "subclass",
         "clone", "loaded")


def draw(seed):
    """The features of workflow `seed` (a plain dict, printable)."""
    rng = random.Random(seed)

    def maybe(p=0.3):
        return rng.random() < p

    f = dict(BASE)
    f["form"] = rng.choice(FORMS)
    f["input"] = rng.choice(["dense", "dense", "masking", "embedding"])
    f["task"] = rng.choice(["regression", "regression", "binary"])
    f["activation"] = rng.choice(["linear", "relu"])
    f["outputs"] = 2 if maybe(0.3) else 1
    f["reductions"] = [rng.choice(REDUCTIONS) for _ in range(f["outputs"])]
    if f["outputs"] == 2 and maybe(0.5):
        f["loss_weights"] = [rng.choice([0.5, 1.0, 2.0]) for _ in range(2)]
    if f["outputs"] == 1 and maybe(0.3):
        f["loss"] = rng.choice(["custom_terms", "custom_plus_super"])
        f["custom_reductions"] = [rng.choice(REDUCTIONS) for _ in range(2)]
    f["sample_weight"] = maybe(0.4)
    f["class_weight"] = maybe(0.3)
    f["kernel_regularizer"] = maybe(0.25)
    f["activity_regularizer"] = maybe(0.25)
    f["add_loss"] = maybe(0.15)
    f["optimizer"] = rng.choice(["sgd", "sgd_momentum", "adam"])
    f["clip"] = rng.choice([None, None, "clipnorm", "global_clipnorm",
                            "clipvalue"])
    f["weight_decay"] = maybe(0.2)
    f["ema"] = maybe(0.15)
    f["lr_schedule"] = maybe(0.2)
    f["accumulate"] = rng.choice([1, 2, 3, 4, "epoch", {0: 2, 1: 3}])
    f["examples"] = rng.choice([44, 48])
    f["steps_per_execution"] = rng.choice([1, 1, 2, 3])
    f["validation"] = maybe(0.3)
    f["fits"] = 2 if maybe(0.3) else 1
    f["freeze"] = f["fits"] == 2 and maybe(0.5)
    f["devices"] = 2 if maybe(0.3) else 1
    # Drawn last, so that the draws above stay those of earlier versions.
    f["custom_combination"] = rng.choice(COMBINATIONS)
    # Each batch of `MICRO` (8; 4 per device on two) split in the step:
    # 3 leaves a shorter last micro-batch.
    f["micro_batch_size"] = rng.choice([None, None, 2, 3])
    # Drawn after all the above, so that each seed draws the other
    # features it drew before the noise scale joined the grammar.
    f["noise_scale"] = maybe(0.3)
    return resolve(f)


def resolve(f):
    """`f` with combinations Keras does not support replaced (idempotent)."""
    f = dict(f)
    if f["outputs"] == 1:
        f["loss_weights"] = None
        f["reductions"] = f["reductions"][:1]
    if f["loss"] == "compiled":
        f["custom_reductions"] = None
        f["custom_combination"] = "sum"
    else:
        f["outputs"] = 1
        f["reductions"] = f["reductions"][:1]
        f["loss_weights"] = None
        # A functional class with a `compute_loss` override is a subclass
        # (of `FunctionalAccumulatingModel`, as keras_accum documents);
        # `wrap`, `clone_model` and `.keras` files keep no override.
        if f["form"] not in ("functional", "subclass"):
            f["form"] = "subclass"
    if f["form"] == "wrap_sequential" and f["outputs"] == 2:
        f["form"] = "wrap_functional"
    # Keras takes `class_weight` for a single 2-D target only.
    if not (f["task"] == "binary" and f["input"] == "dense"
            and f["outputs"] == 1):
        f["class_weight"] = False
    if f["class_weight"]:  # Keras takes one or the other.
        f["sample_weight"] = False
    # Adam on TensorFlow decays its moments once per token occurrence of an
    # `Embedding`'s sparse gradient (KERAS_NOTES.md): not a dense update.
    # Clipping likewise sees one gradient row per occurrence there: norms
    # and clipped values differ from the dense gradient's.
    if f["input"] == "embedding":
        if f["optimizer"] == "adam":
            f["optimizer"] = "sgd_momentum"
        f["clip"] = None
    if f["fits"] == 1:
        f["freeze"] = False
    # The reference follows a window schedule with one `fit` per epoch, and
    # Keras writes the EMA weights into the model at the end of each `fit`
    # (`finalize_variable_values`): not one run's EMA. (Every draw of the
    # first long run with both, 6 of 500, differed for that reason only.)
    if isinstance(f["accumulate"], dict):
        f["ema"] = False
    # Plain Keras 3.15 on JAX fails a second `fit` with `use_ema=True`: it
    # donates one buffer twice ("Attempt to donate the same buffer twice"),
    # and under `DataParallel` the process dies (segmentation fault), so
    # neither side can be judged (measured 2026-12-07).
    if keras.backend.backend() == "jax" and f["fits"] == 2:
        f["ema"] = False
    # Keras on torch has neither `keras.distribution` (no devices to
    # split over) nor several steps per execution (its trainer refuses).
    if keras.backend.backend() == "torch":
        f["devices"] = 1
        f["steps_per_execution"] = 1
    # Kept whatever the other features: it is either measured (and must
    # leave training unchanged) or refused, by the rule the harness's
    # oracle checks (`generated_workflows_test.noise_scale_refusal`).
    f["noise_scale"] = bool(f["noise_scale"])
    return f


def describe(f):
    """The features of `f` that differ from `BASE`, as a dict literal."""
    return {k: v for k, v in f.items() if BASE.get(k) != v}


def shrink(f, fails):
    """Greedily resets features of `f` to `BASE` while `fails(f)` holds.

    Returns:
        The smallest failing feature dict found (one pass per feature,
        repeated until nothing more can be removed).
    """
    changed = True
    while changed:
        changed = False
        for key in list(describe(f)):
            candidate = resolve({**f, key: BASE[key]})
            if candidate != f and fails(candidate):
                f, changed = candidate, True
    return f


# Data ------------------------------------------------------------------------


def data(f, n, seed):
    """`(x, y, sample_weight, class_weight)` for workflow `f`."""
    rng = np.random.default_rng(seed)
    if f["input"] == "dense":
        x = rng.normal(size=(n, FEATURES))
        signal = x @ rng.normal(size=(FEATURES, f["outputs"]))
    else:
        lengths = rng.integers(1, TIME + 1, n)
        valid = np.arange(TIME)[None, :] < lengths[:, None]
        if f["input"] == "masking":
            x = rng.normal(size=(n, TIME, FEATURES)) * valid[..., None]
            signal = x @ rng.normal(size=(FEATURES, f["outputs"]))
        else:
            x = (rng.integers(1, VOCABULARY, (n, TIME)) * valid).astype(
                "int32"
            )
            table = rng.normal(size=(VOCABULARY, f["outputs"]))
            signal = table[x]
    noisy = signal + 0.1 * rng.normal(size=signal.shape)
    y = (noisy > 0).astype("float64") if f["task"] == "binary" else noisy
    if f["outputs"] == 2:
        y = {"a": y[..., :1], "b": y[..., 1:]}
    sample_weight = None
    if f["sample_weight"]:
        # Per time step for sequences: Keras' masked losses take
        # `(batch, time)` weights, not `(batch,)`.
        shape = (n,) if f["input"] == "dense" else (n, TIME)
        sample_weight = rng.uniform(0.0, 3.0, shape) * (
            rng.random(shape) > 0.2
        )
        if f["outputs"] == 2 and f["input"] != "dense":
            # Keras takes non-scalar weights as one array per output.
            sample_weight = {"a": sample_weight, "b": sample_weight}
    class_weight = {0: 0.4, 1: 2.5} if f["class_weight"] else None
    return x, y, sample_weight, class_weight


# Layers and models ------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_accum_tests")
class DataDependentLoss(keras.layers.Layer):
    """Identity that adds `0.01 * mean(x**2)` with `add_loss`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        self.add_loss(0.01 * ops.mean(ops.square(inputs)))
        return inputs


def _layers(f):
    """The trunk's layers, in order, and the heads (name -> layer)."""
    layers = []
    if f["input"] == "masking":
        layers.append(keras.layers.Masking(0.0, name="masking"))
    elif f["input"] == "embedding":
        layers.append(keras.layers.Embedding(
            VOCABULARY, FEATURES, mask_zero=True, name="embedding",
            embeddings_initializer=keras.initializers.RandomNormal(seed=4),
        ))
    layers.append(dense(
        4, 1, None if f["activation"] == "linear" else f["activation"],
        name="hidden",
        kernel_regularizer=(
            keras.regularizers.L2(1e-3) if f["kernel_regularizer"] else None
        ),
        activity_regularizer=(
            keras.regularizers.L2(1e-2) if f["activity_regularizer"] else None
        ),
    ))
    if f["add_loss"]:
        layers.append(DataDependentLoss(name="data_loss"))
    activation = "sigmoid" if f["task"] == "binary" else None
    names = ["head"] if f["outputs"] == 1 else ["a", "b"]
    heads = {
        name: dense(1, 2 + i, activation, name=name)
        for i, name in enumerate(names)
    }
    return layers, heads


def _input(f):
    if f["input"] == "dense":
        return keras.Input((FEATURES,))
    if f["input"] == "masking":
        return keras.Input((TIME, FEATURES))
    return keras.Input((TIME,), dtype="int32")


def _graph(f):
    inputs = _input(f)
    layers, heads = _layers(f)
    hidden = inputs
    for layer in layers:
        hidden = layer(hidden)
    if len(heads) == 1:
        return inputs, heads["head"](hidden)
    return inputs, {name: head(hidden) for name, head in heads.items()}


def _custom_loss_class(base, f):
    """`base` with a `compute_loss` that calls several Keras losses."""
    first, second = f["custom_reductions"]
    plus_super = f["loss"] == "custom_plus_super"
    combination = f["custom_combination"]
    binary = f["task"] == "binary"

    class CustomLoss(base):
        def compute_loss(self, x=None, y=None, y_pred=None,
                         sample_weight=None, training=True):
            if binary:
                main = keras.losses.BinaryCrossentropy(reduction=first)
            else:
                main = keras.losses.MeanSquaredError(reduction=first)
            extra = keras.losses.MeanAbsoluteError(reduction=second)
            if plus_super:
                first_loss = super().compute_loss(
                    x, y, y_pred, sample_weight, training=training
                )
            else:
                first_loss = main(y, y_pred, sample_weight)
            if combination == "weighted":
                loss = 0.5 * first_loss + 2.0 * extra(y, y_pred)
            else:
                loss = first_loss + extra(y, y_pred)
            if combination == "hand_written_mean":
                loss = loss + 0.1 * ops.mean(ops.abs(y - y_pred))
            if combination == "sqrt":
                loss = ops.sqrt(loss)
            if not plus_super:
                for penalty in self.losses:  # As Keras' own `compute_loss`.
                    loss = loss + penalty
            return loss

    return CustomLoss


def _calls(base):
    """A subclass of `base` whose `call` runs a functional model."""

    class CallsInner(base):
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, inputs, training=None):
            return self.inner(inputs, training=training)

    return CallsInner


def build(f, side):
    """The model of workflow `f` for `side` (uncompiled)."""
    acc = side.accumulating
    options = {"accumulate": f["accumulate"]} if acc else {}
    if acc and f["micro_batch_size"] is not None:
        options["micro_batch_size"] = f["micro_batch_size"]
    if acc and f["noise_scale"]:
        # Only when on: the workflows of `noise_scale=False` stay those of
        # earlier versions (its default, `None`, is off for these windows).
        options["noise_scale"] = True
    custom = f["loss"] != "compiled"
    form = f["form"]
    if form == "subclass":
        base = AccumulatingModel if acc else keras.Model
        cls = _calls(_custom_loss_class(base, f) if custom else base)
        return cls(keras.Model(*_graph(f)), **options)
    if form == "functional" and custom:
        base = FunctionalAccumulatingModel if acc else keras.Model
        return _custom_loss_class(base, f)(*_graph(f), **options)
    plain = keras.Model if not acc else (
        lambda i, o: AccumulatingModel(i, o, **options)
    )
    if form == "functional":
        return plain(*_graph(f))
    if form == "wrap_functional":
        model = keras.Model(*_graph(f))
        return keras_accum.wrap(model, **options) if acc else model
    if form == "wrap_sequential":
        layers, heads = _layers(f)
        model = keras.Sequential([_input(f), *layers, heads["head"]])
        return keras_accum.wrap(model, **options) if acc else model
    original = plain(*_graph(f))
    if form == "clone":
        clone = keras.models.clone_model(original)
        clone.set_weights(original.get_weights())
        return clone
    assert form == "loaded", form
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        original.save(path)
        return keras.models.load_model(path)


def find_layer(model, name):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.name == name:
            return layer
    raise KeyError(name)


def optimizer(f):
    summed = any(r == "sum" for r in f["reductions"] + (
        f["custom_reductions"] or []))
    rate = 0.01 if f["optimizer"] == "adam" else 0.02
    if summed:
        rate /= 10
    if f["lr_schedule"]:
        rate = keras.optimizers.schedules.ExponentialDecay(rate, 1, 0.8)
    options = {}
    if f["clip"]:
        options[f["clip"]] = {"clipnorm": 0.5, "global_clipnorm": 0.5,
                              "clipvalue": 0.05}[f["clip"]]
    if f["weight_decay"]:
        options["weight_decay"] = 0.05
    if f["ema"]:
        options.update(use_ema=True, ema_momentum=0.9)
    if f["optimizer"] == "adam":
        return keras.optimizers.Adam(rate, **options)
    momentum = 0.9 if f["optimizer"] == "sgd_momentum" else 0.0
    return keras.optimizers.SGD(rate, momentum=momentum, **options)


def _losses(f):
    if f["loss"] == "custom_terms":
        return None
    def one(reduction):
        if f["task"] == "binary":
            return keras.losses.BinaryCrossentropy(reduction=reduction)
        return keras.losses.MeanSquaredError(reduction=reduction)
    if f["outputs"] == 1:
        return one(f["reductions"][0])
    return {name: one(r) for name, r in zip("ab", f["reductions"])}


def compile_model(f, model):
    loss_weights = None
    if f["loss_weights"]:
        loss_weights = dict(zip("ab", f["loss_weights"]))
    model.compile(
        optimizer=optimizer(f), loss=_losses(f), loss_weights=loss_weights,
        steps_per_execution=f["steps_per_execution"],
    )


# Devices ---------------------------------------------------------------------

_MIRRORED = []


class _Devices:
    """Context for the accumulating side's model building and `fit`."""

    def __init__(self, f, side):
        self.active = side.accumulating and f["devices"] == 2
        self.backend = keras.backend.backend()
        self.scope = None

    def __enter__(self):
        if not self.active:
            return self
        if self.backend == "tensorflow":
            import tensorflow as tf

            if not _MIRRORED:
                # ReductionToOneDevice: collective ops' group keys clash
                # between strategies in one process (distribution_test.py).
                _MIRRORED.append(tf.distribute.MirroredStrategy(
                    ["/cpu:0", "/cpu:1"],
                    cross_device_ops=tf.distribute.ReductionToOneDevice(),
                ))
            self.scope = _MIRRORED[0].scope()
            self.scope.__enter__()
        else:
            import jax

            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=jax.devices()[:2])
            )
        return self

    def __exit__(self, *exc):
        if not self.active:
            return False
        if self.scope is not None:
            self.scope.__exit__(*exc)
        else:
            keras.distribution.set_distribution(None)
        return False


# The workflow ----------------------------------------------------------------


def run(f, side):
    """Builds, compiles and trains workflow `f` on `side`; its `Outcome`."""
    x, y, sample_weight, class_weight = data(f, f["examples"], seed=0)
    fit_options = {"sample_weight": sample_weight, "class_weight": class_weight}
    if f["validation"]:
        x_val, y_val, _, _ = data(f, VALIDATION, seed=1)
        fit_options["validation_data"] = (x_val, y_val)
    with _Devices(f, side):
        model = build(f, side)
        compile_model(f, model)
        histories = [side.fit(model, x, y, accumulate=f["accumulate"],
                              epochs=EPOCHS, **fit_options)]
        if f["fits"] == 2:
            if f["freeze"]:
                find_layer(model, "hidden").trainable = False
                compile_model(f, model)
            histories.append(side.fit(
                model, x, y, accumulate=f["accumulate"],
                initial_epoch=EPOCHS, epochs=2 * EPOCHS, **fit_options,
            ))
    outcome = side.outcome(model, *histories)
    if side.accumulating:
        # What the harness checks of the noise scale (not compared with the
        # reference): whether the trained model measures it (through every
        # form: `clone_model` and `.keras` files must keep it), its final
        # estimate, and each `fit`'s logged values.
        outcome.noise_scale = NoiseScale(
            enabled=getattr(model, "noise_scale", False),
            estimate=getattr(model, "noise_scale_estimate", None),
            logged=[history.get("noise_scale") for history in histories],
        )
    return outcome


@dataclasses.dataclass
class NoiseScale:
    """The accumulating side's noise scale after `run`.

    Attributes:
        enabled: `model.noise_scale`.
        estimate: `model.noise_scale_estimate` (a `NoiseScaleEstimate`, or
            `None`).
        logged: Per `fit` call, its `History.history["noise_scale"]`
            (`None` where not logged).
    """

    enabled: bool
    estimate: object
    logged: list
