"""`micro_batch_size`: each `fit` batch split inside one step.

Exact against plain Keras on the same big batch (float64, relative 1e-9):
ragged batches and micro-batches, masks, sample and class weights, every
reduction, several loss terms, regularisation once per update, replicas.
Naive per-micro-batch averaging misses each reference. Also: the host sees
one step per batch, the logs are the whole batch's, and on JAX the step
holds one micro-batch's activations (XLA's memory accounting).
"""

import keras
import numpy as np
import pytest

from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests import normalisation_test as cases

pytestmark = pytest.mark.backends


@pytest.mark.usefixtures("float64")
class TestExactness:
    @pytest.mark.slice
    @pytest.mark.parametrize("accumulate", [1, "epoch"])
    def test_masked_sequences(self, accumulate):
        """240 sequences in batches of 64 and micro-batches of 20: every
        batch ends with a shorter micro-batch (4, then 8 in the last
        batch of 48), each with its own count of valid tokens."""
        tokens, labels = cases.padded_sequences()
        cases._exact_and_naive_fails(
            cases.sequence_graph, (tokens, labels, None), accumulate, 64,
            {"loss": cases._sequence_loss()}, micro_batch_size=20,
        )

    @pytest.mark.parametrize(
        "reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum"]
    )
    def test_sample_weights_and_weight_regularisation(self, reduction):
        """With a summed loss the weight penalty must count on the window's
        first micro-batch only, not on each of its first batch's."""
        x, y = helpers.regression_data(1000)
        weights = np.random.default_rng(5).uniform(0.0, 3.0, size=1000)
        graph = lambda: helpers.dense_graph(  # noqa: E731
            regularizer=keras.regularizers.L2(0.01)
        )
        # Windows of 4 batches: SGD at 0.5 per batch of 64 is chaotic on
        # this data, where any round-off grows (as in normalisation_test).
        cases._exact_and_naive_fails(
            graph, (x, y, weights), 4, 64,
            {"loss": keras.losses.MeanSquaredError(reduction=reduction)},
            # A summed loss is ~window-size times a mean one.
            learning_rate=0.5 / 256 if reduction == "sum" else 0.5,
            micro_batch_size=24,
        )

    def test_several_loss_terms(self):
        data, compile_kwargs = cases._multi_output_case()
        cases._exact_and_naive_fails(
            cases.multi_output_graph, data, 3, 32, compile_kwargs,
            micro_batch_size=12,
        )

    def test_activity_and_weight_regularisers(self):
        x, y = helpers.regression_data(1000)
        cases._exact_and_naive_fails(
            cases._activity_regularised_graph, (x, y, None), 1, 64,
            {"loss": "mse"}, micro_batch_size=24,
        )

    def test_class_weights(self):
        x, _ = helpers.regression_data(600, outputs=1)
        labels = (x[:, 0] > 0.3).astype("int64")
        class_weight = {0: 1.0, 1: 4.0}
        model = FunctionalAccumulatingModel(
            *helpers.dense_graph(outputs=2), accumulate=2,
            micro_batch_size=16,
        )
        model.compile(
            optimizer=helpers.make_optimizer("sgd"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, labels, batch_size=50, epochs=2, shuffle=False,
                  verbose=0, class_weight=class_weight)
        reference = keras.Model(*helpers.dense_graph(outputs=2))
        reference.compile(
            optimizer=helpers.make_optimizer("sgd"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        expected = helpers.big_batch_reference(
            reference, x, labels, 50, 2, 2, class_weight=class_weight
        )
        helpers.assert_exact(model.get_weights(), expected)


def _fit(accumulate, batch_size, micro_batch_size, epochs=2, graph=None,
         metrics=("mae",), n=200):
    x, y = helpers.regression_data(n)
    model = FunctionalAccumulatingModel(
        *(graph or helpers.dense_graph)(), accumulate=accumulate,
        micro_batch_size=micro_batch_size,
    )
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse",
                  metrics=list(metrics))
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        shuffle=False, verbose=0)
    return model, history.history


@pytest.mark.usefixtures("float64")
class TestOneStepPerBatch:
    def test_one_update_and_one_host_step_per_batch(self):
        steps = []

        class CountSteps(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                steps.append(batch)

        x, y = helpers.regression_data(256)
        model = FunctionalAccumulatingModel(
            *helpers.dense_graph(), accumulate=1, micro_batch_size=16
        )
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=64, epochs=1, verbose=0,
                  callbacks=[CountSteps()])
        assert steps == [0, 1, 2, 3]
        assert int(model.optimizer.iterations.numpy()) == 4

    def test_accumulate_counts_fit_batches(self):
        model, _ = _fit(accumulate=2, batch_size=40, micro_batch_size=8,
                        epochs=1)
        # 200 examples: 5 batches of 40, windows of 2, 2 and 1 batches.
        assert int(model.optimizer.iterations.numpy()) == 3

    def test_logs_are_the_whole_batch_s(self):
        """Loss and metrics as plain Keras logs them at that batch size."""
        model, history = _fit(accumulate=1, batch_size=48,
                              micro_batch_size=10)
        x, y = helpers.regression_data(200)
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=helpers.make_optimizer("adam"),
                          loss="mse", metrics=["mae"])
        expected = reference.fit(x, y, batch_size=48, epochs=2,
                                 shuffle=False, verbose=0).history
        helpers.assert_exact(model.get_weights(), reference.get_weights())
        for name in ("loss", "mae"):
            np.testing.assert_allclose(history[name], expected[name],
                                       rtol=helpers.RTOL)


