"""Exactness and behaviour of `AccumulatingModel` on one device.

Every exactness test trains in float64 and compares with a plain
`keras.Model` trained on one big batch per window (relative error <= 1e-9);
the `naive` variants check that averaging per-step mean gradients misses the
same reference by far more, so each check can fail.
"""

import threading

import keras
import numpy as np
import pytest

import keras_accum
from keras_accum import AccumulatingModel
from tests import helpers
from tests.helpers import RTOL


def _tensorflow():
    """TensorFlow, for the tests that use it (on JAX it may be absent)."""
    return pytest.importorskip("tensorflow")


pytestmark = pytest.mark.backends

N_EXAMPLES = 1000
BATCH = 64  # 15 full batches and a ragged one of 40.
EPOCHS = 3


def _train_pair(
    optimizer,
    accumulate,
    model_class=AccumulatingModel,
    sample_weight=None,
    class_weight=None,
    regularizer=None,
    data=None,
    loss="mse",
    **fit_kwargs,
):
    """Returns (accumulated weights, big-batch reference weights, model)."""
    x, y = data if data is not None else helpers.regression_data(N_EXAMPLES)
    model = model_class(
        *helpers.dense_graph(regularizer=regularizer), accumulate=accumulate
    )
    model.compile(optimizer=helpers.make_optimizer(optimizer), loss=loss)
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        sample_weight=sample_weight,
        class_weight=class_weight,
        **fit_kwargs,
    )
    reference = keras.Model(*helpers.dense_graph(regularizer=regularizer))
    reference.compile(optimizer=helpers.make_optimizer(optimizer), loss=loss)
    expected = helpers.big_batch_reference(
        reference,
        x,
        y,
        BATCH,
        accumulate,
        EPOCHS,
        sample_weight=sample_weight,
        class_weight=class_weight,
    )
    return [w.numpy() for w in model.weights], expected, model


def _assert_exact_and_naive_is_not(optimizer, accumulate, **kwargs):
    weights, expected, model = _train_pair(optimizer, accumulate, **kwargs)
    error = helpers.relative_error(weights, expected)
    assert error <= RTOL, f"relative error {error:.3g}"
    naive, expected, _ = _train_pair(
        optimizer,
        accumulate,
        model_class=helpers.NaiveAveragingModel,
        **kwargs,
    )
    naive_error = helpers.relative_error(naive, expected)
    assert naive_error > 1e3 * RTOL, f"naive error {naive_error:.3g}"
    return model


