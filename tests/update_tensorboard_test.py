"""`UpdateTensorBoard`: batch-level scalars once per optimizer update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum import AccumulatingModel
from keras_accum import UpdateTensorBoard
from tests import helpers

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
)

# 10 mini-batches of 6 per epoch, windows of 4: updates after mini-batches
# 4, 8 and (at epoch end) 10 of every epoch.
EXAMPLES, BATCH, WINDOW, EPOCHS = 60, 6, 4, 2


def _points(log_dir, tag="batch_loss"):
    events = event_accumulator.EventAccumulator(
        str(log_dir / "train"), size_guidance={"tensors": 0}
    )
    events.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto)))
            for e in events.Tensors(tag)]


def _fit(strategy, callback):
    x, y = helpers.regression_data(EXAMPLES)
    seen = []  # (updates so far, last mini-batch's logged loss)

    def record(batch, logs):
        seen.append((int(model.optimizer.iterations.numpy()),
                     float(logs["loss"])))

    def record_epoch_end(epoch, logs):
        # The leftover window was applied by now.
        seen.append((int(model.optimizer.iterations.numpy()), seen[-1][1]))

    with strategy.scope():
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=WINDOW)
        model.compile(optimizer="sgd", loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model.fit(dataset, epochs=EPOCHS, verbose=0, callbacks=[
        callback, keras.callbacks.LambdaCallback(
            on_batch_end=record, on_epoch_end=record_epoch_end)])
    # The logs at each update: those current when `iterations` first
    # reached its value.
    logged = {}
    for updates, loss in seen:
        logged.setdefault(updates, loss)
    return model, logged


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_one_point_per_update_at_its_iteration(tmp_path, replicas):
    """Catches batch-level points keyed on mini-batches (Keras'
    `update_freq`), which drift off the updates when an epoch's last window
    is short."""
    strategy = (
        tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
        if replicas > 1 else tf.distribute.get_strategy()
    )
    model, logged = _fit(strategy, UpdateTensorBoard(str(tmp_path)))
    points = _points(tmp_path)
    updates = int(model.optimizer.iterations.numpy())
    assert updates == 3 * EPOCHS
    assert [step for step, _ in points] == list(range(1, updates + 1))
    # Each point holds the logs of the mini-batch that completed the window
    # (the epoch's last one for the window applied at epoch end).
    for step, value in points:
        np.testing.assert_allclose(value, logged[step], rtol=1e-6)
    assert _points(tmp_path, "epoch_loss")


def test_keras_update_freq_misses_the_updates(tmp_path):
    """Documents why the callback exists: Keras' `update_freq=4` writes at
    mini-batches 4, 8, 12, ... while updates follow 4, 8, 10, 14, ..."""
    _fit(tf.distribute.get_strategy(),
         keras.callbacks.TensorBoard(str(tmp_path), update_freq=WINDOW))
    assert [step for step, _ in _points(tmp_path)] == [4, 8, 12, 16, 20]


def test_update_freq_is_rejected():
    """Catches a silently ignored `update_freq`."""
    with pytest.raises(ValueError, match="update_freq=4"):
        UpdateTensorBoard("logs", update_freq=4)
