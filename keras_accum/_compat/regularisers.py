"""Activity regularisers: how `Layer.__call__` applies them.

Serves `loss_normalisers` (recording each activity penalty, and whether it
is a sum or a mean over the batch) and `AccumulatingModel` (finding the
regularised layers). Checked on Keras 3.10.0 to 3.15.1; the penalty is a
sum over the batch up to 3.13 and a mean from 3.14.
"""

import contextlib

from keras_accum._compat import versions

#: From Keras 3.14, `Layer.__call__` divides an activity-regulariser loss by
#: the batch size (a mean over examples); before, it is a sum over the
#: batch. Checked on Keras 3.10.0, 3.13.x (sum) and 3.14, 3.15.1 (mean).
ACTIVITY_REGULARISATION_IS_BATCH_MEAN = versions.KERAS_VERSION >= (3, 14)


def activity_regularised_layers(model):
    """Layers of `model` (itself included) with an activity regulariser.

    Uses `Layer._flatten_layers`, checked on Keras 3.10.0 to 3.15.1.
    """
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        raise versions.missing("keras.Layer._flatten_layers")
    return [
        layer
        for layer in flatten(include_self=True)
        if getattr(layer, "activity_regularizer", None) is not None
    ]


class _RecordingRegulariser:
    """Calls an activity regulariser, telling `on_penalty` of each output
    it regularises first."""

    def __init__(self, layer, regulariser, on_penalty):
        self.layer = layer
        self.regulariser = regulariser
        self.on_penalty = on_penalty

    def __call__(self, output):
        self.on_penalty(self.layer, output)
        return self.regulariser(output)


@contextlib.contextmanager
def record_activity_regularisation(model, on_penalty):
    """Calls `on_penalty(layer, output)` before each activity penalty of
    the forward passes in the block.

    `Layer.__call__` looks up `self.activity_regularizer` after `call`,
    calls it on each output and passes the result to `add_loss` at once
    (Keras 3.10.0 to 3.13.2; from 3.14 divided by the batch size first).
    Each regularised layer's attribute is replaced by a wrapper for the
    block and restored after it, so that the `add_loss` call that follows
    is known to be the penalty.

    Args:
        model: The model whose layers to record, or `None` for none.
        on_penalty: Called with the layer and the regularised output.
    """
    layers = [] if model is None else activity_regularised_layers(model)
    originals = [layer.activity_regularizer for layer in layers]
    try:
        for layer, regulariser in zip(layers, originals):
            layer.activity_regularizer = _RecordingRegulariser(
                layer, regulariser, on_penalty
            )
        yield
    finally:
        for layer, regulariser in zip(layers, originals):
            layer.activity_regularizer = regulariser
