"""The accumulation window's life cycle, written once for every backend.

When the train step accumulates at all, building (and rebuilding) the
accumulators to match the trainable variables, each epoch's window, the
window's counters, and the public ways to add to, apply or reset a window.
What only a backend can do is behind the hooks each backend trainer
defines (`keras_accum/backend/<name>/`): `_read_counter`,
`_counter_value`, `_accumulate_from_custom_step`,
`_apply_pending_window` and `_reset_window`, and where the defaults here
(one replica, eager building) do not fit it, `_replicas`,
`_inside_traced_step`, `_pending_mini_batches` and
`_build_accumulators_eagerly`.
"""

import warnings

import keras

from keras_accum._compat import trainer as compat_trainer
from keras_accum.core import custom_steps
from keras_accum.core import window_loss


class WindowLifecycle:
    """The window's life cycle on the model: accumulators, counters, epochs.

    A mixin of `AccumulatingModel`, after the backend's trainer (whose
    hooks it calls) and before `keras.Model`. It reads the model's
    `_schedule`, `_micro_batch_size`, `_accumulator`, `_epoch_window` and
    `_functions`, and `_loss_terms` (see `LossTerms`).
    """

    # --- Hooks a backend may override ------------------------------------

    def _replicas(self):
        """Replicas whose shards make one batch (a strategy's; else 1)."""
        return 1

    def _inside_traced_step(self):
        """Whether a step is being traced (or, eagerly on torch, runs
        inside a window): accumulators may not be rebuilt then."""
        return self._functions.tracing

    def _pending_mini_batches(self):
        """Mini-batches accumulated and not applied, read eagerly."""
        return self.mini_step

    def _build_accumulators_eagerly(self):
        """Builds the accumulators outside a step."""
        self._sync_accumulation_state()

    def _read_array(self, variable):
        """An accumulator variable's current value, as a NumPy array."""
        return keras.ops.convert_to_numpy(variable.value)

    # --- The window's counters --------------------------------------------

    @property
    def mini_step(self):
        """Mini-batches accumulated in the current window (0 before `fit`)."""
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.mini_step)

    @property
    def skipped_micro_batches(self):
        """Micro-batches whose non-finite gradients were not accumulated.

        Counted under `on_nonfinite="skip"`, since the start of `fit`.
        """
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.skipped)

    @property
    def discarded_windows(self):
        """Windows not applied because their gradient was not finite.

        Counted since the start of `fit`; under `on_nonfinite="raise"`, `fit`
        raises at the first one.
        """
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.discarded)

    def _discarded_windows_later(self):
        """`discarded_windows` as a value that `int()` reads later.

        Taking it does not wait for the device (on JAX, a copy of the count
        in the running state, which the next step consumes); reading it
        waits only for the steps run so far.
        """
        if not self._accumulator.built:
            return 0
        return self._counter_value(self._accumulator.discarded)

    def accumulate_gradients(self, gradients, normaliser):
        """Adds one mini-batch's gradients to the window, from a custom step.

        For subclasses that override `train_step` on TensorFlow: call it
        instead of `optimizer.apply`. (On JAX, where a step is pure, a
        custom `train_step(self, state, data)` accumulates through
        `super().train_step(state, data)`.) The gradients are added to the
        accumulators, weighted by `normaliser`, and the window is applied
        as usual (when it is full, or at epoch end), divided by the
        window's summed normaliser. The applied gradient is then exactly
        that of the loss over the whole window, as long as each
        mini-batch's loss is its summed loss divided by `normaliser`.

        Args:
            gradients: List of gradients (tensors, `tf.IndexedSlices` or
                `None`), one per variable of `model.trainable_variables`,
                in that order: the gradient of the loss that
                `self.compute_loss` returns for the mini-batch (under a
                strategy, the replica's loss, which Keras scales by
                1/replicas).
            normaliser: Scalar: what the mini-batch's loss was divided by:
                its number of examples, valid (unmasked) entries, or sum of
                sample weights.

        Raises:
            ValueError: if `gradients` does not have one entry per
                trainable variable.
            NotImplementedError: on the JAX backend.

        Example:

        >>> class Custom(AccumulatingModel):
        ...     def train_step(self, data):
        ...         x, y = data
        ...         with tf.GradientTape() as tape:
        ...             y_pred = self(x, training=True)
        ...             loss = self.compute_loss(x, y, y_pred)
        ...         self.accumulate_gradients(
        ...             tape.gradient(loss, self.trainable_variables),
        ...             normaliser=tf.shape(x)[0])
        ...         return self.compute_metrics(x, y, y_pred)
        """
        return self._accumulate_from_custom_step(gradients, normaliser)

    def apply_accumulated_gradients(self):
        """Applies the gradient accumulated so far, if any, and resets.

        `fit` calls this at the end of every epoch through the
        `ApplyAccumulatedGradients` callback; call it yourself when you drive
        training with `train_on_batch`. It does nothing when no mini-batch
        was accumulated since the last update.

        Raises:
            RuntimeError: if the model was not compiled or never trained, so
                there is no accumulated gradient to apply.
        """
        self._require_accumulators("apply_accumulated_gradients")
        self._apply_pending_window()

    def reset_accumulated_gradients(self):
        """Discards the gradient accumulated in the current window.

        Raises:
            RuntimeError: if the model was not compiled or never trained.
        """
        self._require_accumulators("reset_accumulated_gradients")
        self._reset_window()

    def _require_accumulators(self, method):
        if getattr(self, "optimizer", None) is None:
            raise RuntimeError(
                f"`{method}()` needs a compiled model: call `compile()` "
                "first."
            )
        if not self._accumulator.built:
            if self._all_layers_built():
                self._build_accumulators_eagerly()
            if not self._accumulator.built:
                raise RuntimeError(
                    f"`{method}()` needs a model that has trained: call "
                    "`fit()` or `train_on_batch()` first."
                )

    def _all_layers_built(self):
        return all(
            layer.built for layer in compat_trainer.all_layers(self)
        )

    def _ready_to_accumulate(self):
        """Whether the accumulators can be built now: the step accumulates,
        and the model and its optimizer exist."""
        return (
            self._accumulates_in_step()
            and getattr(self, "optimizer", None) is not None
            and self._all_layers_built()
        )

    def _accumulates_in_step(self):
        """Whether the train step accumulates (not plain Keras training)."""
        return (
            not self._trains_as_keras()
            or custom_steps.overrides_train_step(self)
        )

    def _trains_as_keras(self):
        """Whether the step is plain `keras.Model`'s: `accumulate=1` on one
        replica. Under a strategy with several replicas plain Keras
        normalises each replica's loss by its own shard (masks, sample
        weights), clips each replica's gradient and keeps float32(1 /
        replicas); a window of one batch is the single-device update."""
        return (
            self._schedule.value == 1
            and self._replicas() == 1
            and self._micro_batch_size is None
        )

    def _sync_accumulation_state(self):
        """Makes the accumulators match the current trainable variables.

        Called eagerly by `make_train_function` and again in the traced
        step: without a strategy Keras builds the model and the compiled
        loss on the step's first trace, and the accumulators follow. The
        accumulators are keyed by the identity of the variables they were
        built for; when the trainable set changed (layers frozen or
        unfrozen, then `compile()` again) they are rebuilt, so a gradient
        can never be paired with another variable's accumulator.

        Raises:
            ValueError: if the model has no trainable weights, or if the
                trainable weights changed without a new `compile()` (the
                accumulators cannot be rebuilt inside a traced step).
        """
        trainable_variables = self.trainable_variables
        if not trainable_variables:
            raise ValueError(
                "`AccumulatingModel` accumulates the gradients of trainable "
                "weights, and this model has none (all layers frozen or no "
                "weights). Received: model with 0 trainable weights"
            )
        terms = self._loss_terms()
        if terms is None:
            return  # Built on the first trace, once the loss is built.
        window_loss.build_for(compat_trainer.loss_tracker(self), terms)
        accumulator = self._accumulator
        if accumulator.matches(trainable_variables, terms):
            return
        if (
            accumulator.built
            and self._inside_traced_step()
            and self._functions.accumulations > 1
        ):
            # Variables may be created on a step's first trace only (as
            # Keras builds its optimizer there); a retrace that finds the
            # trainable set changed comes from `trainable` set without a
            # new `compile()`.
            raise ValueError(
                "The model's trainable weights changed since `compile()` "
                f"({len(accumulator.variables)} accumulated, "
                f"{len(trainable_variables)} trainable now). Call "
                "`compile()` again after setting `trainable`, as Keras "
                "requires. Received: a changed set of trainable weights"
            )
        pending = self._pending_mini_batches()
        if pending:
            warnings.warn(
                f"The trainable weights changed with {pending} "
                "mini-batch(es) accumulated and not applied; they were "
                "discarded. Call `apply_accumulated_gradients()` before "
                "changing `trainable` to keep them.",
                stacklevel=3,
            )
        if not self.optimizer.built:
            self.optimizer.build(trainable_variables)
        normaliser_dtype = (
            "float64" if keras.backend.floatx() == "float64" else "float32"
        )
        accumulator.build(
            trainable_variables,
            normaliser_dtype,
            terms=terms,
            window=(
                self._schedule.window_size(0)
                if self._epoch_window is None
                else self._epoch_window
            ),
            noise_state=self._initial_noise_state(),
        )

    def _begin_epoch(self, epoch):
        """Sets the window of `epoch` (called by the flush callback)."""
        self._schedule.begin_epoch(epoch, self.noise_scale_estimate)
        self._epoch_window = self._schedule.window_size(epoch)
        if not self._schedule.is_static and self._accumulator.built:
            self._accumulator.window.assign(self._epoch_window)
