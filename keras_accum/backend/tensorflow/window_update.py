"""Applying the window on TensorFlow: inside the step under `tf.cond`
(every-N windows), at epoch end, or discarding it, on one device or on
every replica of a `tf.distribute` strategy."""

import functools

import tensorflow as tf

from keras_accum.backend.tensorflow import clipping
from keras_accum.core import noise_scale
from keras_accum.core import window as core_window


class TensorFlowWindowUpdate:
    """Applies, discards or resets the window (a mixin of
    `TensorFlowAccumulationTrainer`)."""

    def _window_is_full(self):
        accumulator = self._accumulator
        return core_window.is_full(
            self._schedule,
            accumulator.mini_step.value,
            accumulator.window.value,
        )

    def _apply_window_when(self, condition, plan):
        """Applies the window if `condition()` holds (call in replica context).

        Strategies that use merge calls (`MirroredStrategy`) may not merge
        inside a `tf.cond` branch, so the merge call runs unconditionally and
        the condition is checked in cross-replica context, where the window
        is applied through `strategy.run`. Other strategies (multi-worker,
        TPU, the default one) apply directly in replica context.

        A window whose gradient sum is not finite on some replica is
        discarded on every replica instead: when the window is full, the
        first `tf.cond` reduces its totals, and the next two apply or
        discard it.

        Args:
            condition: Callable returning a scalar bool tensor.
            plan: The `WindowPlan` traced with the step.
        """

        def apply_if(strategy):
            full = condition()
            accumulator = self._accumulator
            terms = len(accumulator.gradients)
            noise = accumulator.noise_sums is not None
            totals = tf.cond(
                full,
                lambda: self._window_totals(strategy),
                lambda: tf.zeros(
                    (terms + 1 + noise_scale.SUMS_SIZE * noise,),
                    accumulator.normalisers.dtype,
                ),
            )
            normalisers = totals[:terms]
            finite = tf.equal(totals[terms], 0)
            noise_sums = totals[terms + 1:] if noise else None
            tf.cond(
                tf.logical_and(full, finite),
                lambda: self._apply_window(
                    strategy, normalisers, noise_sums, plan
                ),
                lambda: tf.no_op(),
            )
            tf.cond(
                tf.logical_and(full, tf.logical_not(finite)),
                lambda: _run_in_replicas(strategy, self._accumulator.discard),
                lambda: tf.no_op(),
            )

        tf.__internal__.distribute.interim.maybe_merge_call(
            apply_if, tf.distribute.get_strategy()
        )

    def _window_totals(self, strategy):
        """The window's normalisers and count of non-finite replicas.

        One small reduction besides the optimizer's all-reduce of the
        gradients: each replica's normaliser sums, with a flag saying
        whether its gradient sums and normalisers are all finite, so every
        replica takes the same decision, and with `noise_scale=True` its
        noise-scale sums.

        Returns:
            A vector: each term's global normaliser, the number of
            replicas whose gradient sums are not finite, then the noise
            scale's global sums (if measured).
        """

        def local_totals():
            accumulator = self._accumulator
            normalisers = tf.convert_to_tensor(accumulator.normalisers.value)
            # Everything that enters the update: the gradient sums and the
            # normalisers they are divided by.
            nonfinite = tf.logical_not(
                tf.logical_and(
                    accumulator.local_sums_are_finite(),
                    tf.reduce_all(tf.math.is_finite(normalisers)),
                )
            )
            return tf.concat(
                [normalisers, tf.cast(nonfinite, normalisers.dtype)[None]]
                + (
                    []
                    if accumulator.noise_sums is None
                    else [tf.convert_to_tensor(accumulator.noise_sums.value)]
                ),
                axis=0,
            )

        if tf.distribute.in_cross_replica_context():
            return strategy.reduce(
                tf.distribute.ReduceOp.SUM, strategy.run(local_totals),
                axis=None,
            )
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, local_totals()
        )

    def _apply_window(self, strategy, normalisers, noise_sums, plan):
        """Normalises the window's sums and applies them (see
        `_apply_local_sums`), as one XLA function under `jit_compile`."""
        update = self._functions.xla_window_update
        if update is not None:
            update(normalisers, noise_sums, plan)
            return tf.no_op()
        return _run_in_replicas(
            strategy, self._apply_local_sums, normalisers, noise_sums, plan
        )

    def _apply_local_sums(self, normalisers, noise_sums, plan):
        """Applies this replica's sums; the optimizer all-reduces them.

        Replica context. Each replica passes its local gradient sums divided
        by the global normalisers; the optimizer's `SUM` all-reduce of those
        is the window's gradient: one all-reduce per update. A variable that
        got no gradient in the step is passed with `None`, as plain Keras
        passes it, so the optimizer leaves it alone (no weight decay, no
        momentum).

        An optimizer that clips (`clipnorm`, `global_clipnorm`, `clipvalue`)
        would clip each replica's share before its all-reduce; under several
        replicas the window's gradient is all-reduced and clipped here
        instead (see `clipping.apply_reduced_window`), as one device clips
        the big batch's. With `noise_scale=True` the window's gradient is
        all-reduced the same way, for its squared norm.

        Args:
            normalisers: Each term's global normaliser.
            noise_sums: The noise scale's global sums, or `None`.
            plan: The step's `WindowPlan`.
        """
        accumulator = self._accumulator
        gradients = core_window.window_gradient(
            [
                [tf.convert_to_tensor(a.value) for a in accumulators]
                for accumulators in accumulator.gradients
            ],
            normalisers,
            plan,
        )
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        context = tf.distribute.get_replica_context()
        observe = None
        if noise_sums is not None:

            def observe(window_gradient):
                state = tf.convert_to_tensor(accumulator.noise_state.value)
                accumulator.noise_state.value.assign(
                    noise_scale.updated_state(
                        state,
                        noise_sums,
                        accumulator.noise_block_squared_norm(
                            window_gradient, state
                        ),
                        normalisers[0],
                        accumulator.mini_step.value,
                    ),
                    read_value=False,
                )

        if (
            (clipping.clips(optimizer) or observe is not None)
            and context is not None
            and context.num_replicas_in_sync > 1
        ):
            clipping.apply_reduced_window(
                optimizer, context, gradients, accumulator.variables,
                observe=observe,
            )
        else:
            if observe is not None:
                observe(gradients)
            optimizer.apply(gradients, accumulator.variables)
        accumulator.reset()

    def _apply_pending_window(self):
        """Applies the window if it holds a mini-batch (eager call)."""
        accumulator = self._accumulator
        if self._functions.apply is None:

            def apply_function(plan):
                self.distribute_strategy.run(
                    self._apply_window_when,
                    args=(lambda: accumulator.mini_step.value > 0, plan),
                )

            # Traced once per model and `WindowPlan`. TensorFlow keys its
            # retracing statistics by a function's code, which every
            # model's closure shares: several models, each tracing its
            # apply once, read as one function retraced at every call and
            # log a retracing warning. A `partial` is keyed by itself.
            # No AutoGraph: the body is already graph code (explicit
            # `tf.cond`), and converting the closure only logs a warning.
            self._functions.apply = tf.function(
                functools.partial(apply_function), autograph=False
            )
        self._functions.apply(self._window_plan)

    def _reset_window(self):
        """Zeroes the window's sums and count (eager call)."""
        with self.distribute_strategy.scope():
            self._accumulator.reset()


def _run_in_replicas(strategy, function, *args):
    """Runs `function` in every replica, from either context."""
    if tf.distribute.in_cross_replica_context():
        strategy.run(function, args=args)
    else:
        function(*args)
    return tf.no_op()