def _regularised_graph(layer):
    """A dense model with `layer` (BatchNormalization, Dropout) inside."""

    def graph():
        inputs, outputs = helpers.dense_graph()
        return inputs, layer()(outputs)

    return graph


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.BatchNormalization(momentum=0.5),
        lambda: keras.layers.Dropout(0.5, seed=3),
    ],
    ids=["batch_normalization", "dropout"],
)
def test_micro_batches_behave_as_accumulated_mini_batches(layer):
    """Batch statistics are per micro-batch and each micro-batch draws its
    own dropout mask: a batch of 4 micro-batches trains exactly as
    `accumulate=4` over those 4 mini-batches (moving statistics and seed
    included). A step reusing one seed, or normalising over the whole
    batch, differs."""
    graph = _regularised_graph(layer)
    helpers.fresh_keras_state()
    micro, _ = _fit(accumulate=1, batch_size=40, micro_batch_size=10,
                    graph=graph, metrics=())
    helpers.fresh_keras_state()
    accumulated, _ = _fit(accumulate=4, batch_size=10, micro_batch_size=None,
                          graph=graph, metrics=())
    helpers.assert_exact(micro.get_weights(), accumulated.get_weights())
    helpers.fresh_keras_state()
    whole, _ = _fit(accumulate=1, batch_size=40, micro_batch_size=None,
                    graph=graph, metrics=())
    assert helpers.relative_error(whole.get_weights(),
                                  micro.get_weights()) > 1e-6


@pytest.mark.tensorflow_only
@pytest.mark.usefixtures("float64")
def test_mirrored_strategy_splits_each_replica_s_shard():
    """2 replicas, global batches of 32 (16 each: micro-batches 5, 5, 5,
    1) and a ragged last batch of 8 (4 each): one device's big batch."""
    import tensorflow as tf

    x, y = helpers.regression_data(1000)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = FunctionalAccumulatingModel(
            *helpers.dense_graph(), accumulate=2, micro_batch_size=5
        )
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    expected = helpers.dense_big_batch_weights("adam", x, y, 32, 2, 2)
    helpers.assert_exact(model.get_weights(), expected)


@pytest.mark.tensorflow_only
def test_skipping_per_micro_batch_under_replicas_is_refused():
    """Skipping a micro-batch on every replica takes an all-reduce inside
    the loop, which TensorFlow cannot run: refused before any update."""
    import tensorflow as tf

    x, y = helpers.regression_data(64)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = FunctionalAccumulatingModel(
            *helpers.dense_graph(), accumulate=2, micro_batch_size=4,
            on_nonfinite="skip",
        )
        model.compile(optimizer="sgd", loss="mse")
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"on_nonfinite=\"raise\".*"
                       r"Received: micro_batch_size=4, on_nonfinite='skip' "
                       r"on 2 replicas"):
        model.fit(x, y, batch_size=16, verbose=0)
    helpers.assert_exact(model.get_weights(), before)


@pytest.mark.tensorflow_only
@pytest.mark.usefixtures("float64")
def test_xla_on_tensorflow():
    """Under `jit_compile=True` the split's sizes are compile-time
    constants, the ragged last batch included."""
    x, y = helpers.regression_data(1000)
    model = FunctionalAccumulatingModel(
        *helpers.dense_graph(), accumulate=3, micro_batch_size=7
    )
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse",
                  jit_compile=True)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert model._functions.xla_batch_step is not None
    expected = helpers.dense_big_batch_weights("adam", x, y, 32, 3, 2)
    helpers.assert_exact(model.get_weights(), expected)


