"""Data shared by the distribution tests and their worker processes."""

import numpy as np

from tests import helpers

# 15 global batches of 64 and a ragged last one of 2: over 4 replicas, two
# of them get no example from it.
N_EXAMPLES = 962
GLOBAL_BATCH = 64
EPOCHS = 2

# The `MultiWorkerMirroredStrategy` cases (`multi_worker_main.py`), run in
# turn by one pair of worker processes: name -> (window, model).
MULTI_WORKER_CASES = {
    "dense-epoch": ("epoch", "dense"),
    "dense-4": (4, "dense"),
    "embedding-2": (2, "embedding"),
}


def training_data():
    x, y = helpers.regression_data(N_EXAMPLES)
    sample_weight = np.random.default_rng(7).uniform(0.0, 3.0, N_EXAMPLES)
    return x, y, sample_weight


# Drop-in cases (text models, masks, several outputs) on 1, 2 and 3
# replicas. A global batch of 6 splits evenly over 2 and 3 replicas (Keras
# needs that for every batch but the last); 19 examples leave a last global
# batch of 1, so every replica but the first gets no example from it.
DROPIN_EXAMPLES = 19
DROPIN_BATCH = 6
VOCABULARY = 12
LENGTH = 5
CLASSES = 3


def token_data(n=DROPIN_EXAMPLES, seed=3):
    """Padded token ids (0 = padding), tags, scores and sample weights."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LENGTH + 1, n)
    tokens = rng.integers(1, VOCABULARY, (n, LENGTH)).astype("int32")
    tokens[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    tags = rng.integers(0, CLASSES, (n, LENGTH)).astype("int32")
    scores = rng.normal(size=(n, 1))
    weights = rng.uniform(0.5, 2.0, n)
    return tokens, tags, scores, weights


def _embedding(mask_zero=False):
    import keras

    return keras.layers.Embedding(
        VOCABULARY,
        4,
        mask_zero=mask_zero,
        embeddings_initializer=keras.initializers.RandomUniform(seed=3),
    )


def _dense(units, seed, activation=None):
    import keras

    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )


def embedding_pool_graph():
    """`Embedding` + average pooling + `Dense`: a sparse gradient."""
    import keras

    inputs = keras.Input((LENGTH,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(_embedding()(inputs))
    return inputs, _dense(1, 4)(_dense(6, 5, "tanh")(pooled))


def tagging_graph():
    """Masked sequence tagging: `Embedding(mask_zero=True)`, per-token logits."""
    import keras

    inputs = keras.Input((LENGTH,), dtype="int32")
    hidden = _dense(6, 5, "tanh")(_embedding(mask_zero=True)(inputs))
    return inputs, _dense(CLASSES, 4)(hidden)


def two_output_graph():
    """Shared `Embedding`, a regression head and a classification head."""
    import keras

    inputs = keras.Input((LENGTH,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(_embedding()(inputs))
    hidden = _dense(6, 5, "tanh")(pooled)
    return inputs, [_dense(1, 4)(hidden), _dense(CLASSES, 6)(hidden)]
