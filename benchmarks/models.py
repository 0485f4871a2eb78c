"""Synthetic data and the three benchmark models.

All data is random (fixed seeds): the benchmark measures speed, memory and
exactness, not accuracy. Every builder takes the model class so the same
graph can be built as a `keras.Model`, a `keras_accum.AccumulatingModel`
or the forward+backward-only reference.
"""

import keras
import numpy as np

NUM_CLASSES = 10

# MLP: 784 -> 1024 -> 512 -> 10, 1,333,770 parameters.
MLP_FEATURES = 784
MLP_UNITS = (1024, 512)

# Convnet: 32x32x3 images, three 3x3 convolutions.
IMAGE_SHAPE = (32, 32, 3)
CONV_FILTERS = (32, 64, 64)

# Transformer encoder: token ids, learned positions, two blocks.
SEQUENCE_LENGTH = 32
VOCABULARY = 1000
EMBED_DIM = 64
HEADS = 4
FEED_FORWARD_DIM = 128
BLOCKS = 1


def _mlp(model_class, **kwargs):
    inputs = keras.Input((MLP_FEATURES,), name="features")
    hidden = inputs
    for units in MLP_UNITS:
        hidden = keras.layers.Dense(units, activation="relu")(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return model_class(inputs, outputs, **kwargs)


def _convnet(model_class, **kwargs):
    inputs = keras.Input(IMAGE_SHAPE, name="images")
    hidden = inputs
    for index, filters in enumerate(CONV_FILTERS):
        hidden = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu"
        )(hidden)
        if index < len(CONV_FILTERS) - 1:
            hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return model_class(inputs, outputs, **kwargs)


@keras.saving.register_keras_serializable(package="keras_accum_benchmarks")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to its token embedding."""

    def __init__(self, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(self.sequence_length, input_shape[-1]),
            initializer="glorot_uniform",
            name="positions",
        )

    def call(self, inputs):
        return inputs + self.positions

    def get_config(self):
        config = super().get_config()
        config.update({"sequence_length": self.sequence_length})
        return config


def _encoder_block(hidden):
    attention = keras.layers.MultiHeadAttention(
        num_heads=HEADS, key_dim=EMBED_DIM // HEADS
    )(hidden, hidden)
    hidden = keras.layers.LayerNormalization()(hidden + attention)
    feed_forward = keras.layers.Dense(FEED_FORWARD_DIM, activation="relu")(
        hidden
    )
    feed_forward = keras.layers.Dense(EMBED_DIM)(feed_forward)
    return keras.layers.LayerNormalization()(hidden + feed_forward)


def _transformer(model_class, **kwargs):
    inputs = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="tokens")
    hidden = keras.layers.Embedding(VOCABULARY, EMBED_DIM)(inputs)
    hidden = PositionEmbedding(SEQUENCE_LENGTH)(hidden)
    for _ in range(BLOCKS):
        hidden = _encoder_block(hidden)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return model_class(inputs, outputs, **kwargs)


def _tiny_mlp(model_class, **kwargs):
    """The float64 exactness model: 6 -> 16 (tanh) -> 3."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3)(hidden)
    return model_class(inputs, outputs, **kwargs)


BUILDERS = {
    "mlp": _mlp,
    "convnet": _convnet,
    "transformer": _transformer,
    "tiny_mlp": _tiny_mlp,
}

DESCRIPTIONS = {
    "mlp": "MLP 784-1024-512-10 (ReLU)",
    "convnet": "Convnet 32x32x3, Conv 32/64/64 + 2 max-pools + GAP",
    "transformer": (
        f"Transformer encoder: {BLOCKS} blocks, d={EMBED_DIM}, {HEADS} heads, "
        f"seq {SEQUENCE_LENGTH}, vocab {VOCABULARY}"
    ),
}


def build_model(name, model_class=keras.Model, seed=0, **kwargs):
    """Builds model `name` with the initial weights that `seed` fixes."""
    keras.utils.set_random_seed(seed)
    return BUILDERS[name](model_class, **kwargs)


def make_data(name, examples, seed=0):
    """Returns `(x, y)` NumPy arrays of random inputs and labels."""
    rng = np.random.default_rng(seed)
    if name == "mlp":
        x = rng.standard_normal((examples, MLP_FEATURES), dtype=np.float32)
    elif name == "convnet":
        x = rng.standard_normal((examples, *IMAGE_SHAPE), dtype=np.float32)
    elif name == "transformer":
        x = rng.integers(1, VOCABULARY, (examples, SEQUENCE_LENGTH))
        x = x.astype(np.int32)
    else:
        raise ValueError(f"Unknown model. Received: name={name!r}")
    y = rng.integers(0, NUM_CLASSES, examples).astype(np.int32)
    return x, y


def make_dataset(x, y, batch_size):
    """A `tf.data` pipeline, built before `fit` so its copy of the data is
    part of the memory baseline, not of the increase during `fit`."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return dataset.prefetch(2)


def fit_inputs(x, y, batch_size):
    """The input arguments of `fit`: a `tf.data` pipeline on TensorFlow
    (`make_dataset`); on JAX the arrays themselves, which Keras batches
    with no TensorFlow involved (a Colab TPU runtime has none)."""
    if keras.backend.backend() == "tensorflow":
        return {"x": make_dataset(x, y, batch_size)}
    return {"x": x, "y": y, "batch_size": batch_size}


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
