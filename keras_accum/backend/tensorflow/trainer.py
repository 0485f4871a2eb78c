"""The TensorFlow train step: accumulation with `tf.GradientTape`, windows
applied inside the step with `tf.cond`, replicas through `tf.distribute`."""

import functools

import keras
import tensorflow as tf

from keras_accum import _keras_internals
from keras_accum import custom_steps
from keras_accum import objectives
from keras_accum import validation
from keras_accum import window_loss
from keras_accum.backend.tensorflow import attribution
from keras_accum.backend.tensorflow import distribute
from keras_accum.backend.tensorflow import loss_scale
from keras_accum.backend.tensorflow import micro_batches as tf_micro_batches
from keras_accum.backend.tensorflow.accumulators import (
    TensorFlowGradientAccumulator,
)
from keras_accum.loss_normalisers import record_loss_normalisers
from keras_accum.window_plan import WindowPlan
from keras_accum.window_plan import gradient_exists


class TensorFlowAccumulationTrainer:
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

    def _accumulate_batch(self, data):
        """Adds one `fit` batch to the window: the step without the
        window's update. Returns the logs."""
        if self._micro_batch_size is None:
            logs = self._micro_step(data)
        else:
            logs = self._accumulate_micro_batches(data)
        self._accumulator.count_micro_batch()
        return logs

    def _accumulate_micro_batches(self, data):
        """Adds one `fit` batch in micro-batches of `micro_batch_size`.
        Returns the logs.

        This replica's batch is split: the first micro-batch runs on its
        own (on the first trace it builds whatever the model builds lazily,
        which a loop body may not), the full ones after it under one
        `tf.while_loop` (one micro-batch's activations live at a time), and
        the shorter last one, if any, under a `tf.cond`. Their sizes are
        shape arithmetic, so under XLA they are compile-time constants.
        """
        self._check_micro_batches_per_replica()
        split = tf_micro_batches.Split(data, self._micro_batch_size)
        logs = self._micro_step(split.first())
        if not split.has_more():
            return logs
        stack = split.full_micro_batches()

        def full_micro_batch(index):
            self._micro_step(split.micro_batch(stack, index), first=False)
            return index + 1

        if not split.is_static or split.full:
            tf.while_loop(
                lambda index: index < split.full,
                full_micro_batch,
                [tf.constant(0)],
                parallel_iterations=1,
            )
        # Sliced outside the `tf.cond`, where XLA knows its size.
        last = split.last()

        def last_micro_batch():
            self._micro_step(last, first=False)
            return tf.no_op()

        if not split.is_static:
            tf.cond(split.remainder > 0, last_micro_batch, tf.no_op)
        elif split.remainder:
            last_micro_batch()
        logs = self.get_metrics_result()
        if distribute.is_multi_worker(self.distribute_strategy):
            logs = distribute.rank_one_logs(logs)
        return logs

    def _check_micro_batches_per_replica(self):
        """Refuses what the micro-batch loop cannot run under replicas.

        Under `on_nonfinite="skip"` and dynamic loss scaling each
        micro-batch is kept or skipped on every replica alike, which takes
        an all-reduce per micro-batch: TensorFlow runs no all-reduce inside
        a `tf.while_loop` body under a strategy (`merge_call`).
        """
        if self._replicas() == 1 or not (
            self._on_nonfinite == "skip"
            or loss_scale.is_dynamic(self.optimizer)
        ):
            return
        raise ValueError(
            "`micro_batch_size` under a strategy with several replicas "
            "cannot check each micro-batch for non-finite gradients on "
            "every replica (`on_nonfinite=\"skip\"`, or the dynamic loss "
            "scaling of `mixed_float16`): TensorFlow runs no all-reduce "
            "inside the step's loop. Use on_nonfinite=\"raise\" (and "
            "`mixed_bfloat16`), or micro_batch_size=None with `accumulate`. "
            f"Received: micro_batch_size={self._micro_batch_size!r}, "
            f"on_nonfinite={self._on_nonfinite!r} on "
            f"{self._replicas()} replicas"
        )

    def _micro_step(self, data, first=True):
        """Forward, backward and accumulation of one micro-batch (the
        whole batch without `micro_batch_size`). Returns the logs.

        Args:
            data: The micro-batch.
            first: Python bool, whether it is its batch's first micro-batch
                (only a batch's first can start a window).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(
            next(i for i in tf.nest.flatten(x) if i is not None)
        )[0]
        # Several loss terms take one backward pass each; `None` (loss
        # not built yet) may turn out to be several.
        per_loss = self._loss_terms() != 1

        with tf.GradientTape(persistent=per_loss) as tape:
            with record_loss_normalisers(self) as recorded:
                if self._call_has_training_arg:
                    y_pred = self(x, training=True)
                else:
                    y_pred = self(x)
                # `compute_loss` sees these very tensors as `model.losses`,
                # so that their factors in the loss can be read.
                entries = list(self.losses)
                with tf.GradientTape() as loss_tape:
                    # The parts whose factors are read: each term as it is
                    # reduced, whatever it was computed from (a sigmoid's
                    # logits, say), and the `model.losses` entries.
                    loss_tape.watch(entries)
                    recorded.watch = loss_tape.watch
                    with _keras_internals.losses_override(self, entries):
                        loss = _keras_internals.compute_loss(
                            self,
                            x=x,
                            y=y,
                            y_pred=y_pred,
                            sample_weight=sample_weight,
                            training=True,
                        )
            self._note_loss_terms(recorded)
            # After the forward pass and the loss, which build a subclassed
            # model's layers and the compiled loss on the first trace.
            self._sync_accumulation_state()
            first_in_window = tf.logical_and(
                self._accumulator.mini_step.value == 0, first
            )

            def probe(terms, losses, check):
                with tape.stop_recording():
                    return attribution.probe(
                        self, loss_tape, loss, recorded, entries,
                        (x, y, sample_weight), y_pred, check,
                    )

            contribution = self._micro_batch_contribution(
                recorded, loss, batch_size, first_in_window, probe
            )
            logged_loss = _keras_internals.unscale_loss_for_distribution(loss)
            skip = self._on_nonfinite == "skip"
            if not skip:
                window_loss.log_micro_batch(
                    _keras_internals.loss_tracker(self), logged_loss,
                    contribution, first_in_window,
                )
            dynamic_scaling = loss_scale.is_dynamic(self.optimizer)
            if dynamic_scaling:
                # The normaliser multiplies the gradient, not the loss, so
                # the scaled loss stays in the float16 range.
                objectives_to_differentiate = contribution.objectives
                gradient_scales = contribution.gradient_scales
            else:
                # Weighting the loss costs one scalar multiply; weighting the
                # gradients would cost a pass over every gradient per step.
                objectives_to_differentiate = [
                    objective * scale
                    for objective, scale in zip(
                        contribution.objectives, contribution.gradient_scales
                    )
                ]
                gradient_scales = None
            scaled = [
                self.optimizer.scale_loss(o)
                for o in objectives_to_differentiate
            ]

        term_gradients = [
            tape.gradient(objective, self._accumulator.variables)
            for objective in scaled
        ]
        del tape
        kept = self._accumulate(
            term_gradients,
            contribution,
            weighted=gradient_scales is None,
            loss_is_finite=tf.math.is_finite(logged_loss),
        )
        if skip:
            # A skipped micro-batch is left out of the logged loss too, on
            # every replica.
            window_loss.log_micro_batch(
                _keras_internals.loss_tracker(self), logged_loss,
                contribution, first_in_window, kept=kept,
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if distribute.is_multi_worker(self.distribute_strategy):
            logs = distribute.rank_one_logs(logs)
        return logs

    def _accumulate(self, term_gradients, contribution, weighted,
                    loss_is_finite=True):
        """Adds one micro-batch's gradients to the window.

        Args:
            term_gradients: One list of gradients per loss term, aligned
                with the accumulated variables.
            contribution: The micro-batch's `MicroBatchContribution`.
            weighted: Whether the gradients already carry the
                contribution's `gradient_scales` (the loss was weighted).
            loss_is_finite: Scalar bool, whether the micro-batch's loss is
                finite (checked with its gradients on the per-micro-batch
                path).

        Returns:
            Scalar bool, whether the micro-batch was added (always true on
            the lean path, where the window is checked instead).
        """
        self._window_plan = WindowPlan(
            contribution.divides, gradient_exists(term_gradients)
        )
        scales = None if weighted else contribution.gradient_scales
        if (
            loss_scale.is_dynamic(self.optimizer)
            or self._on_nonfinite == "skip"
        ):
            return self._accumulate_if_finite(
                term_gradients, scales, contribution.normalisers,
                tf.convert_to_tensor(loss_is_finite),
            )
        if scales is not None:
            term_gradients = [
                [_scale_gradient(g, scale, tf.multiply) for g in gradients]
                for gradients, scale in zip(term_gradients, scales)
            ]
        # The lean step: one add per weight. A non-finite gradient reaches
        # the sums, and the window is checked (once) before it is applied.
        self._accumulator.add(term_gradients, contribution.normalisers)
        return tf.constant(True)

    def _window_is_full(self):
        accumulator = self._accumulator
        if self._schedule.is_static:
            return accumulator.mini_step.value >= self._schedule.value
        window = accumulator.window.value
        return tf.logical_and(window > 0, accumulator.mini_step.value >= window)

    def _accumulate_if_finite(self, term_gradients, scales, normalisers,
                              loss_is_finite):
        """Adds the micro-batch, unless one of its gradients is not finite.

        The per-micro-batch check, used under dynamic loss scaling and with
        `on_nonfinite="skip"`. A non-finite micro-batch gets a factor of zero
        through `multiply_no_nan`, which zeroes NaN and infinite entries too,
        so it never reaches the accumulators (cheaper than a `tf.cond`
        around the update on CPU). Under loss scaling the factor also holds
        the term's scale (normaliser and replica count, see `objectives`)
        divided by the loss scale, and a non-finite micro-batch lowers the
        scale, as `LossScaleOptimizer` does for a step; otherwise it is
        counted in `skipped`.

        Under a strategy the micro-batch is the global one: it is skipped on
        every replica when any replica's shard is not finite (one scalar
        all-reduce, on this path only), as on one device.

        Args:
            term_gradients: One list of gradients per loss term.
            scales: One scalar per loss term to multiply its gradients by,
                or `None` when the loss was already weighted.
            normalisers: Vector of each term's normaliser for this batch.
            loss_is_finite: Scalar bool, whether this shard's loss is.

        Returns:
            Scalar bool: whether the micro-batch was added.
        """
        flat = [
            g.values if isinstance(g, tf.IndexedSlices) else g
            for gradients in term_gradients
            for g in gradients
            if g is not None
        ] + [normalisers]
        # A sum is finite iff every element is (barring overflow of the sum).
        total = tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in flat])
        finite = _on_every_replica(
            tf.logical_and(tf.math.is_finite(total), loss_is_finite)
        )
        keep = tf.cast(finite, normalisers.dtype)
        loss_scale_value = getattr(self.optimizer, "dynamic_scale", None)
        if scales is None:
            scales = [tf.ones((), normalisers.dtype)] * len(term_gradients)

        def factor(scale):
            scale = tf.cast(scale, keep.dtype)
            if loss_scale_value is not None:
                return keep * scale / tf.cast(loss_scale_value, keep.dtype)
            return keep * scale

        accumulator = self._accumulator
        accumulator.add(
            [
                [
                    _scale_gradient(g, term_factor, tf.math.multiply_no_nan)
                    for g in gradients
                ]
                for gradients, term_factor in zip(
                    term_gradients, [factor(scale) for scale in scales]
                )
            ],
            tf.math.multiply_no_nan(normalisers, keep),
        )
        if loss_scale.is_dynamic(self.optimizer):
            # Under loss scaling an overflow is expected: the scale drops
            # and training goes on, as with `LossScaleOptimizer`.
            loss_scale.update_dynamic_scale(self.optimizer, finite)
        else:
            accumulator.skipped.value.assign_add(
                1 - tf.cast(finite, tf.int64), read_value=False
            )
        return finite

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
            terms = len(self._accumulator.gradients)
            totals = tf.cond(
                full,
                lambda: self._window_totals(strategy),
                lambda: tf.zeros(
                    (terms + 1,), self._accumulator.normalisers.dtype
                ),
            )
            normalisers, finite = totals[:-1], tf.equal(totals[-1], 0)
            tf.cond(
                tf.logical_and(full, finite),
                lambda: self._apply_window(strategy, normalisers, plan),
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

        One scalar reduction besides the optimizer's all-reduce of the
        gradients: each replica's normaliser sums, with a flag saying
        whether its gradient sums and normalisers are all finite, so every
        replica takes the same decision.

        Returns:
            A vector: each term's global normaliser, then the number of
            replicas whose gradient sums are not finite.
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
                [normalisers, tf.cast(nonfinite, normalisers.dtype)[None]],
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

    def _apply_window(self, strategy, normalisers, plan):
        """Normalises the window's sums and applies them (see
        `_apply_local_sums`), as one XLA function under `jit_compile`."""
        update = self._functions.xla_window_update
        if update is not None:
            update(normalisers, plan)
            return tf.no_op()
        return _run_in_replicas(
            strategy, self._apply_local_sums, normalisers, plan
        )

    def _apply_local_sums(self, normalisers, plan):
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
        instead (see `_apply_clipped_window`), as one device clips the big
        batch's.
        """
        accumulator = self._accumulator
        gradients = None
        for term, accumulators in enumerate(accumulator.gradients):
            term_gradients = [tf.convert_to_tensor(a.value) for a in accumulators]
            if plan.divides[term]:
                term_gradients = [
                    tf.math.divide_no_nan(g, tf.cast(normalisers[term], g.dtype))
                    for g in term_gradients
                ]
            gradients = (
                term_gradients
                if gradients is None
                else [a + b for a, b in zip(gradients, term_gradients)]
            )
        exists = plan.gradient_exists or (True,) * len(gradients)
        gradients = [g if e else None for g, e in zip(gradients, exists)]
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        context = tf.distribute.get_replica_context()
        if (
            _clips(optimizer)
            and context is not None
            and context.num_replicas_in_sync > 1
        ):
            _apply_clipped_window(
                optimizer, context, gradients, accumulator.variables
            )
        else:
            optimizer.apply(gradients, accumulator.variables)
        accumulator.reset()

    def _accumulate_from_custom_step(self, gradients, normaliser):
        """`accumulate_gradients` on TensorFlow (see `AccumulatingModel`)."""
        if self._micro_batch_size is not None:
            raise ValueError(
                "`micro_batch_size` splits the batch inside "
                "`AccumulatingModel`'s own step; a custom step that calls "
                "`accumulate_gradients` computes its gradients itself. "
                "Split the batch in that step, or call "
                "`super().train_step(data)`, or pass micro_batch_size=None. "
                f"Received: micro_batch_size={self._micro_batch_size!r}"
            )
        custom_steps.count_accumulation(self)
        self._sync_accumulation_state()
        accumulator = self._accumulator
        if len(gradients) != len(accumulator.variables):
            raise ValueError(
                "`gradients` must have one entry per trainable variable "
                f"({len(accumulator.variables)}), in the order of "
                "`model.trainable_variables`. Received: "
                f"{len(gradients)} gradients"
            )
        dtype = accumulator.normalisers.dtype
        normaliser = tf.cast(normaliser, dtype)
        terms = len(accumulator.gradients)
        contribution = objectives.MicroBatchContribution(
            objectives=None,
            gradient_scales=[
                objectives.replica_scale(normaliser)
            ] + [tf.zeros((), dtype)] * (terms - 1),
            normalisers=tf.concat(
                [normaliser[None], tf.zeros((terms - 1,), dtype)], axis=0
            ),
            divides=(True,) + (False,) * (terms - 1),
            logging_weight=normaliser,
        )
        term_gradients = [list(gradients)] + [
            [None] * len(gradients)
        ] * (terms - 1)
        self._accumulate(term_gradients, contribution, weighted=False)
        accumulator.count_micro_batch()
        if self._schedule.value != validation.EPOCH:
            self._apply_window_when(self._window_is_full, self._window_plan)

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


