"""Keras workflows written once and run two ways, for the differential harness.

Each workflow is a function `run(side)` that builds, compiles and trains a
model through `side`, and returns an `Outcome`. `tests/workflows_test.py`
runs it on a `Side(accumulating=True)`, where models are `AccumulatingModel`s
(functional, subclassed or `wrap`ped) fed micro-batches by `model.fit`, and
on a `Side(accumulating=False)`, where models are plain `keras.Model`s fed
one big batch per window, and compares the outcomes.

The reference is plain `fit` with `batch_size` equal to the window's
examples and `shuffle=False`: Keras then forms exactly the windows of the
accumulating run (the leftover mini-batches of an epoch make its last,
smaller batch), and its callbacks (`ReduceLROnPlateau`, `EarlyStopping`,
`LearningRateScheduler`) act per epoch on the same logs. A schedule
(`accumulate={0: 2, 1: 4}`) is followed by one reference `fit` per epoch.
"""

import dataclasses
from typing import Callable
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

import keras_accum
from keras_accum import AccumulatingModel

MICRO = 8  # Micro-batch size of the accumulating runs.
EXAMPLES = 44  # 5 full micro-batches and a ragged one of 4.
FEATURES = 3
EPOCHS = 2


@dataclasses.dataclass
class Outcome:
    """What a run ends with: weights, updates, logs, and row-specific values.

    Attributes:
        weights: `model.weights` as NumPy arrays, in order.
        iterations: `optimizer.iterations` (updates applied).
        history: every `fit` call's `History.history`, concatenated per key.
        extra: other values both runs must agree on (evaluate results,
            the final learning rate, ...), as name -> number or array.
    """

    weights: list
    iterations: Optional[int]
    history: dict
    extra: dict


@dataclasses.dataclass(frozen=True)
class Expectation:
    """A documented refusal: `fit` raises or warns instead of training.

    Attributes:
        kind: `"raises"` (`pytest.raises`) or `"warns"` (`pytest.warns`).
        category: the exception or warning class.
        match: regular expression the message must match.
    """

    kind: str
    category: type
    match: str


@dataclasses.dataclass(frozen=True)
class Workflow:
    """One row of the harness.

    Attributes:
        name: the pytest id.
        run: `run(side) -> Outcome`.
        mode: `"differential"` (accumulating vs plain big batch, relative
            error <= `RTOL`), `"rerun"` (two accumulating runs, bit-identical)
            or `"refusal"` (the accumulating run meets `expectation`).
        expectation: for `"refusal"` rows.
        bug: the bug the row would catch (shown in failure messages).
        form: the accumulating model's form for `Side.model`:
            `"functional"`, `"wrap"` or `"subclass"`.
        eager_reference: as for `Side`.
    """

    name: str
    run: Callable[["Side"], Outcome]
    bug: str
    mode: str = "differential"
    expectation: Optional[Expectation] = None
    form: str = "functional"
    eager_reference: bool = True


def _eager_keras_is_reproducible():
    """Whether plain Keras run eagerly gives the same weights every time.

    Not on JAX under a `keras.distribution` (two host devices): a generated
    workflow (seed 5: masked inputs, an activity regulariser and `add_loss`,
    one window a batch) ended 0.3-0.7% away from its own other runs in 4 of
    56 eager runs after `saving_test.py` in the same process, while the
    traced plain model agreed with keras_accum to 8e-17 in all 56. The
    reference is traced there.
    """
    return not (
        keras.backend.backend() == "jax"
        and keras.distribution.distribution() is not None
    )


