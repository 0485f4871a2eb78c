"""`UpdateTensorBoard`: TensorBoard with one batch-level point per update."""

import keras


class UpdateTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` writing batch-level scalars per update.

    Keras' `update_freq=N` writes the batch-level scalars every N
    mini-batches, counted across epochs. An `AccumulatingModel`'s windows
    restart every epoch (the mini-batches left over at epoch end are applied
    then), so with `accumulate=N` those points drift off the updates as soon
    as an epoch's mini-batches are not a multiple of N (e.g. 10 per epoch,
    `accumulate=4`: points at mini-batches 4, 8, 12, 16, 20; updates at 4, 8,
    10, 14, 18, 20).

    This callback writes the `batch_*` scalars once per optimizer update,
    after the mini-batch that completed the window (or, for the window
    applied at epoch end, once that update is applied), with step =
    `optimizer.iterations`: the number of updates so far. The values are
    those of the last mini-batch's logs, i.e. Keras' running means over the
    epoch so far. Everything else (the `epoch_*` scalars, validation,
    histograms, the graph) is that of `keras.callbacks.TensorBoard` with
    `update_freq="epoch"`. It also works with a plain `keras.Model`, where
    every mini-batch is an update.

    Args:
        log_dir: The directory for the event files, as in
            `keras.callbacks.TensorBoard`. Defaults to `"logs"`.
        **kwargs: Other `keras.callbacks.TensorBoard` arguments, except
            `update_freq`.

    Raises:
        ValueError: if `update_freq` is passed.

    Example:

    >>> model.fit(x, y, callbacks=[UpdateTensorBoard("logs")])  # doctest: +SKIP
    """

    def __init__(self, log_dir="logs", **kwargs):
        if "update_freq" in kwargs:
            raise ValueError(
                "`UpdateTensorBoard` writes batch-level scalars once per "
                "optimizer update; it takes no `update_freq`. Use "
                "`keras.callbacks.TensorBoard` for another frequency. "
                f"Received: update_freq={kwargs['update_freq']!r}"
            )
        super().__init__(log_dir=log_dir, update_freq="epoch", **kwargs)
        self._written_iterations = 0
        self._batch_logs = None

    def _iterations(self):
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._written_iterations = self._iterations()
        self._batch_logs = None

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if isinstance(logs, dict):
            self._batch_logs = logs
        self._write_if_updated()

    def on_test_begin(self, logs=None):
        # `fit` validates before `on_epoch_end`; the epoch-end window is
        # applied when validation begins (`ApplyAccumulatedGradients` runs
        # first), so it is written here.
        self._write_if_updated()
        super().on_test_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._write_if_updated()
        super().on_epoch_end(epoch, logs)

    def _write_if_updated(self):
        if self.model is None or self._batch_logs is None:
            return
        iterations = self._iterations()
        if iterations <= self._written_iterations:
            return
        self._written_iterations = iterations
        with self._train_writer.as_default():
            for name, value in self._batch_logs.items():
                self.summary.scalar(f"batch_{name}", value, step=iterations)
