"""The TensorFlow micro-step: one batch's forward and backward passes
under `tf.GradientTape`, whole or in micro-batches of `micro_batch_size`,
added to the window's sums."""

import keras
import tensorflow as tf

from keras_accum._compat import losses as compat_losses
from keras_accum._compat import trainer as compat_trainer
from keras_accum.backend.tensorflow import attribution
from keras_accum.backend.tensorflow import distribute
from keras_accum.backend.tensorflow import loss_scale
from keras_accum.backend.tensorflow import micro_batches as tf_micro_batches
from keras_accum.core import window_loss
from keras_accum.core.loss_normalisers import record_loss_normalisers


class TensorFlowMicroStep:
    """Adds one `fit` batch to the window (a mixin of
    `TensorFlowAccumulationTrainer`): the step without the window's update.
    """

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
                    with compat_trainer.losses_override(self, entries):
                        loss = compat_trainer.compute_loss(
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
            logged_loss = compat_losses.unscale_loss_for_distribution(loss)
            skip = self._on_nonfinite == "skip"
            if not skip:
                window_loss.log_micro_batch(
                    compat_trainer.loss_tracker(self), logged_loss,
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
                compat_trainer.loss_tracker(self), logged_loss,
                contribution, first_in_window, kept=kept,
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if distribute.is_multi_worker(self.distribute_strategy):
            logs = distribute.rank_one_logs(logs)
        return logs
