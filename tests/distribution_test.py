"""Exact accumulation under real `tf.distribute` strategies.

`MirroredStrategy` runs over the logical CPU devices that `conftest.py`
configures; `MultiWorkerMirroredStrategy` runs as two worker processes on
127.0.0.1. Every case compares with a plain single-device model trained on
one big batch per window.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_accum import AccumulatingModel
from tests import distribution_cases as cases
from tests import helpers
from tests.helpers import RTOL

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ReductionCounter:
    """Counts the in-graph reductions `ReductionToOneDevice` executes.

    Installed on the class, it also sees the instances `MirroredStrategy`
    creates for itself (it reduces single host values through a fresh
    `ReductionToOneDevice`). The counters are variables incremented by ops
    placed next to each reduction, so they count executions (a reduction in
    an untaken `tf.cond` branch is not counted), not traces. Eager
    reductions are Keras reading metric state for its logs once per epoch,
    as plain `fit` does; they are left out.
    """

    def __init__(self, monkeypatch):
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.tensors = tf.Variable(0, dtype=tf.int64, trainable=False)
        cls = tf.distribute.ReductionToOneDevice
        reduce, batch_reduce = cls.reduce, cls.batch_reduce
        counter = self

        def count(tensors):
            if not tf.executing_eagerly():
                counter.calls.assign_add(1)
                counter.tensors.assign_add(tensors)

        def counting_reduce(self, reduce_op, value, destinations, options=None):
            count(1)
            return reduce(self, reduce_op, value, destinations, options)

        def counting_batch_reduce(self, reduce_op, pairs, options=None):
            count(len(pairs))
            return batch_reduce(self, reduce_op, pairs, options)

        monkeypatch.setattr(cls, "reduce", counting_reduce)
        monkeypatch.setattr(cls, "batch_reduce", counting_batch_reduce)


@pytest.fixture
def reductions(monkeypatch):
    return ReductionCounter(monkeypatch)


def _mirrored(replicas):
    # TensorFlow picks collective ops for CPU devices by default; their group
    # keys clash between strategies of different sizes in one process, so
    # every test reduces through ReductionToOneDevice.
    devices = [f"/cpu:{i}" for i in range(replicas)]
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _dataset(x, y, sample_weight):
    return tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(
        cases.GLOBAL_BATCH
    )


def _reference_weights(accumulate):
    x, y, sample_weight = cases.training_data()
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    return helpers.big_batch_reference(
        reference,
        x,
        y,
        cases.GLOBAL_BATCH,
        accumulate,
        cases.EPOCHS,
        sample_weight=sample_weight,
    )


def _fit_under(strategy, accumulate, model_class=AccumulatingModel, **kwargs):
    x, y, sample_weight = cases.training_data()
    with strategy.scope():
        model = model_class(*helpers.dense_graph(), accumulate=accumulate)
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(_dataset(x, y, sample_weight), epochs=cases.EPOCHS, verbose=0,
              **kwargs)
    return model


@pytest.mark.usefixtures("float64")
class TestMirroredStrategy:
    # Two replicas are the version matrix's distribution check (`slice`).
    @pytest.mark.parametrize(
        "replicas", [pytest.param(2, marks=pytest.mark.slice), 4]
    )
    @pytest.mark.parametrize("accumulate", ["epoch", 4])
    def test_matches_single_device_big_batch(self, replicas, accumulate):
        model = _fit_under(_mirrored(replicas), accumulate)
        error = helpers.relative_error(
            model.get_weights(), _reference_weights(accumulate)
        )
        assert error <= RTOL, f"relative error {error:.3g}"

    @pytest.mark.parametrize("accumulate", ["epoch", 4])
    def test_sgd_update_matches_single_device_big_batch(self, accumulate):
        """Catches a missing per-replica scaling (Keras divides each
        replica's loss by the replica count): SGD's update would be
        1/replicas of the right one, which Adam's normalisation hides."""
        x, y, sample_weight = cases.training_data()
        with _mirrored(2).scope():
            model = AccumulatingModel(*helpers.dense_graph(),
                                      accumulate=accumulate)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(_dataset(x, y, sample_weight), epochs=cases.EPOCHS,
                  verbose=0)
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        expected = helpers.big_batch_reference(
            reference, x, y, cases.GLOBAL_BATCH, accumulate, cases.EPOCHS,
            sample_weight=sample_weight,
        )
        error = helpers.relative_error(model.get_weights(), expected)
        assert error <= RTOL, f"relative error {error:.3g}"

    def test_naive_averaging_fails_the_same_check(self):
        model = _fit_under(_mirrored(4), 4, helpers.NaiveAveragingModel)
        error = helpers.relative_error(model.get_weights(),
                                       _reference_weights(4))
        assert error > 1e3 * RTOL

    @pytest.mark.parametrize("accumulate", ["epoch", 4, 1])
    def test_one_gradient_reduction_per_update(self, accumulate, reductions):
        model = _fit_under(_mirrored(2), accumulate)
        updates = int(model.optimizer.iterations.numpy())
        variables = len(model.trainable_variables)
        # Per update: one batched all-reduce of all the gradients (the
        # optimizer's) and one of the scalar normaliser. None per micro-step
        # (16 per epoch).
        assert int(reductions.calls.numpy()) == 2 * updates
        assert int(reductions.tensors.numpy()) == (variables + 1) * updates

    def test_counter_sees_plain_training_reduce_every_step(self, reductions):
        strategy = _mirrored(2)
        x, y, sample_weight = cases.training_data()
        with strategy.scope():
            model = keras.Model(*helpers.dense_graph())
            model.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
        model.fit(_dataset(x, y, sample_weight), epochs=cases.EPOCHS,
                  verbose=0)
        steps = int(model.optimizer.iterations.numpy())
        assert steps == cases.EPOCHS * 16
        assert int(reductions.calls.numpy()) == steps

    def test_save_and_load_under_strategy_resume_exactly(self, tmp_path):
        x, y, sample_weight = cases.training_data()
        strategy = _mirrored(2)
        with strategy.scope():
            model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
            model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        model.fit(_dataset(x, y, sample_weight), epochs=1, verbose=0)
        model.save(tmp_path / "model.keras")
        with strategy.scope():
            restored = keras.models.load_model(tmp_path / "model.keras")
        restored.fit(_dataset(x, y, sample_weight), epochs=2, initial_epoch=1,
                     verbose=0)
        error = helpers.relative_error(restored.get_weights(),
                                       _reference_weights(4))
        assert error <= RTOL

    def test_backup_and_restore_after_interruption(self, tmp_path):
        x, y, sample_weight = cases.training_data()

        class Interrupt(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if self.model.optimizer.iterations.numpy() == 6:
                    raise RuntimeError("simulated crash mid-window")

        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        strategy = _mirrored(2)
        with strategy.scope():
            model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
            model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        with pytest.raises(RuntimeError, match="simulated crash"):
            model.fit(_dataset(x, y, sample_weight), epochs=cases.EPOCHS,
                      verbose=0, callbacks=[backup, Interrupt()])
        with strategy.scope():
            resumed = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
            resumed.compile(optimizer=helpers.make_optimizer("adam"),
                            loss="mse")
        resumed.fit(_dataset(x, y, sample_weight), epochs=cases.EPOCHS,
                    verbose=0, callbacks=[backup])
        error = helpers.relative_error(resumed.get_weights(),
                                       _reference_weights(4))
        assert error <= RTOL


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes(tmp_path, float64):
    """Catches divergence across workers or from single-device training;
    the `Embedding` case catches `scatter_add` on replica-local variables
    and NaN from the empty shard of the last global batch.

    One pair of worker processes trains every case of
    `distribution_cases.MULTI_WORKER_CASES` in turn (starting TensorFlow and the cluster
    is most of a case's time).
    """
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        (tmp_path / f"worker{index}").mkdir()
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(REPOSITORY, "tests", "multi_worker_main.py"),
                    str(tmp_path / f"worker{index}"),
                ],
                env=env,
                cwd=REPOSITORY,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        outputs = [w.communicate(timeout=480)[0].decode() for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    from tests.distributed_dropin_test import embedding_pool

    for name, (accumulate, model_name) in cases.MULTI_WORKER_CASES.items():
        results = [np.load(tmp_path / f"worker{i}" / f"{name}.npz")
                   for i in range(2)]
        weights = [[r[f"arr_{i}"] for i in range(len(r.files) - 1)]
                   for r in results]
        for a, b in zip(*weights):
            np.testing.assert_array_equal(a, b, err_msg=name)
        if model_name == "embedding":
            reference = embedding_pool().reference(accumulate)
            n, batch = cases.DROPIN_EXAMPLES, cases.DROPIN_BATCH
        else:
            reference = _reference_weights(accumulate)
            n, batch = cases.N_EXAMPLES, cases.GLOBAL_BATCH
        error = helpers.relative_error(weights[0], reference)
        assert error <= RTOL, f"{name}: relative error {error:.3g}"
        windows = len(helpers.windows(n, batch, accumulate))
        assert int(results[0]["iterations"]) == cases.EPOCHS * windows, name


# Issue 25, case 7: gradient clipping under a strategy. A global batch of 60
# splits evenly over 2 and 3 replicas; 482 examples leave a last global
# batch of 2, so on 3 replicas one of them gets no example from it.
CLIPPING_EXAMPLES, CLIPPING_BATCH = 482, 60
CLIPPING_OPTIMIZERS = {
    "clipnorm-sgd": lambda: keras.optimizers.SGD(0.1, clipnorm=0.05),
    "clipvalue-sgd": lambda: keras.optimizers.SGD(0.1, clipvalue=0.01),
    "global_clipnorm-adam": lambda: keras.optimizers.Adam(
        0.01, global_clipnorm=0.05
    ),
    # `apply` divides by `loss_scale_factor` before it clips.
    "clipnorm-adam-loss_scale_factor": lambda: keras.optimizers.Adam(
        0.01, clipnorm=0.05, loss_scale_factor=4.0
    ),
}


def _clipped_under(replicas, accumulate, make_optimizer, wrap=None):
    """An `AccumulatingModel` trained under `replicas` with a clipping
    optimizer (wrapped by `wrap`, if given), and the single-device big batch
    with the same optimizer."""
    x, y, sample_weight = (
        a[:CLIPPING_EXAMPLES] for a in cases.training_data()
    )
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, y, sample_weight)
    ).batch(CLIPPING_BATCH)
    with _mirrored(replicas).scope():
        model = AccumulatingModel(*helpers.dense_graph(),
                                  accumulate=accumulate)
        optimizer = make_optimizer()
        model.compile(optimizer=wrap(optimizer) if wrap else optimizer,
                      loss="mse")
    model.fit(dataset, epochs=cases.EPOCHS, verbose=0)
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=make_optimizer(), loss="mse")
    expected = helpers.big_batch_reference(
        reference, x, y, CLIPPING_BATCH, accumulate, cases.EPOCHS,
        sample_weight=sample_weight,
    )
    return model, expected


