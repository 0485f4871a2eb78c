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
      is raised after the batch that ended it, naming the window's batches.
      Windows are checked, not micro-batches: one read per window.

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
        accumulator = self.model._accumulator
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

    def on_train_batch_end(self, batch, logs=None):
        self._batches_seen = batch + 1
        # Only after a batch that completed a window (with
        # `steps_per_execution`, possibly several): no read on other batches.
        if self._window and self._batches_seen // self._window > (
            self._windows_checked
        ):
            first = self._windows_checked * self._window
            self._windows_checked = self._batches_seen // self._window
            self._check_finite(first, self._windows_checked * self._window)

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
        if self.model.on_nonfinite != "raise" or self._accumulator is None:
            return
        discarded = self.model.discarded_windows
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
