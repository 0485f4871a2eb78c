"""Accumulation composes with everything a Keras optimizer does, once per
update: mixed precision, clipping, weight decay, schedules, EMA; plus
non-finite gradients, accumulation schedules, stateful layers and custom
losses. References are big-batch runs; float64 unless the feature is about
lower precision.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests.helpers import RTOL

pytestmark = pytest.mark.backends

N, BATCH = 1000, 64


def _compare(make_optimizer, accumulate="epoch", epochs=3, graph=None,
             model_kwargs=None, compile_kwargs=None):
    """Relative error of accumulated training vs the big-batch reference."""
    graph = graph or helpers.dense_graph
    compile_kwargs = {"loss": "mse", **(compile_kwargs or {})}
    x, y = helpers.regression_data(N)
    model = FunctionalAccumulatingModel(*graph(), accumulate=accumulate,
                                        **(model_kwargs or {}))
    model.compile(optimizer=make_optimizer(), **compile_kwargs)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    reference = keras.Model(*graph())
    reference.compile(optimizer=make_optimizer(), **compile_kwargs)
    helpers.big_batch_reference(reference, x, y, BATCH, accumulate, epochs)
    # `fit` ends by finalising the optimizer (EMA weights copied in, if
    # used); `train_on_batch` does not.
    reference.optimizer.finalize_variable_values(reference.trainable_variables)
    expected = reference.get_weights()
    return helpers.relative_error(model.get_weights(), expected), model


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, clipnorm=0.05),
        lambda: keras.optimizers.SGD(0.1, clipvalue=0.01),
        lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.05),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.2, 1, 0.5)
        ),
        lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5),
        lambda: keras.optimizers.SGD(
            0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2
        ),
    ],
    ids=["clipnorm", "clipvalue", "global_clipnorm", "adamw-weight_decay",
         "lr-schedule", "ema", "ema_overwrite_frequency"],
)
@pytest.mark.parametrize("accumulate", ["epoch", 4])
def test_optimizer_features_run_once_per_update(make_optimizer, accumulate):
    error, model = _compare(make_optimizer, accumulate)
    assert error <= RTOL, f"relative error {error:.3g}"
    updates = len(helpers.windows(N, BATCH, accumulate)) * 3
    assert int(model.optimizer.iterations.numpy()) == updates


@pytest.mark.usefixtures("float64")
def test_reduce_lr_on_plateau_reduced_rate_drives_the_next_update():
    """Catches an epoch's update applied after the other callbacks'
    `on_epoch_end` (it would use the rate `ReduceLROnPlateau` just lowered).
    """
    x, y = helpers.regression_data(200)
    model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    # No epoch improves the loss by `min_delta`: after epoch 0 sets the best
    # loss, the rate halves at the end of epochs 1 and 2.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e6
    )
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
              callbacks=[plateau])
    np.testing.assert_allclose(
        float(model.optimizer.learning_rate.numpy()), 0.1 / 4, rtol=1e-12
    )
    assert int(model.optimizer.iterations.numpy()) == 3
    # The updates of epochs 0, 1 and 2 use 0.1, 0.1 and 0.05.
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    for rate in (0.1, 0.1, 0.05):
        reference.optimizer.learning_rate.assign(rate)
        reference.train_on_batch(x, y)
    error = helpers.relative_error(model.get_weights(),
                                   reference.get_weights())
    assert error <= RTOL, f"relative error {error:.3g}"


@pytest.mark.usefixtures("float64")
def test_sgd_learning_rate_schedule_is_keyed_on_updates():
    """Catches `optimizer.iterations` counted per micro-step (the schedule
    would decay once per mini-batch, not once per update)."""
    x, y = helpers.regression_data(N)

    def schedule():
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [1, 3], [0.2, 0.05, 0.01]
        )

    # Windows of 4 mini-batches of 64: 4 updates per epoch, 2 epochs; the
    # rate is 0.2 for update 0, 0.05 for updates 1-2, 0.01 afterwards.
    model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
    model.compile(optimizer=keras.optimizers.SGD(schedule()), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=keras.optimizers.SGD(schedule()), loss="mse")
    expected = helpers.big_batch_reference(reference, x, y, BATCH, 4, 2)
    error = helpers.relative_error(model.get_weights(), expected)
    assert error <= RTOL, f"relative error {error:.3g}"


# Measured relative error of the weights vs float32 big-batch training:
# 8.8e-4 (float16), 3.5e-3 (bfloat16); naive averaging of the micro-batch
# means: 1.16 with this data's one-example last batch.
MIXED_PRECISION_TOLERANCE = {"mixed_float16": 4e-3, "mixed_bfloat16": 1.5e-2}


@pytest.mark.parametrize("policy", sorted(MIXED_PRECISION_TOLERANCE))
def test_mixed_precision_close_to_float32_big_batch(policy):
    """Catches wrong accumulation under half precision (e.g. micro-batches
    weighted equally), which a comparison of two accumulating runs
    would cancel."""
    # 15 mini-batches of 64 and a last one of 1 example: weighting the
    # micro-batches equally is far off.
    x, y = helpers.regression_data(961)
    x, y = x.astype("float32"), y.astype("float32")
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    expected = helpers.big_batch_reference(reference, x, y, BATCH, "epoch", 3)
    keras.config.set_dtype_policy(policy)
    try:
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
        optimizer = keras.optimizers.SGD(0.05)
        if policy == "mixed_float16":
            # A scale that does not overflow: every micro-batch counts (the
            # overflow case is tested below).
            optimizer = keras.optimizers.LossScaleOptimizer(
                optimizer, initial_scale=2.0**8
            )
        model.compile(optimizer=optimizer, loss="mse")
        if keras.backend.backend() == "jax" and policy == "mixed_float16":
            with pytest.raises(ValueError, match="mixed_bfloat16"):
                model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            return
        model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(
        keras.backend.standardize_dtype(a.dtype) == "float32"
        for a in model._accumulator.gradients[0]
    )
    error = helpers.relative_error(model.get_weights(), expected)
    print(f"{policy} vs float32 big batch: relative error {error:.3g}")
    assert error < MIXED_PRECISION_TOLERANCE[policy]


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="JAX refuses dynamic loss scaling (tested above)",
)
def test_loss_scale_overflow_is_skipped_not_accumulated():
    """Catches an overflowing micro-batch that still counts in the window
    (its gradient or its normaliser reaches the update)."""
    x, y = helpers.regression_data(256)
    x, y = x.astype("float32"), y.astype("float32")
    # Mini-batch 1 (examples 16-31): targets so large that its scaled
    # gradient overflows float16 at scale 2**8; the others do not.
    y[16:32] = 1e4
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=2.0**8
        )
        model.compile(optimizer=optimizer, loss="mse")
        start = model.get_weights()
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    # One overflow, one halving; 15 finite micro-batches do not reach
    # `dynamic_growth_steps`.
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**7
    assert model.skipped_micro_batches == 0  # Overflow is not an error.
    assert int(model.optimizer.iterations.numpy()) == 4
    # The reference never sees mini-batch 1: its first window is 48 examples.
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    keep = np.r_[0:16, 32:64]
    reference.train_on_batch(x[keep], y[keep])
    for start_index in range(64, 256, 64):
        batch = slice(start_index, start_index + 64)
        reference.train_on_batch(x[batch], y[batch])
    # Compare the updates, not the weights, which barely move.
    error = helpers.relative_error(
        [w - s for w, s in zip(model.get_weights(), start)],
        [w - s for w, s in zip(reference.get_weights(), start)],
    )
    print(f"relative error of the update: {error:.3g}")
    assert error < 1e-2


def _poisoned_data():
    x, y = helpers.regression_data(256)
    x[100, 0] = np.nan  # in batch 3 at batch size 32
    return x, y


@pytest.mark.usefixtures("float64")
class TestNonFiniteGradients:
    def test_raise_names_epoch_and_window_and_keeps_weights(self):
        x, y = _poisoned_data()
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
        model.compile(optimizer="sgd", loss="mse")
        start = model.get_weights()
        with pytest.raises(FloatingPointError,
                           match="epoch 0, in the window of batches 0-7"):
            model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(model.get_weights(), start):
            np.testing.assert_array_equal(a, b)
        assert model.discarded_windows == 1
        assert int(model.optimizer.iterations.numpy()) == 0
        assert all(np.isfinite(a.numpy()).all()
                   for a in model._accumulator.gradients[0])

    def test_skip_leaves_out_the_micro_batch_exactly(self):
        x, y = _poisoned_data()
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch",
                                  on_nonfinite="skip")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        assert model.skipped_micro_batches == 1
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        keep = np.r_[0:96, 128:256]
        reference.train_on_batch(x[keep], y[keep])
        assert helpers.relative_error(
            model.get_weights(), reference.get_weights()
        ) <= RTOL

    def test_skip_keeps_training_under_terminate_on_nan(self):
        # The skipped micro-batch is left out of the logged loss as well, so
        # `TerminateOnNaN` sees finite losses and training goes on.
        x, y = _poisoned_data()
        model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch",
                                  on_nonfinite="skip")
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False,
                            verbose=0,
                            callbacks=[keras.callbacks.TerminateOnNaN()])
        assert np.isfinite(history.history["loss"]).all()
        assert int(model.optimizer.iterations.numpy()) == 2
        assert model.skipped_micro_batches == 2  # the bad batch, each epoch


    def test_raise_then_clean_fit_counts_no_discarded_window(self):
        """Catches `discarded_windows` not reset when a new `fit` starts (the
        clean `fit` would raise for the previous fit's window)."""
        x, y = _poisoned_data()
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        with pytest.raises(FloatingPointError, match="batches 0-3"):
            model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        assert model.discarded_windows == 1
        clean_x, clean_y = helpers.regression_data(256, seed=1)
        model.fit(clean_x, clean_y, batch_size=32, epochs=1, shuffle=False,
                  verbose=0)
        assert model.discarded_windows == 0
        assert int(model.optimizer.iterations.numpy()) == 2

    def test_skip_counts_restart_at_each_fit(self):
        """Catches `skipped_micro_batches` (or `discarded_windows`) carried
        over from one `fit` to the next under `on_nonfinite="skip"`."""
        x, y = _poisoned_data()
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=4,
                                  on_nonfinite="skip")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        assert model.skipped_micro_batches == 1
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        assert model.skipped_micro_batches == 1
        assert model.discarded_windows == 0
        clean_x, clean_y = helpers.regression_data(256, seed=1)
        model.fit(clean_x, clean_y, batch_size=32, epochs=1, shuffle=False,
                  verbose=0)
        assert model.skipped_micro_batches == 0
        assert int(model.optimizer.iterations.numpy()) == 6

