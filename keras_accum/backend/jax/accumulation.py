"""Adding one `fit` batch to the JAX window, inside the jitted step.

The batch is split into micro-batches (the full ones under
`jax.lax.scan`); each gets one forward pass, one backward pass per loss
term, and its weighted gradients and normalisers are added to the
`Window`; its loss is logged by its share of the window.
"""

import jax
import keras
from jax import numpy as jnp
from keras import ops

from keras_accum._compat import trainer as compat_trainer
from keras_accum.backend.jax import attribution
from keras_accum.backend.jax import micro_batches as jax_micro_batches
from keras_accum.core import micro_batches
from keras_accum.core import noise_scale
from keras_accum.core import objectives
from keras_accum.core import window_loss
from keras_accum.core.loss_normalisers import record_loss_normalisers
from keras_accum.core.window_plan import WindowPlan


class JAXBatchAccumulation:
    """One `fit` batch into the window (a mixin of
    `JAXAccumulationTrainer`)."""

    def _micro_batch_size_for(self, state, data):
        """The micro-batch size of this step's batch: the argument, or
        under `"auto"` the size chosen once per input shape."""
        override = self._functions.micro_batch_override
        if override is not None:
            return override  # A candidate `"auto"` is compiling.
        if self._micro_batch_size != micro_batches.AUTO:
            return self._micro_batch_size
        shapes = tuple(
            (tuple(leaf.shape), str(leaf.dtype))
            for leaf in jax.tree_util.tree_leaves(data)
        )
        chosen = self._functions.micro_batch_choices
        if shapes not in chosen:
            chosen[shapes] = jax_micro_batches.choose(
                self, state, data, self._memory_limit
            )
        self._chosen_micro_batch_size = chosen[shapes]
        return chosen[shapes]

    def _accumulate_batch(self, state, window, data, micro_batch_size):
        """Adds one `fit` batch to `window`, in micro-batches of
        `micro_batch_size` examples per device (`None`: the whole batch).

        The full micro-batches run under `jax.lax.scan` (one compiled body,
        one micro-batch's activations live at a time), then the shorter
        last one, if any, with its own static shape. Under
        `keras.distribution` each device's shard of the batch is split,
        so every micro-batch stays sharded over the devices as the batch
        was.

        Args:
            state: `(trainable, non_trainable, metrics, optimizer_values)`.
            window: The `Window` before the batch.
            data: The batch.
            micro_batch_size: Int, or `None` for the whole batch.

        Returns:
            `(window, non_trainable, metrics, logs)` after the batch; the
            window counts the batch once.
        """
        trainable, non_trainable, metrics, optimizer_values = state
        first = window.mini_step == 0
        count = window.mini_step + 1

        def micro_batch(carry, micro_data, first_in_window):
            non_trainable, metrics, window = carry
            return self._accumulate_micro_batch(
                (trainable, non_trainable, metrics, optimizer_values),
                window, micro_data, first_in_window,
            )

        carry = (non_trainable, metrics, window)
        batch = jax_micro_batches.batch_size(data)
        devices = jax_micro_batches.data_parallel_devices(batch)
        if micro_batch_size is None or micro_batch_size >= batch // devices:
            carry, logs = micro_batch(carry, data, first)
        else:
            # At least one full micro-batch: the size is below the shard's.
            split = micro_batches.Split.of(batch // devices, micro_batch_size)
            carry, logs = self._scan_micro_batches(
                micro_batch, carry,
                jax_micro_batches.full_micro_batches(data, devices, split),
                first, split.full,
            )
            if split.remainder:
                # After a full one, so it never starts a window.
                carry, logs = micro_batch(
                    carry,
                    jax_micro_batches.last_micro_batch(data, devices, split),
                    jnp.zeros((), bool),
                )
        non_trainable, metrics, window = carry
        return window._replace(mini_step=count), non_trainable, metrics, logs

    def _scan_micro_batches(self, micro_batch, carry, stacked, first, count):
        """`micro_batch` over the `count` stacked micro-batches, under
        `jax.lax.scan`. Returns the carry and the last one's logs."""

        def body(carry, step):
            index, micro_data = step
            return micro_batch(
                carry, micro_data, jnp.logical_and(first, index == 0)
            )

        carry, all_logs = jax.lax.scan(
            body, carry, (jnp.arange(count), stacked)
        )
        return carry, jax.tree_util.tree_map(lambda v: v[-1], all_logs)

    def _accumulate_micro_batch(self, state, window, data, first_in_window):
        """Forward, backward and accumulation of one micro-batch.

        Args:
            state: `(trainable, non_trainable, metrics, optimizer_values)`.
            window: The `Window` before the micro-batch.
            data: The micro-batch.
            first_in_window: Scalar bool, whether it starts the window.

        Returns:
            `((non_trainable, metrics, window), logs)`; `window.mini_step`
            is left to the caller, which counts `fit` batches.
        """
        trainable, non_trainable, metrics, optimizer_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = jax_micro_batches.batch_size(x)
        static = {}

        def weighted_objectives(trainable):
            with record_loss_normalisers(self) as recorded:
                _, (loss, y_pred, new_non_trainable, new_metrics) = (
                    self.compute_loss_and_updates(
                        trainable,
                        non_trainable,
                        metrics,
                        x,
                        y,
                        sample_weight,
                        training=True,
                        optimizer_variables=optimizer_values,
                    )
                )

            def probe(terms, losses, check):
                return attribution.probe(
                    self, (trainable, non_trainable, metrics),
                    (x, y, sample_weight), y_pred, terms, losses, check,
                )

            # Weight regularisation inside the contribution reads the
            # weights: give it this step's values.
            with keras.StatelessScope(
                state_mapping=list(zip(self.trainable_variables, trainable))
            ):
                contribution = self._micro_batch_contribution(
                    recorded, loss, batch_size, first_in_window, probe
                )
            static["divides"] = contribution.divides
            weighted = ops.stack(
                [
                    objective * scale
                    for objective, scale in zip(
                        contribution.objectives, contribution.gradient_scales
                    )
                ]
            )
            return weighted, (
                loss,
                contribution.normalisers,
                (contribution.logging_weight, contribution.logged_terms),
                y_pred,
                new_non_trainable,
                new_metrics,
            )

        weighted, pullback, aux = jax.vjp(
            weighted_objectives, trainable, has_aux=True
        )
        loss, normalisers, logging, y_pred, non_trainable, metrics = aux
        # One backward pass per loss term, from one forward pass.
        basis = jnp.eye(weighted.shape[0], dtype=weighted.dtype)
        term_gradients = [pullback(direction)[0] for direction in basis]
        self._window_plan = WindowPlan(static["divides"])
        window, kept = self._add_micro_batch(
            window, term_gradients, normalisers, loss
        )
        logged = objectives.MicroBatchContribution(
            None, None, normalisers, static["divides"], *logging
        )
        # A skipped micro-batch is left out of the logged loss too.
        logs, metrics = self._update_logs(
            metrics, loss, logged, first_in_window,
            kept > 0 if self._on_nonfinite == "skip" else None,
            x, y, y_pred, sample_weight,
        )
        return (non_trainable, metrics, window), logs

    def _add_micro_batch(self, window, term_gradients, normalisers, loss):
        """Adds one micro-batch's weighted gradients to `window`.

        Returns:
            The new `Window` (its count left to the caller), and 1.0 or
            0.0: whether the micro-batch was added (0.0 only for a
            non-finite one under `on_nonfinite="skip"`).
        """
        normalisers = ops.cast(normalisers, window.normalisers.dtype)
        kept = jnp.ones((), loss.dtype)
        skipped = window.skipped
        if self._on_nonfinite == "skip":
            finite = jnp.all(
                jnp.stack(
                    [jnp.isfinite(jnp.sum(g)) for t in term_gradients
                     for g in t]
                    + [jnp.all(jnp.isfinite(normalisers)),
                       jnp.isfinite(loss)]
                )
            )
            # `where`, not a product: 0 * inf is NaN.
            term_gradients = [
                [jnp.where(finite, g, jnp.zeros_like(g)) for g in t]
                for t in term_gradients
            ]
            normalisers = jnp.where(
                finite, normalisers, jnp.zeros_like(normalisers)
            )
            kept = finite.astype(loss.dtype)
            skipped = skipped + 1 - finite.astype(skipped.dtype)
        sums = [
            [s + g.astype(s.dtype) for s, g in zip(term_sums, gradients)]
            for term_sums, gradients in zip(window.gradients, term_gradients)
        ]
        window = window._replace(
            gradients=sums,
            normalisers=window.normalisers + normalisers,
            skipped=skipped,
        )
        if window.noise:
            # The set's gradients as added (one set: `noise_scale` refuses
            # more): the window's block of them.
            noise_sums, state = window.noise
            window = window._replace(noise=[
                noise_sums + noise_scale.micro_batch_sums(
                    noise_scale.block_squared_norm(
                        term_gradients[0], noise_scale.window_block(state),
                        noise_scale.blocks_of(state), noise_sums.dtype,
                    ),
                    normalisers[0],
                ),
                state,
            ])
        return window, kept

    def _update_logs(self, metrics, loss, contribution, first_in_window,
                     kept, x, y, y_pred, sample_weight):
        """Keras' `_update_metrics_variables`, with the micro-batch's loss
        logged by its share of the window (see `window_loss`)."""
        with keras.StatelessScope(
            state_mapping=list(zip(self.metrics_variables, metrics))
        ) as scope:
            window_loss.log_micro_batch(
                compat_trainer.loss_tracker(self), loss, contribution,
                first_in_window, kept=kept,
            )
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        metrics = [
            _current(scope, v) for v in self.metrics_variables
        ]
        return logs, metrics


def _current(scope, variable):
    """`variable`'s value in a `StatelessScope`, or its own if untouched."""
    value = scope.get_current_value(variable)
    return variable.value if value is None else value

