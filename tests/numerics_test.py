"""Accumulation composes with everything a Keras optimizer does, once per
update: mixed precision, clipping, weight decay, schedules, EMA; plus
non-finite gradients, accumulation schedules, stateful layers and custom
losses. References are big-batch runs; float64 unless the feature is about
lower precision.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests.helpers import RTOL

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
def test_reduce_lr_on_plateau_steps_per_epoch():
    x, y = helpers.regression_data(200)
    model = AccumulatingModel(*helpers.dense_graph(), accumulate="epoch")
    model.compile(optimizer=keras.optimizers.SGD(1e-9), loss="mse")
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1.0
    )
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[plateau])
    # Epoch 0 sets the best loss; epochs 1 and 2 do not improve it by
    # min_delta, so the learning rate is halved twice.
    np.testing.assert_allclose(
        float(model.optimizer.learning_rate.numpy()), 1e-9 / 4, rtol=1e-6
    )
    assert int(model.optimizer.iterations.numpy()) == 3


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_close_to_float32(policy):
    def train(dtype_policy):
        keras.config.set_dtype_policy(dtype_policy)
        try:
            error, model = _compare(lambda: keras.optimizers.SGD(0.05),
                                    "epoch", epochs=3)
        finally:
            keras.config.set_dtype_policy("float32")
        return model

    mixed = train(policy)
    assert all(
        a.dtype == tf.float32
        for a in mixed._accumulator.gradients[0]
    )
    full = train("float32")
    flat = lambda model: np.concatenate(  # noqa: E731
        [w.ravel() for w in model.get_weights()]
    )
    difference = helpers.relative_error([flat(mixed)], [flat(full)])
    print(f"{policy} vs float32 relative difference: {difference:.3g}")
    # Half-precision forward/backward, and under mixed_float16 the default
    # initial loss scale (2**15) overflows the first micro-batch, which is
    # skipped. Measured: 2.0e-3 (float16), 1.1e-3 (bfloat16).
    assert difference < 5e-2


def test_loss_scale_overflow_is_skipped_not_accumulated():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x, y = helpers.regression_data(256)
        x, y = x.astype("float32"), y.astype("float32")
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
        # A scale so large that the first micro-batches overflow in float16.
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01), initial_scale=2.0**40
        )
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        scale = float(model.optimizer.dynamic_scale.numpy())
        assert scale < 2.0**40
        assert all(np.isfinite(w).all() for w in model.get_weights())
        assert model.skipped_micro_batches == 0  # overflow is not an error
    finally:
        keras.config.set_dtype_policy("float32")


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


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("use_keras_loss", [True, False])
def test_compute_loss_override_accumulates_exactly(use_keras_loss):
    class CustomLoss(FunctionalAccumulatingModel):
        def compute_loss(self, x=None, y=None, y_pred=None,
                         sample_weight=None, training=True):
            if use_keras_loss:
                loss = keras.losses.MeanAbsoluteError()(y, y_pred)
            else:
                loss = ops.mean(ops.abs(y - y_pred))
            return loss + ops.sum(self.losses)

    x, y = helpers.regression_data(N)
    graph = lambda: helpers.dense_graph(  # noqa: E731
        regularizer=keras.regularizers.L2(0.01)
    )
    model = CustomLoss(*graph(), accumulate="epoch")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    reference = keras.Model(*graph())
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mae")
    expected = helpers.big_batch_reference(reference, x, y, BATCH, "epoch", 2)
    assert helpers.relative_error(model.get_weights(), expected) <= RTOL