@pytest.mark.usefixtures("float64")
class TestExactness:
    @pytest.mark.slice
    @pytest.mark.parametrize("optimizer", ["sgd", "adam"])
    def test_epoch_mode_with_ragged_last_batch(self, optimizer):
        model = _assert_exact_and_naive_is_not(optimizer, "epoch")
        assert int(model.optimizer.iterations.numpy()) == EPOCHS

    @pytest.mark.parametrize("optimizer", ["sgd", "adam"])
    @pytest.mark.parametrize("accumulate", [4, 6])
    def test_every_n_with_leftover_flush(self, optimizer, accumulate):
        # 16 batches, the last one ragged: windows of 4 divide them evenly;
        # windows of 6 leave 4 batches that are flushed at epoch end. Both
        # put the ragged batch in a window with full ones.
        model = _assert_exact_and_naive_is_not(optimizer, accumulate)
        windows = len(helpers.windows(N_EXAMPLES, BATCH, accumulate))
        assert int(model.optimizer.iterations.numpy()) == EPOCHS * windows

    @pytest.mark.parametrize("accumulate", ["epoch", 4])
    def test_sample_weights(self, accumulate):
        rng = np.random.default_rng(7)
        weights = rng.uniform(0.0, 3.0, size=N_EXAMPLES)
        _assert_exact_and_naive_is_not(
            "adam", accumulate, sample_weight=weights
        )

    def test_class_weights(self):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(N_EXAMPLES, 5))
        y = (x[:, :1] + 0.3 * rng.normal(size=(N_EXAMPLES, 1)) > 0.5)
        y = y.astype("float64")
        _assert_exact_and_naive_is_not(
            "sgd",
            "epoch",
            data=(x, y),
            class_weight={0: 0.3, 1: 2.5},
            loss="binary_crossentropy",
        )

    @pytest.mark.parametrize("accumulate", ["epoch", 4])
    def test_kernel_regularizer_counts_once_per_update(self, accumulate):
        _assert_exact_and_naive_is_not(
            "sgd", accumulate, regularizer=keras.regularizers.L2(0.05)
        )

    @pytest.mark.slice
    def test_subclassed_model(self):
        class Net(AccumulatingModel):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.hidden = keras.layers.Dense(
                    8,
                    activation="tanh",
                    kernel_initializer=keras.initializers.GlorotUniform(1),
                )
                self.out = keras.layers.Dense(
                    1, kernel_initializer=keras.initializers.GlorotUniform(2)
                )

            def call(self, inputs):
                return self.out(self.hidden(inputs))

        x, y = helpers.regression_data(N_EXAMPLES)
        model = Net(accumulate=4)
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                  verbose=0)
        expected = helpers.dense_big_batch_weights(
            "adam", x, y, BATCH, 4, EPOCHS
        )
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL

    @pytest.mark.slice
    def test_wrap_shares_weights_and_is_exact(self):
        x, y = helpers.regression_data(N_EXAMPLES)
        base = keras.Model(*helpers.dense_graph())
        model = keras_accum.wrap(base, accumulate="epoch")
        assert all(a is b for a, b in zip(model.weights, base.weights))
        model.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                  verbose=0)
        expected = helpers.dense_big_batch_weights(
            "sgd", x, y, BATCH, "epoch", EPOCHS
        )
        assert helpers.relative_error(base.get_weights(), expected) <= RTOL

    @pytest.mark.tensorflow_only
    def test_reduction_sum_applies_running_total(self):
        x, y = helpers.regression_data(N_EXAMPLES)
        model = AccumulatingModel(
            *helpers.dense_graph(), accumulate="epoch", reduction="sum"
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        start = [w.numpy() for w in model.weights]
        total = [np.zeros_like(w) for w in start]
        tf = _tensorflow()
        for begin in range(0, N_EXAMPLES, BATCH):
            with tf.GradientTape() as tape:
                prediction = model(x[begin : begin + BATCH])
                loss = keras.losses.MeanSquaredError()(
                    y[begin : begin + BATCH], prediction
                )
            for t, g in zip(total, tape.gradient(loss, model.weights)):
                t += g.numpy()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        expected = [w - 0.01 * t for w, t in zip(start, total)]
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL

    def test_accumulate_one_is_plain_keras(self):
        x, y = helpers.regression_data(N_EXAMPLES)
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=1)
        plain = keras.Model(*helpers.dense_graph())
        for m in (model, plain):
            m.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
            m.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(model.get_weights(), plain.get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("float64")
class TestFitIntegration:
    def _model(self, accumulate="epoch", **compile_kwargs):
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate)
        compile_kwargs.setdefault("loss", "mse")
        model.compile(optimizer=helpers.make_optimizer("sgd"), **compile_kwargs)
        return model

    def test_iterations_count_updates(self):
        x, y = helpers.regression_data(200)
        model = self._model()
        model.fit(x, y, batch_size=32, epochs=4, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 4
        assert model.mini_step == 0

    def test_accumulators_are_not_model_weights(self):
        model = self._model()
        plain = keras.Model(*helpers.dense_graph())
        x, y = helpers.regression_data(100)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        assert len(model.weights) == len(plain.weights)
        assert len(model.get_weights()) == len(plain.get_weights())
        assert model.non_trainable_weights == []

    def test_batch_end_callbacks_stay_asynchronous(self):
        """Catches a batch-end hook in the library's own callback: Keras
        would then run every callback's `on_train_batch_end` synchronously,
        converting each batch's logs to NumPy (a device wait per batch)."""
        if keras.backend.backend() == "tensorflow":
            pytest.skip("Keras on TensorFlow dispatches batch-end callbacks "
                        "synchronously in any case")
        main_thread = []

        class Record(keras.callbacks.Callback):
            async_safe = True  # Keras may run it in a worker thread.

            def on_train_batch_end(self, batch, logs=None):
                main_thread.append(
                    threading.current_thread() is threading.main_thread()
                )

        model = AccumulatingModel(*helpers.dense_graph(), accumulate=2)
        model.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        x, y = helpers.regression_data(64)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[Record()])
        assert main_thread == [False] * 4

    def test_validation_and_callbacks_see_updated_weights(self):
        x, y = helpers.regression_data(300)
        x_val, y_val = helpers.regression_data(100, seed=1)
        seen = []

        class RecordWeights(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                seen.append(self.model.get_weights())

        model = self._model()
        history = model.fit(
            x,
            y,
            batch_size=32,
            epochs=3,
            shuffle=False,
            verbose=0,
            validation_data=(x_val, y_val),
            callbacks=[RecordWeights()],
        )
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        for epoch in range(3):
            reference.train_on_batch(x, y)
            expected = reference.get_weights()
            assert helpers.relative_error(seen[epoch], expected) <= RTOL
            val_loss = reference.evaluate(x_val, y_val, verbose=0)
            np.testing.assert_allclose(
                history.history["val_loss"][epoch], val_loss, rtol=RTOL
            )

    def test_logged_loss_is_full_data_loss_at_epoch_start(self):
        x, y = helpers.regression_data(300)
        starts = []

        class LossAtEpochStart(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                starts.append(self.model.evaluate(x, y, batch_size=300,
                                                  verbose=0))

        model = self._model()
        history = model.fit(x, y, batch_size=64, epochs=2, verbose=0,
                            callbacks=[LossAtEpochStart()])
        np.testing.assert_allclose(history.history["loss"], starts, rtol=RTOL)

    def test_multi_output_with_loss_weights_and_metrics(self):
        x, y = helpers.regression_data(500)
        targets = {"a": y, "b": 2 * y}
        compile_kwargs = dict(
            loss={"a": "mse", "b": "mae"},
            loss_weights={"a": 1.0, "b": 0.5},
            metrics={"a": ["mae"]},
        )
        model = AccumulatingModel(*_multi_output_graph(), accumulate=3)
        model.compile(optimizer=helpers.make_optimizer("adam"), **compile_kwargs)
        history = model.fit(x, targets, batch_size=50, epochs=2,
                            shuffle=False, verbose=0)
        assert "a_mae" in history.history
        reference = keras.Model(*_multi_output_graph())
        reference.compile(
            optimizer=helpers.make_optimizer("adam"), **compile_kwargs
        )
        for _ in range(2):
            for start, stop in helpers.windows(500, 50, 3):
                reference.train_on_batch(
                    x[start:stop],
                    {"a": y[start:stop], "b": 2 * y[start:stop]},
                )
        error = helpers.relative_error(model.get_weights(),
                                       reference.get_weights())
        assert error <= RTOL

    @pytest.mark.parametrize(
        "fit_kwargs",
        [
            {"jit_compile": True},
            {"jit_compile": False},
            pytest.param({"steps_per_execution": 3},
                         marks=helpers.SEVERAL_STEPS_PER_EXECUTION),
            pytest.param({"steps_per_execution": 3, "jit_compile": True},
                         marks=helpers.SEVERAL_STEPS_PER_EXECUTION),
        ],
        ids=["jit", "no-jit", "steps_per_execution", "jit-steps_per_execution"],
    )
    @pytest.mark.parametrize("accumulate", ["epoch", 4])
    def test_compile_options(self, fit_kwargs, accumulate):
        x, y = helpers.regression_data(N_EXAMPLES)
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate)
        model.compile(
            optimizer=helpers.make_optimizer("adam"), loss="mse", **fit_kwargs
        )
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        expected = helpers.dense_big_batch_weights(
            "adam", x, y, BATCH, accumulate, 2
        )
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL

    @pytest.mark.tensorflow_only
    @pytest.mark.parametrize("jit_compile", [True, False])
    def test_jit_compiles_micro_step_and_update_apart(self, jit_compile):
        # One XLA cluster would also hold the window's `tf.cond`, and carry
        # the weights, optimizer slots and accumulators through every
        # micro-step; `jit_compile=True` compiles the two parts separately.
        x, y = helpers.regression_data(N_EXAMPLES)
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse",
                      jit_compile=jit_compile)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        functions = model._functions
        assert model.jit_compile is jit_compile  # evaluate/predict as asked
        if not jit_compile:
            assert functions.xla_batch_step is None
            assert functions.xla_window_update is None
            return
        assert functions.xla_batch_step.experimental_get_tracing_count() > 0
        assert functions.xla_window_update.experimental_get_tracing_count() > 0
        assert int(model.optimizer.iterations.numpy()) == 4  # 16 batches

    @pytest.mark.tensorflow_only
    def test_epoch_end_apply_is_traced_once_per_model(self, caplog, capfd):
        """Catches the epoch-end apply traced per call, and TensorFlow's
        retracing warning naming it when several models each trace theirs
        once (it keys its statistics by the function's code)."""
        x, y = helpers.regression_data(64)
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
        model.compile(optimizer="sgd", loss="mse")
        for _ in range(2):
            model.fit(x, y, batch_size=16, epochs=3, verbose=0)
        assert model._functions.apply.experimental_get_tracing_count() == 1
        for _ in range(6):
            model = AccumulatingModel(*helpers.dense_graph(),
                                      accumulate="epoch")
            model.compile(optimizer="sgd", loss="mse")
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert "retracing" not in caplog.text + capfd.readouterr().err

    @pytest.mark.tensorflow_only
    def test_reset_builds_no_weight_sized_constant(self):
        # Grappler folds `tf.zeros(weight.shape)` into a graph constant as
        # large as the weight, held for the graph's lifetime at every place
        # that resets (it cost 3x the accumulators' memory on the benchmark
        # MLP); resetting must not build such a tensor.
        x, y = helpers.regression_data(N_EXAMPLES)
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        graph = model._functions.apply.get_concrete_function(
            model._window_plan
        ).graph.as_graph_def()
        nodes = list(graph.node) + [
            node for function in graph.library.function
            for node in function.node_def
        ]
        # (Size-1 shapes would match the small constants of any graph.)
        weight_shapes = {tuple(w.shape) for w in model.trainable_weights
                         if np.prod(w.shape) > 1}
        constant_shapes = {
            tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim)
            for node in nodes
            if node.op == "Const"
        }
        assert constant_shapes.isdisjoint(weight_shapes), (
            constant_shapes & weight_shapes
        )

    @pytest.mark.parametrize("source", ["tf.data", "unknown-cardinality",
                                        "PyDataset"])
    def test_data_sources(self, source):
        x, y = helpers.regression_data(N_EXAMPLES)
        if source == "PyDataset":

            class Batches(keras.utils.PyDataset):
                def __len__(self):
                    return -(-N_EXAMPLES // BATCH)

                def __getitem__(self, index):
                    part = slice(index * BATCH, (index + 1) * BATCH)
                    return x[part], y[part]

            data = Batches()
        else:
            data = _tensorflow().data.Dataset.from_tensor_slices((x, y))
            data = data.batch(BATCH)
            if source == "unknown-cardinality":
                data = data.filter(lambda *_: True)
        model = self._model(accumulate="epoch")
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        model.fit(data, epochs=2, verbose=0)
        expected = helpers.dense_big_batch_weights(
            "adam", x, y, BATCH, "epoch", 2
        )
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL
        assert int(model.optimizer.iterations.numpy()) == 2

    def test_steps_per_epoch_and_initial_epoch(self):
        x, y = helpers.regression_data(640)
        data = _tensorflow().data.Dataset.from_tensor_slices((x, y))
        data = data.batch(64).repeat()
        model = self._model(accumulate="epoch")
        history = model.fit(
            data, steps_per_epoch=5, epochs=4, initial_epoch=1, verbose=0
        )
        assert len(history.history["loss"]) == 3
        assert int(model.optimizer.iterations.numpy()) == 3
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        for epoch in range(3):
            part = slice(epoch * 320 % 640, epoch * 320 % 640 + 320)
            reference.train_on_batch(x[part], y[part])
        assert helpers.relative_error(
            model.get_weights(), reference.get_weights()
        ) <= RTOL

    def test_evaluate_and_predict_unchanged(self):
        x, y = helpers.regression_data(200)
        model = self._model()
        plain = keras.Model(*helpers.dense_graph())
        plain.compile(loss="mse")
        np.testing.assert_allclose(
            model.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0)
        )
        np.testing.assert_allclose(
            model.predict(x, verbose=0), plain.predict(x, verbose=0)
        )

    def test_train_on_batch_accumulates_until_applied(self):
        x, y = helpers.regression_data(128)
        model = self._model(accumulate="epoch")
        start = model.get_weights()
        model.train_on_batch(x[:64], y[:64])
        model.train_on_batch(x[64:], y[64:])
        assert model.mini_step == 2
        for a, b in zip(model.get_weights(), start):
            np.testing.assert_array_equal(a, b)
        model.apply_accumulated_gradients()
        assert model.mini_step == 0
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        reference.train_on_batch(x, y)
        assert helpers.relative_error(
            model.get_weights(), reference.get_weights()
        ) <= RTOL

    def test_reset_discards_window(self):
        x, y = helpers.regression_data(64)
        model = self._model(accumulate="epoch")
        start = model.get_weights()
        model.train_on_batch(x, y)
        model.reset_accumulated_gradients()
        model.apply_accumulated_gradients()
        assert int(model.optimizer.iterations.numpy()) == 0
        for a, b in zip(model.get_weights(), start):
            np.testing.assert_array_equal(a, b)


