"""The TensorFlow train step: accumulation with `tf.GradientTape`, windows
applied inside the step with `tf.cond`, replicas through `tf.distribute`.

This module holds the step's state and what Keras' `TensorFlowTrainer`
forces (`make_train_function`, `train_step`, the symbolic build); the
micro-step, the accumulation and the window's update are mixins beside it.
"""

import tensorflow as tf

from keras_accum.backend.tensorflow import distribute
from keras_accum.backend.tensorflow.accumulation import TensorFlowAccumulation
from keras_accum.backend.tensorflow.accumulators import (
    TensorFlowGradientAccumulator,
)
from keras_accum.backend.tensorflow.micro_step import TensorFlowMicroStep
from keras_accum.backend.tensorflow.window_update import TensorFlowWindowUpdate
from keras_accum.core import custom_steps
from keras_accum.core import validation


class TensorFlowAccumulationTrainer(
    TensorFlowMicroStep, TensorFlowAccumulation, TensorFlowWindowUpdate
):
    """The TensorFlow half of `AccumulatingModel` (a mixin before
    `keras.Model`, as Keras mixes `TensorFlowTrainer` into its `Model`).

    The micro-step adds each mini-batch's weighted gradients into
    replica-local accumulators; a full window is applied inside the step
    (every-N windows) or by `apply_accumulated_gradients` at epoch end.
    """

    accumulator_class = TensorFlowGradientAccumulator

    def _build_accumulators_eagerly(self):
        with self.distribute_strategy.scope():
            self._sync_accumulation_state()

    def _inside_traced_step(self):
        return tf.inside_function()

    def _pending_mini_batches(self):
        with tf.init_scope():  # Reads the count eagerly, even in a trace.
            return self.mini_step

    def _read_counter(self, variable):
        return int(variable.numpy())

    def _read_array(self, variable):
        with tf.init_scope():  # Eagerly, even while a step is traced.
            return variable.numpy()

    def _counter_value(self, variable):
        # Keras on TensorFlow runs each step to completion: nothing to defer.
        return variable.numpy()

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        # Under a strategy the model and optimizer are built before the
        # train function is traced; create the accumulators eagerly then.
        if self._ready_to_accumulate():
            self._build_accumulators_eagerly()
        functions = self._functions
        functions.xla_batch_step = functions.xla_window_update = None
        if not self._compiles_step_and_window_apart():
            return super().make_train_function(force=force)
        # Compiled whole, the step's XLA cluster would hold the `tf.cond`
        # that applies the window, and an XLA conditional passes every
        # variable either branch writes through the cluster: each micro-step
        # would copy the weights, the optimizer slots and the accumulators.
        # Instead the batch's accumulation and the window update are two
        # XLA functions, with the condition between them in the ordinary
        # graph.
        functions.xla_batch_step = tf.function(
            self._accumulate_batch, jit_compile=True, reduce_retracing=True
        )
        functions.xla_window_update = tf.function(
            self._apply_local_sums, jit_compile=True
        )
        jit_compile = self._jit_compile
        self._jit_compile = False
        try:
            return super().make_train_function(force=force)
        finally:
            self._jit_compile = jit_compile

    def _compiles_step_and_window_apart(self):
        """Whether the step runs as two XLA functions (`jit_compile` on one
        device; under a strategy Keras decides as for `keras.Model`)."""
        return (
            bool(self.jit_compile)
            and not self.run_eagerly
            and self._schedule.value != 1
            and not custom_steps.overrides_train_step(self)
            and self._distribute_strategy is None
            and not tf.distribute.has_strategy()
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras learns input shapes by reducing a distributed batch across
        # replicas, which fails under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585); one replica's batch has the same shapes.
        strategy = self._distribute_strategy
        if (
            iterator is not None
            and strategy is not None
            and distribute.is_multi_worker(strategy)
        ):
            for _, _, batches in iterator:
                data_batch = distribute.first_local_batch(
                    strategy, next(batches)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(
            iterator=iterator, data_batch=data_batch
        )

    def _replicas(self):
        return self.distribute_strategy.num_replicas_in_sync

    @custom_steps.own_step
    def train_step(self, data):
        if self._trains_as_keras():
            return super().train_step(data)
        custom_steps.count_accumulation(self)
        if self._functions.xla_batch_step is not None:
            logs = self._functions.xla_batch_step(data)
        else:
            logs = self._accumulate_batch(data)
        if self._schedule.value != validation.EPOCH:
            self._apply_window_when(self._window_is_full, self._window_plan)
        return logs