def _schedule_reference(x, y, schedule_of_epoch, epochs, make_optimizer):
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=make_optimizer(), loss="mse")
    for epoch in range(epochs):
        for start, stop in helpers.windows(len(x), BATCH,
                                           schedule_of_epoch(epoch)):
            reference.train_on_batch(x[start:stop], y[start:stop])
    return reference.get_weights()


@pytest.mark.usefixtures("float64")
@pytest.mark.slice
class TestAccumulationSchedules:
    def test_dict_schedule_grows_the_window(self):
        x, y = helpers.regression_data(N)
        schedule = {0: 2, 2: 8, 3: "epoch"}
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=schedule)
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0)
        windows = {0: 2, 1: 2, 2: 8, 3: "epoch"}
        expected = _schedule_reference(x, y, windows.get, 4,
                                       lambda: helpers.make_optimizer("adam"))
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL
        assert int(model.optimizer.iterations.numpy()) == 8 + 8 + 2 + 1

    def test_callable_schedule(self):
        x, y = helpers.regression_data(N)

        def window(epoch):
            return 2 ** (epoch + 1)

        model = AccumulatingModel(*helpers.dense_graph(), accumulate=window)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
        expected = _schedule_reference(x, y, window, 3,
                                       lambda: keras.optimizers.SGD(0.1))
        assert helpers.relative_error(model.get_weights(), expected) <= RTOL

    def test_callable_returning_a_bad_window_fails_at_fit(self):
        model = AccumulatingModel(*helpers.dense_graph(),
                                  accumulate=lambda epoch: 0)
        model.compile(optimizer="sgd", loss="mse")
        x, y = helpers.regression_data(64)
        with pytest.raises(ValueError, match=r"`accumulate\(0\)` must be"):
            model.fit(x, y, epochs=1, verbose=0)

    def test_dict_schedule_round_trips(self, tmp_path):
        model = AccumulatingModel(*helpers.dense_graph(),
                                  accumulate={0: 1, 5: "epoch"})
        model.compile(optimizer="sgd", loss="mse")
        model.save(tmp_path / "model.keras")
        restored = keras.models.load_model(tmp_path / "model.keras")
        assert restored.accumulate == {0: 1, 5: "epoch"}


