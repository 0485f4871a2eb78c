"""Records the normaliser of every Keras loss term computed in a step.

A Keras `Loss` divides its weighted sum by a normaliser that depends on the
batch: the number of loss elements (`"sum_over_batch_size"`), the number of
*valid* elements when the predictions carry a mask, or the sum of the sample
weights (`"mean_with_sample_weight"`). Exact accumulation must weight every
micro-batch by that normaliser, so `record_loss_normalisers()` observes each
reduction that runs while it is active.

All Keras losses reduce through `keras.src.losses.loss.reduce_weighted_values`
(called from `Loss.__call__`), so that is the one place observed. The hook is
installed once, delegates to the original unchanged, and records only inside
`record_loss_normalisers()` on the same thread: MirroredStrategy runs each
replica's step on its own thread, and each replica records its own terms.
"""

import contextlib
import dataclasses
import threading

from keras import ops

from keras_accum import _keras_internals

SUM = "sum"

_state = threading.local()


@dataclasses.dataclass
class LossTerm:
    """One loss reduction observed during a step.

    Attributes:
        reduction: The Keras reduction name, e.g. `"sum_over_batch_size"`.
        normaliser: Scalar tensor the summed loss was divided by, or `None`
            for `"sum"` (no division) and for losses that were already
            scalar before reduction (their normaliser is unknown).
        value: The reduced loss, as the `Loss` returned it.
    """

    reduction: str
    normaliser: object
    value: object


def _elements(values, sample_weight):
    """Number of elements the reduced loss values have, after broadcasting."""
    if sample_weight is None:
        return ops.cast(ops.size(values), values.dtype)
    values, sample_weight = _keras_internals.squeeze_or_expand_to_same_rank(
        values, sample_weight
    )
    # The size of the broadcast product: shapes may be dynamic (TensorFlow).
    broadcast = ops.multiply(values, ops.cast(sample_weight, values.dtype))
    return ops.cast(ops.size(broadcast), values.dtype)


def _normaliser(values, sample_weight, mask, reduction, dtype):
    """Mirrors the divisor of `keras.src.losses.loss.reduce_values`."""
    values = ops.convert_to_tensor(values, dtype=dtype)
    if tuple(values.shape) in ((), (0,)):
        return None
    if reduction == SUM:
        return None
    if sample_weight is not None:
        sample_weight = ops.cast(
            ops.convert_to_tensor(sample_weight, dtype=dtype), values.dtype
        )
    if reduction == "mean_with_sample_weight":
        if mask is not None:
            mask = ops.cast(ops.convert_to_tensor(mask), values.dtype)
        weights = _keras_internals.apply_mask(
            sample_weight, mask, dtype=values.dtype, reduction=reduction
        )
        if weights is None:
            return ops.cast(ops.size(values), values.dtype)
        return ops.sum(weights)
    # "sum_over_batch_size" / "mean": the mask is folded into the weights as
    # `total / valid`, so the divisor becomes elements * valid / total.
    elements = _elements(values, sample_weight)
    if mask is None:
        return elements
    mask = ops.cast(ops.convert_to_tensor(mask), values.dtype)
    valid = ops.sum(mask)
    total = ops.cast(ops.size(mask), values.dtype)
    # Usually the loss has one element per mask entry: the divisor is then
    # the valid count itself (as the installed Keras counts it), with no
    # round-off. A batch with no element at all (a replica's empty shard of
    # a ragged last batch) has 0 / 0 here; Keras' loss is 0 there
    # (`divide_no_nan`), and so is its normaliser.
    valid = _keras_internals.masked_valid_count(valid)
    return ops.where(
        ops.equal(elements, total),
        valid,
        ops.divide_no_nan(elements * valid, total),
    )


def _recording_reduce_weighted_values(
    values,
    sample_weight=None,
    mask=None,
    reduction="sum_over_batch_size",
    dtype=None,
):
    loss = _original_reduce_weighted_values(
        values,
        sample_weight=sample_weight,
        mask=mask,
        reduction=reduction,
        dtype=dtype,
    )
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        reduction = _keras_internals.standardize_reduction(reduction)
        if reduction not in (None, "none"):
            normaliser = _normaliser(
                values, sample_weight, mask, reduction, dtype
            )
            recorder.append(LossTerm(reduction, normaliser, loss))
    return loss


def _install():
    global _original_reduce_weighted_values
    current = _keras_internals.reduce_weighted_values()
    if getattr(current, "_keras_accum_hook", False):
        _original_reduce_weighted_values = current._keras_accum_original
        return
    _original_reduce_weighted_values = current
    _recording_reduce_weighted_values._keras_accum_hook = True
    _recording_reduce_weighted_values._keras_accum_original = current
    _keras_internals.set_reduce_weighted_values(
        _recording_reduce_weighted_values
    )


_original_reduce_weighted_values = None
_install()


@contextlib.contextmanager
def record_loss_normalisers():
    """Collects a `LossTerm` for each Keras loss reduced inside the block.

    Example:

    >>> import keras
    >>> with record_loss_normalisers() as terms:
    ...     _ = keras.losses.MeanSquaredError()([[1.0], [2.0]], [[0.0], [0.0]])
    >>> [t.reduction for t in terms]
    ['sum_over_batch_size']
    """
    previous = getattr(_state, "recorder", None)
    terms = []
    _state.recorder = terms
    try:
        yield terms
    finally:
        _state.recorder = previous