# What `apply` reads before clipping: the clipping arguments, then the
# factor it divides the gradients by first.
_CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue", "loss_scale_factor")


def _clips(optimizer):
    """Whether `optimizer.apply` clips (as `_clip_gradients` decides)."""
    return any(
        value is not None and value > 0
        for value in (getattr(optimizer, name, None) for name in _CLIPPING[:3])
    )


def _set_clipping(optimizer, values):
    for name, value in zip(_CLIPPING, values):
        setattr(optimizer, name, value)


def _apply_clipped_window(optimizer, context, gradients, variables):
    """Applies the window's gradient clipped as a whole (replica context).

    Keras' `apply` clips before its `SUM` all-reduce, i.e. each replica's
    share. Here the shares are all-reduced first and the window's gradient
    is clipped by the optimizer's own `_clip_gradients` (after dividing by
    its `loss_scale_factor`, as `apply` does), on every replica alike. The
    optimizer then gets the clipped gradient on the first replica and zeros
    on the others, with its clipping and `loss_scale_factor` turned off for
    the call, so its all-reduce gives back the clipped gradient exactly for
    any replica count. One more all-reduce per update, only when clipping.

    `MirroredStrategy` runs the replicas' functions in turns, switching at
    each all-reduce, on one shared optimizer: the arguments are read before
    the first all-reduce and set again before each read. The step is traced
    once, so this happens at trace time only.
    """
    arguments = [getattr(optimizer, name) for name in _CLIPPING]
    reduced = iter(
        context.all_reduce(
            tf.distribute.ReduceOp.SUM, [g for g in gradients if g is not None]
        )
    )
    totals = [None if g is None else next(reduced) for g in gradients]
    try:
        _set_clipping(optimizer, arguments)
        scale = optimizer.loss_scale_factor
        if scale is not None:
            totals = [g if g is None else g / scale for g in totals]
        clipped = iter(
            optimizer._clip_gradients([g for g in totals if g is not None])
        )
        first = tf.equal(context.replica_id_in_sync_group, 0)
        shares = [
            None if g is None
            else tf.where(first, next(clipped), tf.zeros_like(g))
            for g in totals
        ]
        _set_clipping(optimizer, [None] * len(_CLIPPING))
        optimizer.apply(shares, variables)
    finally:
        _set_clipping(optimizer, arguments)


def _scale_gradient(gradient, factor, multiply):
    """`multiply(gradient, factor)` for dense and sparse gradients."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            multiply(gradient.values, tf.cast(factor, gradient.values.dtype)),
            gradient.indices,
            gradient.dense_shape,
        )
    return multiply(gradient, tf.cast(factor, gradient.dtype))


def _on_every_replica(finite):
    """Whether `finite` holds on every replica (replica context).

    One scalar all-reduce under a strategy with several replicas; none on
    one device.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    failures = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.cast(tf.logical_not(finite), tf.float32),
    )
    return tf.equal(failures, 0.0)


def _run_in_replicas(strategy, function, *args):
    """Runs `function` in every replica, from either context."""
    if tf.distribute.in_cross_replica_context():
        strategy.run(function, args=args)
    else:
        function(*args)
    return tf.no_op()