def test_batch_normalization_updates_per_micro_batch():
    def graph():
        inputs = keras.Input((5,))
        normalised = keras.layers.BatchNormalization(momentum=0.5)(inputs)
        outputs = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
        )(normalised)
        return inputs, outputs

    x, y = helpers.regression_data(256)
    x, y = x.astype("float32"), y.astype("float32")
    model = AccumulatingModel(*graph(), accumulate="epoch")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    # The moving statistics follow the four micro-batches, as forward passes
    # in training mode on those batches give them.
    plain = keras.Model(*graph())
    for start in range(0, 256, 64):
        plain(x[start:start + 64], training=True)
    bn, plain_bn = model.layers[1], plain.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(),
                               plain_bn.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               plain_bn.moving_variance.numpy(), rtol=1e-6)


def _custom_loss_model(loss_function):
    class CustomLoss(FunctionalAccumulatingModel):
        def compute_loss(self, x=None, y=None, y_pred=None,
                         sample_weight=None, training=True):
            return loss_function(y, y_pred) + sum(self.losses)

    return CustomLoss


def _regularised_graph():
    return helpers.dense_graph(regularizer=keras.regularizers.L2(0.01))


@pytest.mark.usefixtures("float64")
def test_compute_loss_override_accumulates_exactly():
    """A custom `compute_loss` made of a Keras loss and `self.losses` is
    normalised like the compiled loss."""
    x, y = helpers.regression_data(N)
    model = _custom_loss_model(keras.losses.MeanAbsoluteError())(
        *_regularised_graph(), accumulate="epoch"
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    reference = keras.Model(*_regularised_graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mae")
    expected = helpers.big_batch_reference(reference, x, y, BATCH, "epoch", 2)
    assert helpers.relative_error(model.get_weights(), expected) <= RTOL


@pytest.mark.usefixtures("float64")
def test_compute_loss_with_a_hand_written_mean_is_refused():
    """Issue 25: a hand-written mean has no normaliser Keras reports; it
    was weighted by examples, a default that is right for this one loss
    and silently wrong for a mean over anything else. Refused now."""
    x, y = helpers.regression_data(N)
    model = _custom_loss_model(lambda y, p: ops.mean(ops.abs(y - p)))(
        *_regularised_graph(), accumulate="epoch"
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = model.get_weights()
    with pytest.raises(ValueError, match="hand-written mean"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for weight, initial in zip(model.get_weights(), before):
        np.testing.assert_array_equal(weight, initial)


@pytest.mark.usefixtures("float64")
def test_raise_checks_the_windows_of_a_later_epoch_from_its_start():
    """Catches the window-check counter of `ApplyAccumulatedGradients` not
    reset in `on_epoch_begin` (issue 25, mutant (a)): with a non-finite
    window only in epoch 1, three later windows were applied before the
    error (`iterations` 7, not 4) and it named batches 6-7, not 0-1."""
    x, y = helpers.regression_data(64)

    def batches():  # Two epochs of 8 batches; NaN in epoch 1, batch 0.
        for epoch in range(2):
            for b in range(8):
                xb = x[8 * b:8 * b + 8].copy()
                if epoch == 1 and b == 0:
                    xb[3, 0] = np.nan
                yield xb, y[8 * b:8 * b + 8]

    model = AccumulatingModel(*helpers.dense_graph(), accumulate=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(FloatingPointError,
                       match="epoch 1, in the window of batches 0-1:"):
        model.fit(batches(), steps_per_epoch=8, epochs=2, shuffle=False,
                  verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    assert model.discarded_windows == 1


def _loss_not_finite_below_zero(y_true, y_pred):
    """Mean squared error, plus `0 * log(y_true)`: a loss whose value is
    NaN where `y_true < 0` while its gradient stays finite."""
    return (ops.mean(ops.square(y_true - y_pred), axis=-1)
            + 0.0 * ops.mean(ops.log(y_true), axis=-1))


@pytest.mark.usefixtures("float64")
def test_skip_leaves_out_a_micro_batch_whose_loss_alone_is_not_finite():
    """Catches `on_nonfinite="skip"` checking only the gradient (issue 25,
    mutant (b): the loss check dropped from the step, `is_finite(loss)`):
    a micro-batch with a NaN loss and a finite gradient was accumulated,
    0 skipped and a NaN logged loss."""
    x, y = helpers.regression_data(256)
    y = np.abs(y) + 1.0
    y[100, 0] = -1.0  # In batch 3 at batch size 32: its loss is NaN.
    model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch",
                              on_nonfinite="skip")
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=_loss_not_finite_below_zero)
    history = model.fit(x, y, batch_size=32, epochs=1, shuffle=False,
                        verbose=0)
    assert model.skipped_micro_batches == 1
    assert np.isfinite(history.history["loss"]).all()
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=_loss_not_finite_below_zero)
    keep = np.r_[0:96, 128:256]
    reference.train_on_batch(x[keep], y[keep])
    assert helpers.relative_error(
        model.get_weights(), reference.get_weights()
    ) <= RTOL
