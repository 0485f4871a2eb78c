"""The callback that applies the accumulated gradient at epoch end."""

import keras


class ApplyAccumulatedGradients(keras.callbacks.Callback):
    """Applies an `AccumulatingModel`'s accumulated gradient once per epoch.

    `AccumulatingModel.fit` puts this callback first in its callback list by
    itself; add it by hand only to a `CallbackList` you drive yourself.

    Keras' `fit` runs validation (`on_test_begin`) before
    `callbacks.on_epoch_end`, so the update is applied at whichever comes
    first: validation then sees the updated weights, and so does every later
    callback's `on_epoch_end`. With `accumulate=N`, the mini-batches left over
    at epoch end (the last, indivisible window) are applied here too, so no
    gradient crosses an epoch boundary. At `on_train_begin` the accumulators
    are zeroed: gradients left by an interrupted `fit` are discarded.

    Example:

    >>> callbacks = keras.callbacks.CallbackList(
    ...     [ApplyAccumulatedGradients()], model=model)  # doctest: +SKIP
    >>> callbacks.on_epoch_end(0)  # doctest: +SKIP
    """

    def __init__(self):
        super().__init__()
        self._epoch_pending = False

    def set_model(self, model):
        from keras_accum.accumulating_model import AccumulatingModel

        if not isinstance(model, AccumulatingModel):
            raise TypeError(
                "`ApplyAccumulatedGradients` works with an "
                "`keras_accum.AccumulatingModel`. Received: model of type "
                f"{type(model).__name__}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._epoch_pending = False
        if self.model._accumulator.built:
            self.model.reset_accumulated_gradients()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_pending = True

    def on_test_begin(self, logs=None):
        # Validation inside `fit` runs before `on_epoch_end`.
        self._apply_pending()

    def on_epoch_end(self, epoch, logs=None):
        self._apply_pending()

    def _apply_pending(self):
        if not self._epoch_pending:
            return
        self._epoch_pending = False
        if self.model._accumulator.built:
            self.model.apply_accumulated_gradients()
