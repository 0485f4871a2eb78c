"""Exact for every way Keras normalises a loss (float64, relative 1e-9).

Masked variable-length sequences, every Keras reduction, plain callables,
temporal sample weights and multi-output models with their own masks and
weights. Each case also shows that naive per-step averaging misses the same
big-batch reference.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests.helpers import RTOL

pytestmark = pytest.mark.backends

VOCABULARY = 20
LENGTH = 12
CLASSES = 3


def padded_sequences(n=240, seed=0):
    """Token ids padded with 0, sorted by length so batches differ a lot."""
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, LENGTH + 1, size=n))
    tokens = np.zeros((n, LENGTH), "int32")
    labels = np.zeros((n, LENGTH), "int32")
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(1, VOCABULARY, size=length)
        labels[row, :length] = rng.integers(0, CLASSES, size=length)
    return tokens, labels


def sequence_graph():
    return helpers.masked_tagger_graph(
        LENGTH, VOCABULARY, CLASSES, 6,
        (
            keras.initializers.RandomUniform(seed=3),
            keras.initializers.GlorotUniform(seed=4),
            keras.initializers.GlorotUniform(seed=5),
        ),
    )


def _sequence_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(model_class, graph, data, accumulate, batch, compile_kwargs,
           epochs=2, learning_rate=0.5, **model_kwargs):
    x, y, sample_weight = data
    model = model_class(*graph(), accumulate=accumulate, **model_kwargs)
    # SGD: an Embedding's sparse gradient makes Keras' Adam decay its
    # moments once per token occurrence, which no dense update reproduces.
    model.compile(optimizer=keras.optimizers.SGD(learning_rate),
                  **compile_kwargs)
    model.fit(x, y, sample_weight=sample_weight, batch_size=batch,
              epochs=epochs, shuffle=False, verbose=0)
    return model.get_weights()


def _reference(graph, data, accumulate, batch, compile_kwargs, epochs=2,
               learning_rate=0.5):
    x, y, sample_weight = data
    reference = keras.Model(*graph())
    reference.compile(optimizer=keras.optimizers.SGD(learning_rate),
                      **compile_kwargs)
    n = len(x) if not isinstance(x, dict) else len(next(iter(x.values())))
    for _ in range(epochs):
        for start, stop in helpers.windows(n, batch, accumulate):
            part = slice(start, stop)
            reference.train_on_batch(
                _slice(x, part), _slice(y, part),
                sample_weight=_slice(sample_weight, part),
            )
    return reference.get_weights()


def _slice(value, part):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v[part] for k, v in value.items()}
    return value[part]


def _exact_and_naive_fails(graph, data, accumulate, batch, compile_kwargs,
                           learning_rate=0.5, **model_kwargs):
    expected = _reference(graph, data, accumulate, batch, compile_kwargs,
                          learning_rate=learning_rate)
    weights = _train(FunctionalAccumulatingModel, graph, data, accumulate,
                     batch, compile_kwargs, learning_rate=learning_rate,
                     **model_kwargs)
    error = helpers.relative_error(weights, expected)
    assert error <= RTOL, f"relative error {error:.3g}"
    # The naive model splits batches as the exact one does, so that it
    # averages the same micro-batches' means.
    naive = _train(helpers.NaiveAveragingModel, graph, data, accumulate,
                   batch, compile_kwargs, learning_rate=learning_rate,
                   micro_batch_size=model_kwargs.get("micro_batch_size"))
    naive_error = helpers.relative_error(naive, expected)
    assert naive_error > 1e3 * RTOL, f"naive error {naive_error:.3g}"
    return error, naive_error


@pytest.mark.slice
@pytest.mark.usefixtures("float64")
class TestMaskedSequences:
    @pytest.mark.parametrize("accumulate", ["epoch", 3])
    def test_valid_tokens_normalise_the_window(self, accumulate):
        tokens, labels = padded_sequences()
        _exact_and_naive_fails(
            sequence_graph, (tokens, labels, None), accumulate, 32,
            {"loss": _sequence_loss()},
        )

    @pytest.mark.parametrize("accumulate", ["epoch", 3])
    def test_temporal_sample_weights(self, accumulate):
        tokens, labels = padded_sequences()
        rng = np.random.default_rng(1)
        weights = rng.uniform(0.0, 2.0, size=labels.shape)
        _exact_and_naive_fails(
            sequence_graph, (tokens, labels, weights), accumulate, 32,
            {"loss": _sequence_loss()},
        )

    def test_mean_with_sample_weight_over_masked_tokens(self):
        # Per-token weights: Keras itself cannot combine a mask with
        # per-sequence weights of shape (batch,) for this reduction.
        tokens, labels = padded_sequences()
        weights = np.random.default_rng(2).uniform(0.5, 2.0, size=labels.shape)
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        )
        _exact_and_naive_fails(
            sequence_graph, (tokens, labels, weights), "epoch", 32,
            {"loss": loss},
        )


def _mean_squared_error(y_true, y_pred):
    return ops.mean(ops.square(y_true - y_pred), axis=-1)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: keras.losses.MeanSquaredError(),
        lambda: keras.losses.MeanSquaredError(
            reduction="mean_with_sample_weight"
        ),
        lambda: keras.losses.MeanSquaredError(reduction="sum"),
        lambda: _mean_squared_error,
    ],
    ids=["sum_over_batch_size", "mean_with_sample_weight", "sum", "callable"],
)
@pytest.mark.parametrize("accumulate", ["epoch", 4])
def test_every_reduction_with_sample_weights(make_loss, accumulate):
    # Losses are made inside the test: a Keras loss takes its dtype from
    # `floatx()` when it is created, and the test runs in float64.
    loss = make_loss()
    x, y = helpers.regression_data(1000)
    weights = np.random.default_rng(5).uniform(0.0, 3.0, size=1000)
    graph = lambda: helpers.dense_graph(  # noqa: E731
        regularizer=keras.regularizers.L2(0.01)
    )
    # A summed loss is ~window-size times a mean one: at the same learning
    # rate SGD diverges (weights ~1e11), where any round-off is amplified.
    summed = getattr(loss, "reduction", None) == "sum"
    learning_rate = 0.5 / 256 if summed else 0.5
    _exact_and_naive_fails(graph, (x, y, weights), accumulate, 64,
                           {"loss": loss}, learning_rate=learning_rate)


def multi_output_graph():
    """A masked per-token output and a per-sequence output."""
    inputs = keras.Input((LENGTH,), dtype="int32")
    embedded = keras.layers.Embedding(
        VOCABULARY, 6, mask_zero=True,
        embeddings_initializer=keras.initializers.RandomUniform(seed=3),
    )(inputs)
    tokens = keras.layers.Dense(
        CLASSES, name="tokens",
        kernel_initializer=keras.initializers.GlorotUniform(seed=5),
    )(embedded)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    score = keras.layers.Dense(
        1, name="score",
        kernel_initializer=keras.initializers.GlorotUniform(seed=6),
    )(pooled)
    return inputs, {"tokens": tokens, "score": score}


def _multi_output_case():
    tokens, labels = padded_sequences()
    rng = np.random.default_rng(9)
    score = rng.normal(size=(len(tokens), 1))
    weights = {
        "tokens": None,
        "score": rng.uniform(0.0, 3.0, size=len(tokens)),
    }
    data = (tokens, {"tokens": labels, "score": score},
            {"score": weights["score"],
             "tokens": np.ones(labels.shape)})
    compile_kwargs = {
        "loss": {
            "tokens": _sequence_loss(),
            "score": keras.losses.MeanSquaredError(
                reduction="mean_with_sample_weight"
            ),
        },
        "loss_weights": {"tokens": 1.0, "score": 0.5},
    }
    return data, compile_kwargs


@pytest.mark.usefixtures("float64")
class TestMultiOutput:
    @pytest.mark.parametrize("accumulate", ["epoch", 3])
    @pytest.mark.parametrize("loss_normalisation", ["auto", "per_loss"])
    def test_several_loss_terms_are_exact(self, accumulate,
                                          loss_normalisation):
        """Catches the default weighting every term by the first term's
        normaliser (issue 13, point 5: 0.18 relative off before)."""
        data, compile_kwargs = _multi_output_case()
        _exact_and_naive_fails(
            multi_output_graph, data, accumulate, 32, compile_kwargs,
            loss_normalisation=loss_normalisation,
        )

    def test_sum_next_to_mean_is_exact_by_default(self):
        """Catches a `reduction="sum"` term divided by the window's example
        count under the default normalisation (was 1.7 relative off)."""
        data, compile_kwargs = _multi_output_case()
        compile_kwargs["loss"]["score"] = keras.losses.MeanSquaredError(
            reduction="sum"
        )
        _exact_and_naive_fails(
            multi_output_graph, data, "epoch", 32, compile_kwargs
        )

    def test_shared_normalisation_is_not_exact_here(self):
        """Documents the limit of the opt-in `"shared"`: both terms get the
        first one's normaliser (valid tokens) while the score term is
        normalised by its weight sum (docs/semantics.md, "Known limits")."""
        data, compile_kwargs = _multi_output_case()
        expected = _reference(multi_output_graph, data, "epoch", 32,
                              compile_kwargs)
        shared = _train(FunctionalAccumulatingModel, multi_output_graph, data,
                        "epoch", 32, compile_kwargs,
                        loss_normalisation="shared")
        error = helpers.relative_error(shared, expected)
        print(f"shared-normaliser relative error: {error:.3g}")
        assert error > 1e3 * RTOL


class _Penalty(keras.regularizers.Regularizer):
    """`factor * sum(|x| ** power)`, in the input's dtype.

    Not `keras.regularizers.L1/L2`: before Keras 3.14 those keep their
    factor as a float32 tensor, and fail on float64 weights and outputs.
    """

    def __init__(self, factor, power):
        self.factor = factor
        self.power = power

    def __call__(self, x):
        return self.factor * ops.sum(ops.power(ops.abs(x), self.power))


def _activity_regularised_graph():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        8, activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        kernel_regularizer=_Penalty(0.05, 2),
        activity_regularizer=_Penalty(0.01, 1),
    )(inputs)
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
    )(hidden)
    return inputs, outputs


@pytest.mark.slice
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("accumulate", ["epoch", 4])
def test_activity_and_weight_regularisers_count_once(accumulate):
    """Issue 15: exact on every Keras in the matrix. Before Keras 3.14 the
    activity penalty is summed over the batch (a term summed over the
    window), from 3.14 averaged (weighted like the loss); the weight
    penalty counts once per update either way. 1000 examples in batches
    of 64: the last window (4 batches) ends with a ragged one."""
    x, y = helpers.regression_data(1000)
    error, naive_error = _exact_and_naive_fails(
        _activity_regularised_graph, (x, y, None), accumulate, 64,
        {"loss": "mse"},
    )
    print(f"Keras {keras.version()}, accumulate={accumulate}: relative "
          f"error {error:.3g}, naive {naive_error:.3g}")


def _activity_regularised_two_outputs():
    inputs, hidden = _activity_regularised_graph()
    score = keras.layers.Dense(
        1, name="score",
        kernel_initializer=keras.initializers.GlorotUniform(seed=3),
    )(inputs)
    return inputs, {"value": hidden, "score": score}


@pytest.mark.slice
@pytest.mark.usefixtures("float64")
def test_activity_regulariser_with_several_loss_terms():
    """The summed activity term (Keras < 3.14) comes after the per-output
    terms, each normalised by its own window total."""
    x, y = helpers.regression_data(1000)
    weights = np.random.default_rng(7).uniform(0.0, 3.0, size=1000)
    data = (x, {"value": y, "score": y},
            {"value": np.ones(1000), "score": weights})
    loss = keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
    _exact_and_naive_fails(
        _activity_regularised_two_outputs, data, 4, 64,
        {"loss": {"value": "mse", "score": loss},
         "loss_weights": {"value": 1.0, "score": 0.5}},
    )


@pytest.mark.slice
@pytest.mark.tensorflow_only
@pytest.mark.usefixtures("float64")
def test_activity_regulariser_under_two_replicas():
    """Each replica's penalty is over its shard, scaled by 1/replicas in
    its loss: the window still equals one big batch on one device."""
    import tensorflow as tf

    x, y = helpers.regression_data(1000)
    expected = _reference(_activity_regularised_graph, (x, y, None), 4, 64,
                          {"loss": "mse"})
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    with strategy.scope():
        model = FunctionalAccumulatingModel(
            *_activity_regularised_graph(), accumulate=4
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    error = helpers.relative_error(model.get_weights(), expected)
    assert error <= RTOL, f"relative error {error:.3g}"
