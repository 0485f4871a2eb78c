"""The callback that applies the accumulated gradient at epoch end."""

import warnings

import keras


class ApplyAccumulatedGradients(keras.callbacks.Callback):
    """Applies an `AccumulatingModel`'s accumulated gradient once per epoch.

    `AccumulatingModel.fit` puts this callback first in its callback list by
    itself; add it by hand only to a `CallbackList` you drive yourself.

    Keras' `fit` runs validation (`on_test_begin`) before
    `callbacks.on_epoch_end`, so the update is applied at whichever comes
    first: validation then sees the updated weights, and so does every later
    callback's `on_epoch_end`. With `accumulate=N`, the mini-batches left
    over at epoch end (the last, indivisible window) are applied here too, so
    no gradient crosses an epoch boundary.

    It also keeps the window well defined around interruptions:

    - `on_train_begin` zeroes the accumulators, so a window left by an
      interrupted `fit` is discarded, never applied twice.
    - When training stops mid-epoch (`model.stop_training`, e.g. from
      `TerminateOnNaN`), the incomplete window is discarded, not applied.
    - `on_epoch_begin` sets the window of the epoch for `accumulate`
      schedules.
    - With `on_nonfinite="raise"`, a window whose accumulated gradient is
      not finite is not applied (on any replica), and `FloatingPointError`
      is raised before the next batch trains (at epoch end for the epoch's
      last window), naming the window's batches. Windows are checked, not
      micro-batches: one read per window, and no batch-end hook, so Keras
      keeps dispatching batch-end callbacks asynchronously.

    Example:

    >>> callbacks = keras.callbacks.CallbackList(
    ...     [ApplyAccumulatedGradients()], model=model)  # doctest: +SKIP
    >>> callbacks.on_epoch_end(0)  # doctest: +SKIP
    """

    def __init__(self):
        super().__init__()
        self._epoch_pending = False
        self._epoch = 0
        self._batches_seen = 0
        self._window = 0
        self._windows_checked = 0
        self._discarded_reported = 0

    def set_model(self, model):
        from keras_accum.accumulating_model import AccumulatingModel

        if not isinstance(model, AccumulatingModel):
            raise TypeError(
                "`ApplyAccumulatedGradients` works with an "
                "`keras_accum.AccumulatingModel`. Received: model of type "
                f"{type(model).__name__}"
            )
        super().set_model(model)

    @property
    def _accumulator(self):
        accumulator = self._model._accumulator
        return accumulator if accumulator.built else None

    def on_train_begin(self, logs=None):
        self._epoch_pending = False
        if self._accumulator is not None:
            self.model.reset_accumulated_gradients()
            self._accumulator.skipped.assign(0)
            self._accumulator.discarded.assign(0)
        self._discarded_reported = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_pending = True
        self._batches_seen = 0
        self._window = self.model._schedule.window_size(epoch)
        self._windows_checked = 0
        self.model._begin_epoch(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        # The windows completed by the batches before `batch` are checked
        # here, before the next batch trains, and not in
        # `on_train_batch_end`: one batch-end hook makes Keras dispatch every
        # callback synchronously, converting each batch's logs to NumPy (a
        # device-to-host wait per batch).
        if self._window and batch // self._window > self._windows_checked:
            # Only when a window was completed (with `steps_per_execution`,
            # possibly several): no read on other batches.
            first = self._windows_checked * self._window
            self._windows_checked = batch // self._window
            self._check_finite(first, self._windows_checked * self._window)
        # The batches run once this execution ends (see `_apply_pending`).
        steps = (self.params or {}).get("steps")
        executed = batch + self._model.steps_per_execution
        self._batches_seen = executed if steps is None else min(
            executed, steps
        )

    def on_test_begin(self, logs=None):
        # Validation inside `fit` runs before `on_epoch_end`.
        self._apply_pending()

    def on_epoch_end(self, epoch, logs=None):
        self._apply_pending()

    def _apply_pending(self):
        if not self._epoch_pending:
            return
        self._epoch_pending = False
        if self._accumulator is None:
            return
        steps = (self.params or {}).get("steps")
        if self.model.stop_training and (
            steps is None or self._batches_seen < steps
        ):
            # Stopped mid-epoch: the window is incomplete.
            if self.model.mini_step:
                warnings.warn(
                    f"Training stopped during epoch {self._epoch}; the "
                    f"{self.model.mini_step} mini-batch(es) accumulated in "
                    "its last window were discarded, not applied.",
                    stacklevel=2,
                )
            self.model.reset_accumulated_gradients()
            return
        self.model.apply_accumulated_gradients()
        self._check_finite(
            self._windows_checked * self._window, self._batches_seen
        )

    def _check_finite(self, first_batch, end_batch):
        """Raises if a window of batches `[first_batch, end_batch)` was
        discarded for a non-finite gradient (`on_nonfinite="raise"`)."""
        # `_model`, not `model`: on JAX, `model` syncs the whole training
        # state into the variables; the counter is read from it directly.
        if self._model.on_nonfinite != "raise" or self._accumulator is None:
            return
        discarded = self._model.discarded_windows
        if discarded > self._discarded_reported:
            self._discarded_reported = discarded
            self._epoch_pending = False
            raise FloatingPointError(
                f"Non-finite gradient in epoch {self._epoch}, in the window "
                f"of batches {first_batch}-{end_batch - 1}: its update was "
                "not applied, and the weights are those of the last update. "
                "Check the data and the learning rate, or pass "
                "on_nonfinite=\"skip\" to skip non-finite micro-batches "
                "(checked every micro-batch)."
            )
