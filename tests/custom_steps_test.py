"""Subclasses with their own `train_step`: accumulate exactly, or refuse.

Issue 13, point 4: a `train_step` override used to bypass accumulation
silently (`accumulate="epoch"`, 2 epochs, 24 optimizer steps).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum import AccumulatingModel
from tests import helpers
from tests.helpers import RTOL

N_EXAMPLES = 100  # Ragged: batches of 16 leave a last one of 4.
BATCH = 16


class _Net(AccumulatingModel):
    """The `helpers.dense_graph` MLP as a subclassed model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(
            8, activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        )
        self.out = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
        )

    def call(self, x):
        return self.out(self.hidden(x))


class AccumulatingStep(_Net):
    """A custom step that hands its gradients to `accumulate_gradients`."""

    def __init__(self, normaliser="examples", **kwargs):
        super().__init__(**kwargs)
        self.normaliser = normaliser

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        normaliser = tf.shape(x)[0] if self.normaliser == "examples" else 1
        self.accumulate_gradients(gradients, normaliser=normaliser)
        return self.compute_metrics(x, y, y_pred)


class OwnUpdateStep(_Net):
    """A custom step that applies its own update, as Keras guides show."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return {"loss": loss}


class SuperStep(_Net):
    """A custom step that adds to `super().train_step`'s logs."""

    def train_step(self, data):
        logs = super().train_step(data)
        logs["extra"] = tf.constant(1.0)
        return logs


class TwoOptimizerStep(_Net):
    """GAN-style: two parts, two optimizers, each applied by the step."""

    def compile(self, **kwargs):
        super().compile(**kwargs)
        self.second_optimizer = keras.optimizers.SGD(0.01)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape(persistent=True) as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        first = self.hidden.trainable_variables
        second = self.out.trainable_variables
        self.optimizer.apply(tape.gradient(loss, first), first)
        self.second_optimizer.apply(tape.gradient(loss, second), second)
        return {"loss": loss}


def _fit(model, x, y, accumulate_epochs=2):
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=accumulate_epochs,
              shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.usefixtures("float64")
# Windows of 4 batches: the last one holds 16, 16 and 4 examples.
@pytest.mark.parametrize("accumulate", ["epoch", 4])
def test_accumulate_gradients_from_a_custom_step_is_exact(accumulate):
    """Catches `accumulate_gradients` weighting mini-batches equally or
    applying at the wrong time: exact vs the big batch, naive fails."""
    x, y = helpers.regression_data(N_EXAMPLES)
    expected = helpers.dense_big_batch_weights(
        "adam", x, y, BATCH, accumulate, epochs=2
    )
    model = AccumulatingStep(accumulate=accumulate)
    error = helpers.relative_error(_fit(model, x, y), expected)
    assert error <= RTOL, f"relative error {error:.3g}"
    updates = 2 * len(helpers.windows(N_EXAMPLES, BATCH, accumulate))
    assert int(model.optimizer.iterations.numpy()) == updates
    naive = AccumulatingStep(accumulate=accumulate, normaliser="one")
    naive_error = helpers.relative_error(_fit(naive, x, y), expected)
    assert naive_error > 1e3 * RTOL, f"naive error {naive_error:.3g}"


@pytest.mark.usefixtures("float64")
def test_super_train_step_accumulates_exactly():
    """Catches the override check refusing a step that calls `super()`."""
    x, y = helpers.regression_data(N_EXAMPLES)
    expected = helpers.dense_big_batch_weights(
        "adam", x, y, BATCH, "epoch", epochs=2
    )
    weights = _fit(SuperStep(accumulate="epoch"), x, y)
    assert helpers.relative_error(weights, expected) <= RTOL


@pytest.mark.parametrize("model_class", [OwnUpdateStep, TwoOptimizerStep])
def test_step_that_applies_its_own_update_is_refused(model_class):
    """Catches a custom `train_step` silently training per mini-batch
    (`accumulate` ignored); the refusal comes at trace time, before any
    update, so the weights are untouched."""
    x, y = helpers.regression_data(N_EXAMPLES)
    model = model_class(accumulate="epoch")
    model(x[:1])
    before = model.get_weights()
    with pytest.raises(TypeError, match=r"accumulate_gradients"):
        _fit(model, x, y)
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_own_update_step_trains_as_keras_with_accumulate_one():
    """Catches the check refusing plain training (`accumulate=1`)."""
    x, y = helpers.regression_data(N_EXAMPLES)
    model = OwnUpdateStep(accumulate=1)
    _fit(model, x, y)
    assert int(model.optimizer.iterations.numpy()) == 2 * 7


def test_accumulate_gradients_checks_the_gradient_count():
    """Catches gradients paired with the wrong variables by position."""
    class Short(_Net):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self(x, training=True))
            variables = self.trainable_variables[:1]
            self.accumulate_gradients(tape.gradient(loss, variables), 1)
            return {"loss": loss}

    x, y = helpers.regression_data(N_EXAMPLES)
    with pytest.raises(ValueError, match="one entry per trainable variable"):
        _fit(Short(accumulate=2), x, y)