class Side:
    """Builds and trains the models of one side of a comparison.

    Args:
        accumulating: `True` for keras_accum with micro-batches, `False` for
            plain `keras.Model` with one big batch per window.
        form: `"functional"`, `"wrap"` (a plain functional model passed to
            `keras_accum.wrap`) or `"subclass"`: how `model()` builds an
            accumulating model. The plain side always builds `keras.Model`.
        eager_reference: whether the plain side trains eagerly
            (`run_eagerly=True`): the same arithmetic without tracing, which
            halves the harness's time. `False` where traced Keras behaves
            differently (a step traced before a layer was frozen). Traced
            anyway where eager Keras is not reproducible
            (`_eager_keras_is_reproducible`).
    """

    def __init__(self, accumulating, form="functional", eager_reference=True):
        self.accumulating = accumulating
        self.form = form
        self.eager_reference = eager_reference

    # Models ---------------------------------------------------------------

    def model(self, inputs, outputs, accumulate, **options):
        """A model from a functional graph.

        Args:
            inputs, outputs: as for `keras.Model`.
            accumulate: the accumulating model's window (ignored by the
                plain side, whose `fit` forms the windows instead).
            **options: other `AccumulatingModel` arguments
                (`loss_normalisation`, ...), for the accumulating side only.
        """
        if not self.accumulating:
            return keras.Model(inputs, outputs)
        if self.form == "wrap":
            return keras_accum.wrap(
                keras.Model(inputs, outputs), accumulate=accumulate, **options
            )
        if self.form == "subclass":
            return CallsFunctional(
                keras.Model(inputs, outputs), accumulate=accumulate, **options
            )
        return AccumulatingModel(
            inputs, outputs, accumulate=accumulate, **options
        )

    def subclass(self, make_class, accumulate, *args, **options):
        """An instance of `make_class(base)(*args, ...)`.

        `make_class` returns a subclass of `base` (`AccumulatingModel` or
        `keras.Model`), so both sides run the same subclass code.
        """
        if not self.accumulating:
            return make_class(keras.Model)(*args)
        return make_class(AccumulatingModel)(
            *args, accumulate=accumulate, **options
        )

    # Data and training ----------------------------------------------------

    def window_examples(self, accumulate, epoch=0, batch_size=MICRO):
        """The plain side's batch size: the examples of one window."""
        if callable(accumulate):
            accumulate = accumulate(epoch)
        if isinstance(accumulate, dict):
            accumulate = accumulate[max(k for k in accumulate if k <= epoch)]
        if accumulate == "epoch":
            return 10**6  # Larger than any data set: one batch per epoch.
        return accumulate * batch_size

    def batch_size(self, accumulate, epoch=0, batch_size=MICRO):
        """`batch_size` for this side: a micro-batch or a window."""
        if self.accumulating:
            return batch_size
        return self.window_examples(accumulate, epoch, batch_size=batch_size)

    def dataset(self, arrays, accumulate, batch_size=MICRO, repeat=False):
        """A `tf.data.Dataset` of `arrays` batched for this side."""
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        if repeat:
            dataset = dataset.repeat()
        return dataset.batch(self.batch_size(accumulate, batch_size=batch_size))

    def fit(self, model, x, y=None, *, accumulate, epochs=EPOCHS,
            initial_epoch=0, batch_size=MICRO, **kwargs):
        """`model.fit` with this side's batches; returns `History.history`.

        The plain side follows a dict or callable schedule with one `fit`
        per epoch. `x` may be a dataset made by `dataset()` (then no
        `batch_size` is passed).
        """
        kwargs.setdefault("verbose", 0)
        if (
            not self.accumulating
            and self.eager_reference
            and _eager_keras_is_reproducible()
        ):
            model.run_eagerly = True
        is_dataset = isinstance(x, tf.data.Dataset)
        if not is_dataset:
            kwargs.setdefault("shuffle", False)
        schedule = isinstance(accumulate, dict) or callable(accumulate)
        if self.accumulating or not schedule:
            if not is_dataset:
                kwargs["batch_size"] = self.batch_size(
                    accumulate, batch_size=batch_size
                )
            return model.fit(
                x, y, epochs=epochs, initial_epoch=initial_epoch, **kwargs
            ).history
        history = {}
        for epoch in range(initial_epoch, epochs):
            size = self.window_examples(
                accumulate, epoch, batch_size=batch_size
            )
            logs = model.fit(
                x, y, batch_size=size, initial_epoch=epoch, epochs=epoch + 1,
                **kwargs,
            ).history
            for key, values in logs.items():
                history.setdefault(key, []).extend(values)
        return history

    def outcome(self, model, *histories, **extra):
        """The `Outcome` of `model` after training."""
        merged = {}
        for history in histories:
            for key, values in history.items():
                merged.setdefault(key, []).extend(values)
        optimizer = getattr(model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        return Outcome(
            weights=[np.array(w.numpy()) for w in model.weights],
            iterations=None if iterations is None else int(iterations.numpy()),
            history=merged,
            extra={k: np.asarray(v, np.float64) for k, v in extra.items()},
        )

    def require(self, condition, message):
        """Checks that the workflow does what the row says (plain side).

        The plain side is the oracle: a row whose reference never triggers
        the feature it is about (a callback that never fires, a head that
        moves) would compare nothing. The accumulating side is judged by the
        comparison, not here.
        """
        if not self.accumulating:
            assert condition, f"reference workflow: {message}"


class CallsFunctional(AccumulatingModel):
    """Subclassed `AccumulatingModel` whose `call` runs a functional model.

    Gives the `"subclass"` form of any functional row; its weights are the
    inner model's, in the same order.
    """

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)


# Data and layers ------------------------------------------------------------


def regression(n=EXAMPLES, outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES))
    y = x @ rng.normal(size=(FEATURES, outputs)) + 0.1 * rng.normal(
        size=(n, outputs)
    )
    return x, y


def dense(units, seed, activation=None, **kwargs):
    """`keras.layers.Dense`, seeded: the same initial weights on both sides."""
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(
            stddev=0.1, seed=seed + 100
        ),
        **kwargs,
    )


def mlp_graph(hidden=4, outputs=1):
    inputs = keras.Input((FEATURES,))
    hidden_output = dense(hidden, 1, "tanh")(inputs)
    return inputs, dense(outputs, 2)(hidden_output)


def two_head_graph():
    """A shared trunk and two heads, outputs `{"a": ..., "b": ...}`."""
    inputs = keras.Input((FEATURES,))
    trunk = dense(4, 1, "tanh")(inputs)
    return inputs, {
        "a": dense(1, 2, name="a")(trunk),
        "b": dense(1, 3, name="b")(trunk),
    }


def mlp_class(base):
    """A subclassed MLP deriving from `base`."""

    class MLP(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = dense(4, 1, "tanh")
            self.out = dense(1, 2)

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    return MLP
