"""`Embedding` + Adam: keras_accum applies the dense big-batch gradient.

On TensorFlow an `Embedding`'s gradient is a `tf.IndexedSlices` with one row
per token occurrence, and Keras' Adam adds the *square of each occurrence*
into its second moment, where the Adam update of the batch's gradient adds
the square of the rows' sums. An accumulated gradient is a dense sum, so
keras_accum applies Adam to the big batch's (dense) gradient: equal to
plain Keras with densified gradients, different from TensorFlow's sparse
path (issue 13, point 6). With SGD both are the same.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests.helpers import RTOL

VOCABULARY, LENGTH, N_EXAMPLES, BATCH = 12, 6, 90, 16


class DenseGradientModel(keras.Model):
    """Plain Keras training with the embedding's gradient made dense."""

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        gradients = [
            tf.convert_to_tensor(g)
            for g in tape.gradient(loss, self.trainable_variables)
        ]
        self.optimizer.apply(gradients, self.trainable_variables)
        return {"loss": loss}


def _graph():
    inputs = keras.Input((LENGTH,), dtype="int32")
    embedded = keras.layers.Embedding(
        VOCABULARY, 4,
        embeddings_initializer=keras.initializers.RandomNormal(seed=3),
    )(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=4)
    )(pooled)
    return inputs, outputs


def _data():
    rng = np.random.default_rng(5)
    # Few distinct tokens: every batch repeats rows of the embedding.
    x = rng.integers(0, VOCABULARY, size=(N_EXAMPLES, LENGTH)).astype("int32")
    y = rng.normal(size=(N_EXAMPLES, 1))
    return x, y


def _reference(model_class, x, y, optimizer):
    model = model_class(*_graph())
    model.compile(optimizer=optimizer, loss="mse")
    return helpers.big_batch_reference(model, x, y, BATCH, "epoch", epochs=3)


@pytest.mark.usefixtures("float64")
def test_adam_on_embeddings_applies_the_dense_big_batch_gradient():
    """Catches an accumulated embedding gradient that is not the big
    batch's dense gradient; states how far TF's sparse Adam path is."""
    x, y = _data()
    model = FunctionalAccumulatingModel(*_graph(), accumulate="epoch")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    dense = _reference(DenseGradientModel, x, y, keras.optimizers.Adam(0.05))
    error = helpers.relative_error(model.get_weights(), dense)
    assert error <= RTOL, f"relative error {error:.3g}"
    sparse = _reference(keras.Model, x, y, keras.optimizers.Adam(0.05))
    sparse_error = helpers.relative_error(model.get_weights(), sparse)
    print(f"vs TensorFlow's sparse Adam path: {sparse_error:.3g}")
    assert sparse_error > 1e-3