def _jax_only():
    if keras.backend.backend() != "jax":
        pytest.skip("XLA's memory accounting of the JAX step")


@pytest.mark.usefixtures("float64")
def test_data_parallel_splits_each_device_s_shard():
    _jax_only()
    import jax

    x, y = helpers.regression_data(1000)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices("cpu"))
    )
    try:
        model = FunctionalAccumulatingModel(
            *helpers.dense_graph(), accumulate=2, micro_batch_size=3
        )
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        # Batches of 16 (8 per device: 3, 3, 2), the last of 8 (4: 3, 1).
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    expected = helpers.dense_big_batch_weights("adam", x, y, 16, 2, 2)
    helpers.assert_exact(model.get_weights(), expected)


def _convnet():
    inputs = keras.Input((32, 32, 3))
    hidden = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(
        inputs
    )
    hidden = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(
        hidden
    )
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    return inputs, keras.layers.Dense(10)(hidden)


def _transformer():
    inputs = keras.Input((64,), dtype="int32")
    hidden = keras.layers.Embedding(100, 64)(inputs)
    attended = keras.layers.MultiHeadAttention(4, 16)(hidden, hidden)
    hidden = keras.layers.LayerNormalization()(attended + hidden)
    hidden = keras.layers.Dense(128, activation="relu")(hidden)
    hidden = keras.layers.Dense(64)(hidden)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)
    return inputs, keras.layers.Dense(10)(hidden)


def _batch(graph, n):
    rng = np.random.default_rng(0)
    spec = graph()[0]
    shape = (n,) + tuple(spec.shape[1:])
    if spec.dtype == "int32":
        x = rng.integers(0, 100, shape).astype("int32")
    else:
        x = rng.random(shape).astype("float32")
    return x, rng.integers(0, 10, n)


def _step_memory(model, x, y):
    """XLA's peak memory of `model`'s compiled step on `(x, y)`, bytes."""
    from keras_accum.backend.jax import micro_batches

    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    return micro_batches.step_memory(model, state, (x, y))


@pytest.mark.parametrize("graph", [_convnet, _transformer],
                         ids=["convnet", "transformer"])
def test_step_holds_one_micro_batch(graph):
    """k = 32, b = 8, float32. The micro-batched step at 256 holds plain
    `fit` at 8, plus the accumulators and the rest of its (bigger) input
    batch, within 10%; and under a third of plain `fit` at 256."""
    _jax_only()
    micro, k = 8, 32
    x, y = _batch(graph, micro * k)
    plain_small = _step_memory(keras.Model(*graph()), x[:micro], y[:micro])
    plain_big = _step_memory(keras.Model(*graph()), x, y)
    model = AccumulatingModel(*graph(), accumulate=1, micro_batch_size=micro)
    accumulated = _step_memory(model, x, y)
    accumulators = sum(
        np.prod(v.shape) * 4 for v in model.trainable_variables
    )
    extra_input = x[micro:].nbytes + y[micro:].nbytes
    assert accumulated <= 1.1 * (plain_small + accumulators + extra_input)
    assert accumulated <= plain_big / 3


def _mlp():
    inputs = keras.Input((32,))
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    hidden = keras.layers.Dense(512, activation="relu")(hidden)
    return inputs, keras.layers.Dense(10)(hidden)


def test_auto_picks_the_largest_size_that_fits(capsys):
    """The choice's step fits `memory_limit`, twice the choice's does not,
    and the model says which it picked."""
    _jax_only()
    x, y = _batch(_mlp, 256)
    limit = 7 * 2**20
    model = AccumulatingModel(*_mlp(), accumulate=1,
                              micro_batch_size="auto", memory_limit=limit)
    _step_memory(model, x, y)
    chosen = model.chosen_micro_batch_size
    assert chosen is not None and chosen < 256
    assert f'micro_batch_size="auto" chose {chosen}' in capsys.readouterr().out

    def memory_at(size):
        fixed = AccumulatingModel(*_mlp(), accumulate=1,
                                  micro_batch_size=size)
        return _step_memory(fixed, x, y)

    assert memory_at(chosen) <= limit
    assert memory_at(2 * chosen) > limit
