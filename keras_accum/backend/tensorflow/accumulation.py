"""Adding gradients to the window's sums on TensorFlow: the lean add, the
per-micro-batch non-finite check (`on_nonfinite="skip"`, dynamic loss
scaling), and the entry of custom steps (`accumulate_gradients`)."""

import tensorflow as tf

from keras_accum.backend.tensorflow import loss_scale
from keras_accum.core import custom_steps
from keras_accum.core import objectives
from keras_accum.core import validation
from keras_accum.core.window_plan import WindowPlan
from keras_accum.core.window_plan import gradient_exists


class TensorFlowAccumulation:
    """Adds a micro-batch's gradients to the accumulators (a mixin of
    `TensorFlowAccumulationTrainer`)."""

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
