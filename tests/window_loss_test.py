"""Tests for `keras_accum.core.window_loss`: the logged loss of several
terms."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum import AccumulatingModel
from keras_accum.core.window_loss import WindowLoss
from tests.helpers import RTOL

EXAMPLES = 44  # 5 micro-batches of 8 and a ragged one of 4.
MICRO = 8


class TestWindowLoss:
    def test_is_a_mean_without_window_terms(self):
        loss = WindowLoss()
        loss.update_state(2.0, sample_weight=1.0)
        loss.update_state(5.0, sample_weight=3.0)
        assert isinstance(loss, keras.metrics.Mean)
        assert float(loss.result()) == pytest.approx(17.0 / 4.0)

    def test_window_divides_each_term_by_its_own_normaliser(self):
        loss = WindowLoss()
        loss.build_window(3)
        # Term 0 averaged, term 1 summed (normaliser 0), term 2 averaged
        # over a normaliser that is 0 in the first micro-batch.
        loss.update_window([2.0, 5.0, 0.0], [1.0, 0.0, 0.0], 4, True)
        loss.update_window([4.0, 1.0, 3.0], [3.0, 0.0, 2.0], 4, False)
        expected = (2 * 1 + 4 * 3) / 4 + (5 + 1) + (3 * 2) / 2
        assert float(loss.result()) == pytest.approx(expected)

    def test_finished_windows_are_weighted_by_examples(self):
        loss = WindowLoss()
        loss.build_window(2)
        loss.update_window([1.0, 10.0], [2.0, 0.0], 2, True)
        loss.update_window([3.0, 20.0], [2.0, 0.0], 2, False)  # 2 + 30
        loss.update_window([5.0, 1.0], [1.0, 0.0], 1, True)  # 5 + 1
        expected = (32.0 * 4 + 6.0 * 1) / 5
        assert float(loss.result()) == pytest.approx(expected)

    def test_a_term_with_no_normaliser_in_the_window_counts_zero(self):
        # Keras' `divide_no_nan`: all sample weights 0 gives a loss of 0.
        loss = WindowLoss()
        loss.build_window(2)
        loss.update_window([0.0, 1.0], [0.0, 1.0], 1, True)
        assert float(loss.result()) == pytest.approx(1.0)

    def test_reset_state_clears_the_window(self):
        loss = WindowLoss()
        loss.build_window(1)
        loss.update_window([3.0], [1.0], 1, True)
        loss.update_state(7.0, sample_weight=1.0)
        loss.reset_state()
        assert float(loss.result()) == 0.0
        loss.update_window([2.0], [1.0], 1, False)
        assert float(loss.result()) == pytest.approx(2.0)

    def test_rebuilding_with_other_terms_raises(self):
        loss = WindowLoss()
        loss.build_window(2)
        loss.build_window(2)
        with pytest.raises(ValueError, match="terms=3"):
            loss.build_window(3)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 3))
    y = {
        "a": x @ rng.normal(size=(3, 1)),
        "b": x @ rng.normal(size=(3, 1)) + 1.0,
    }
    sample_weight = {
        "a": np.ones(EXAMPLES),
        "b": rng.uniform(0.0, 3.0, EXAMPLES) * (rng.random(EXAMPLES) > 0.3),
    }
    return x, y, sample_weight


def _graph():
    inputs = keras.Input((3,))
    trunk = keras.layers.Dense(
        4, "tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        kernel_regularizer=keras.regularizers.L2(0.01),
    )(inputs)
    outputs = {
        name: keras.layers.Dense(
            1, name=name,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        )(trunk)
        for name, seed in (("a", 2), ("b", 3))
    }
    return inputs, outputs


def _compile(model, **kwargs):
    # Made here, not at import: a `Loss` takes floatx when constructed.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss={
            "a": keras.losses.MeanSquaredError(reduction="sum"),
            "b": keras.losses.MeanSquaredError(
                reduction="mean_with_sample_weight"
            ),
        },
        loss_weights={"a": 0.5, "b": 2.0},
        **kwargs,
    )


def _big_batch_losses(x, y, sample_weight, keep=slice(None), epochs=2):
    """Plain Keras, one batch per epoch: the losses `fit` logs."""
    reference = keras.Model(*_graph())
    _compile(reference)
    pick = {k: v[keep] for k, v in y.items()}
    weights = {k: v[keep] for k, v in sample_weight.items()}
    history = reference.fit(
        x[keep], pick, sample_weight=weights, batch_size=EXAMPLES,
        epochs=epochs, shuffle=False, verbose=0,
    )
    return history.history["loss"]


@pytest.mark.usefixtures("float64")
class TestLoggedLossOfSeveralTerms:
    """Issue 13: with a sum and a weighted mean (and regularisation), the
    logged loss was the micro-batch losses' mean weighted by the first
    term's normaliser, 0.5 relative away from the big batch's."""

    @pytest.mark.parametrize("jit_compile", [False, True])
    def test_epoch_mode_logs_the_big_batch_loss(self, jit_compile):
        x, y, sample_weight = _data()
        model = AccumulatingModel(*_graph(), accumulate="epoch")
        _compile(model, jit_compile=jit_compile)
        history = model.fit(x, y, sample_weight=sample_weight,
                            batch_size=MICRO, epochs=2, shuffle=False,
                            verbose=0)
        np.testing.assert_allclose(
            history.history["loss"], _big_batch_losses(x, y, sample_weight),
            rtol=RTOL,
        )

    def test_skipped_micro_batch_is_left_out(self):
        x, y, sample_weight = _data()
        x[10, 0] = np.nan  # In the second micro-batch.
        model = AccumulatingModel(*_graph(), accumulate="epoch",
                                  on_nonfinite="skip")
        _compile(model)
        history = model.fit(x, y, sample_weight=sample_weight,
                            batch_size=MICRO, epochs=2, shuffle=False,
                            verbose=0)
        assert model.skipped_micro_batches == 2
        keep = np.r_[0:8, 16:EXAMPLES]
        np.testing.assert_allclose(
            history.history["loss"],
            _big_batch_losses(x, y, sample_weight, keep=keep),
            rtol=RTOL,
        )

    def test_epoch_mode_under_mirrored_strategy(self):
        x, y, sample_weight = _data()
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
        with strategy.scope():
            model = AccumulatingModel(*_graph(), accumulate="epoch")
            _compile(model)
        dataset = tf.data.Dataset.from_tensor_slices(
            (x, y, sample_weight)
        ).batch(MICRO)
        history = model.fit(dataset, epochs=2, verbose=0)
        np.testing.assert_allclose(
            history.history["loss"], _big_batch_losses(x, y, sample_weight),
            rtol=RTOL,
        )


def test_compile_installs_the_tracker_once():
    """Catches the tracker tracked as a user metric too (`loss` listed
    twice in `model.metrics`)."""
    inputs = keras.Input((3,))
    model = AccumulatingModel(inputs, keras.layers.Dense(1)(inputs),
                              accumulate=2)
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    assert isinstance(model._loss_tracker, WindowLoss)
    assert [m.name for m in model.metrics] == ["loss", "compile_metrics"]