def _clipping_arguments(optimizer):
    config = optimizer.get_config()
    return {name: config[name] for name in (
        "clipnorm", "global_clipnorm", "clipvalue", "loss_scale_factor"
    )}


@pytest.mark.usefixtures("float64")
class TestClippingUnderStrategy:
    """Issue 25, case 7: Keras' `apply` clips each replica's share of the
    gradient before its all-reduce, so under a strategy the window's
    gradient was clipped per replica (relative weight error 0.03 to 2
    against the single-device big batch). It must be clipped as a whole,
    as one device clips the big batch's."""

    @pytest.mark.parametrize("replicas", [2, 3])
    @pytest.mark.parametrize("kind", list(CLIPPING_OPTIMIZERS))
    def test_every_n_window_is_clipped_as_one_big_batch(self, kind,
                                                        replicas):
        """Catches clipping of each replica's share (issue 25, case 7)."""
        make_optimizer = CLIPPING_OPTIMIZERS[kind]
        model, expected = _clipped_under(replicas, 3, make_optimizer)
        helpers.assert_exact(model.get_weights(), expected)
        # The optimizer's own arguments are back after the traced update.
        assert _clipping_arguments(model.optimizer) == _clipping_arguments(
            make_optimizer()
        )

    @pytest.mark.parametrize(
        "kind", ["clipnorm-sgd", "clipvalue-sgd", "global_clipnorm-adam"]
    )
    def test_epoch_window_is_clipped_as_one_big_batch(self, kind):
        """Catches per-replica clipping in the epoch-end update (issue 25,
        case 7), which `apply_accumulated_gradients` traces apart from the
        step."""
        model, expected = _clipped_under(3, "epoch", CLIPPING_OPTIMIZERS[kind])
        helpers.assert_exact(model.get_weights(), expected)

    def test_loss_scale_optimizer_clips_the_window_gradient(self):
        """Catches per-replica clipping by the optimizer inside a
        `LossScaleOptimizer` (issue 25, case 7)."""
        model, expected = _clipped_under(
            2, 3, CLIPPING_OPTIMIZERS["clipnorm-sgd"],
            wrap=keras.optimizers.LossScaleOptimizer,
        )
        helpers.assert_exact(model.get_weights(), expected)

    def test_clipping_costs_one_more_reduction_per_update(self, reductions):
        """Issue 25, case 7: the window's gradient is all-reduced before it
        is clipped, then the optimizer all-reduces the clipped gradient (on
        the first replica, zeros on the others): one more batched reduction
        per update than without clipping, none per micro-step."""
        model, _ = _clipped_under(2, 3, CLIPPING_OPTIMIZERS["clipnorm-sgd"])
        updates = int(model.optimizer.iterations.numpy())
        variables = len(model.trainable_variables)
        assert int(reductions.calls.numpy()) == 3 * updates
        assert int(reductions.tensors.numpy()) == (2 * variables + 1) * updates
