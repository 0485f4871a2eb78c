"""The callback that applies the accumulated gradient at epoch end."""

import collections
import warnings

import keras

# A window check read from `on_train_batch_begin(due)` on (or at epoch end):
# `discarded` is `int()`-able, the windows are batches `[first, end)`.
_DeferredCheck = collections.namedtuple(
    "_DeferredCheck", ["due", "discarded", "first", "end"]
)

# What the callback calls on its model: `AccumulatingModel`'s own methods.
_ACCUMULATING_MODEL_API = (
    "apply_accumulated_gradients",
    "reset_accumulated_gradients",
    "_begin_epoch",
    "_noise_scale_logs",
)


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
      is raised before any later window is applied (at epoch end for the
      epoch's last window), naming the window's batches. Windows are
      checked, not micro-batches: one read per window, one execution late
      where that is still before the next window ends, so the read never
      waits for the device; and no batch-end hook, so Keras keeps
      dispatching batch-end callbacks asynchronously.

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
        self._deferred_check = None

    def set_model(self, model):
        # Checked by the methods the callback calls, not by class: the
        # model's module imports this one, not the other way round.
        if not all(
            hasattr(type(model), name) for name in _ACCUMULATING_MODEL_API
        ):
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
        self.model._begin_epoch(epoch)
        self._window = self.model._schedule.window_size(epoch)
        self._windows_checked = 0
        self._deferred_check = None

    def on_train_batch_begin(self, batch, logs=None):
        # Windows are checked from here, not from `on_train_batch_end`: one
        # batch-end hook makes Keras dispatch every callback synchronously,
        # converting each batch's logs to NumPy (a device-to-host wait per
        # batch).
        if self._checks_windows:
            self._check_windows_before(batch)
        # The batches run once this execution ends (see `_apply_pending`).
        steps = (self.params or {}).get("steps")
        executed = batch + self._model.steps_per_execution
        self._batches_seen = executed if steps is None else min(
            executed, steps
        )

    @property
    def _checks_windows(self):
        return (
            self._model.on_nonfinite == "raise"
            and self._accumulator is not None
        )

    def _check_windows_before(self, batch):
        """Checks the windows completed by the batches before `batch`.

        Reads the count once per completed window, and where the window
        spans at least two executions, one execution late: by then the
        device has run the window's steps while the next execution was
        queued, so the read does not stall it. No later window can end (and
        be applied) in the execution between, and a discarded window was
        never applied, so the error still comes before any further update.
        """
        # `self._model` throughout: on JAX, `self.model` syncs the whole
        # training state into the variables.
        deferred = self._deferred_check
        if deferred is not None and batch >= deferred.due:
            self._deferred_check = None
            self._check_finite(deferred.discarded, deferred.first,
                               deferred.end)
        if not self._window or batch // self._window <= self._windows_checked:
            return  # No window completed since the last check.
        first = self._windows_checked * self._window
        # With `steps_per_execution`, possibly several windows.
        self._windows_checked = batch // self._window
        end = self._windows_checked * self._window
        steps_per_execution = self._model.steps_per_execution
        if self._window >= 2 * steps_per_execution:
            self._deferred_check = _DeferredCheck(
                batch + steps_per_execution,
                self._model._discarded_windows_later(), first, end,
            )
        else:
            self._check_finite(self._model.discarded_windows, first, end)

    def on_test_begin(self, logs=None):
        # Validation inside `fit` runs before `on_epoch_end`.
        self._apply_pending()

    def on_epoch_end(self, epoch, logs=None):
        self._apply_pending()
        if logs is not None and self._model.noise_scale:
            # After the epoch's last window: the estimate every later
            # callback (`History`, `UpdateTensorBoard`) logs.
            logs.update(self._model._noise_scale_logs())

    def _apply_pending(self):
        if not self._epoch_pending:
            return
        deferred, self._deferred_check = self._deferred_check, None
        if deferred is not None:
            # Before the epoch's last window is applied or discarded.
            self._check_finite(deferred.discarded, deferred.first,
                               deferred.end)
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
        if self._checks_windows:
            self._check_finite(
                self._model.discarded_windows,
                self._windows_checked * self._window,
                self._batches_seen,
            )

    def _check_finite(self, discarded, first_batch, end_batch):
        """Raises if a window of batches `[first_batch, end_batch)` was
        discarded for a non-finite gradient (`on_nonfinite="raise"`).

        Args:
            discarded: The model's `discarded_windows` once those batches
                ran, or a value `int()` reads it from.
        """
        discarded = int(discarded)
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