def _multi_output_graph():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        8, kernel_initializer=keras.initializers.GlorotUniform(1)
    )(inputs)
    out_a = keras.layers.Dense(
        1, name="a", kernel_initializer=keras.initializers.GlorotUniform(2)
    )(hidden)
    out_b = keras.layers.Dense(
        1, name="b", kernel_initializer=keras.initializers.GlorotUniform(3)
    )(hidden)
    return inputs, {"a": out_a, "b": out_b}


class TestTrainableSetChanges:
    """Accumulators follow the trainable weights (issue 13, point 1)."""

    def _frozen_base_model(self):
        inputs = keras.Input((5,))
        base = keras.Sequential([keras.layers.Dense(4)], name="base")
        outputs = keras.layers.Dense(1)(base(inputs))
        return AccumulatingModel(inputs, outputs, accumulate=2), base

    def test_accumulators_pair_with_the_current_trainable_weights(self):
        """Catches accumulators kept from the first `fit` (stale pairing by
        position after unfreezing and recompiling)."""
        x, y = helpers.regression_data(32)
        model, base = self._frozen_base_model()
        base.trainable = False
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert len(model._accumulator.variables) == 2
        base.trainable = True
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        accumulator = model._accumulator
        assert len(accumulator.variables) == len(model.trainable_variables)
        for variable, weight, sums in zip(
            accumulator.variables, model.trainable_variables,
            accumulator.gradients[0],
        ):
            assert variable is weight
            assert tuple(sums.shape) == tuple(weight.shape)

    def test_pending_window_dropped_on_rebuild_warns(self):
        """Catches a silent loss of accumulated mini-batches when the
        trainable set changes between `train_on_batch` calls."""
        x, y = helpers.regression_data(16)
        model, base = self._frozen_base_model()
        model = AccumulatingModel(model.inputs, model.outputs, accumulate=4)
        model.compile(optimizer="sgd", loss="mse")
        model.train_on_batch(x[:8], y[:8])
        base.trainable = False
        model.compile(optimizer="sgd", loss="mse")
        with pytest.warns(UserWarning, match="discarded"):
            model.train_on_batch(x[8:], y[8:])
        assert model.mini_step == 1
