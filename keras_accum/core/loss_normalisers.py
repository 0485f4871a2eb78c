"""Records what a step's loss is made of: Keras loss terms and added losses.

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

`Layer.add_loss` is observed the same way, so that every loss a forward pass
adds is known: an activity regulariser's penalty (whose normalisation the
installed Keras defines) or anything else (whose normaliser is unknown).
"""

import contextlib
import dataclasses
import sys
import threading

import keras
from keras import ops

from keras_accum._compat import losses as compat_losses
from keras_accum._compat import regularisers as compat_regularisers

SUM = "sum"

_state = threading.local()


NONE = "none"


@dataclasses.dataclass
class LossTerm:
    """One loss reduction observed during a step.

    Attributes:
        reduction: The Keras reduction name, e.g. `"sum_over_batch_size"`,
            or `"none"` for a loss that was not reduced.
        normaliser: Scalar tensor the summed loss was divided by, or `None`
            for `"sum"` (no division), `"none"`, and for losses that were
            already scalar before reduction.
        value: The reduced loss, as the `Loss` returned it.
        scalar_input: Whether the values reduced were a scalar already:
            Keras returns them unchanged, so such a reduction adds nothing
            of its own (its normaliser is that of whatever made the scalar).
        name: The name of the function that called the reduction (the
            loss's `__call__`), for error messages.
    """

    reduction: str
    normaliser: object
    value: object
    scalar_input: bool = False
    name: str = ""

    @property
    def known(self):
        """Whether the term is reduced over elements Keras counted: its
        normaliser (or its being summed) is known."""
        return not self.scalar_input and self.reduction != NONE


@dataclasses.dataclass
class ActivityPenalty:
    """An activity regulariser's loss, as the layer passed it to `add_loss`.

    Attributes:
        value: The added loss.
        examples: The examples Keras divided the penalty by (Keras >= 3.14),
            or `None` where it is summed over the batch.
    """

    value: object
    examples: object


@dataclasses.dataclass
class StepLosses:
    """What `record_loss_normalisers()` observed.

    Attributes:
        terms: A `LossTerm` per Keras loss reduction, in call order.
        penalties: An `ActivityPenalty` per activity regulariser output.
        added: The other losses passed to `add_loss` (their normaliser is
            unknown), as `(layer name, value)`.
    """

    terms: list = dataclasses.field(default_factory=list)
    penalties: list = dataclasses.field(default_factory=list)
    added: list = dataclasses.field(default_factory=list)
    # Set by an activity regulariser that is about to add its penalty:
    # `(layer, examples)`.
    pending_penalty: object = None
    # For `loss_attribution`: a function `(index, term) -> value` returned
    # instead of each known term's value.
    substitute: object = None
    # Called with each term's value: a tape that must differentiate the
    # loss with respect to the terms watches them (TensorFlow).
    watch: object = None
    # `id`s of the `model.losses` entries that went through Keras'
    # `_aggregate_additional_loss` (scaled for distribution on TensorFlow).
    aggregated: set = dataclasses.field(default_factory=set)

    def __iter__(self):
        return iter(self.terms)

    @property
    def known_terms(self):
        """The terms whose normaliser is known (`LossTerm.known`)."""
        return [term for term in self.terms if term.known]


def _elements(values, sample_weight):
    """Number of elements the reduced loss values have, after broadcasting."""
    if sample_weight is None:
        return ops.cast(ops.size(values), values.dtype)
    values, sample_weight = compat_losses.squeeze_or_expand_to_same_rank(
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
        weights = compat_losses.apply_mask(
            # A copy: `apply_mask` folds the mask in with `*=`, which on
            # torch multiplies the caller's tensor in place, after Keras'
            # own loss saved it for the backward pass. (Keras masked the
            # caller's weights in place already; a 0/1 mask again changes
            # nothing, so the sum is the same.)
            None if sample_weight is None else ops.copy(sample_weight),
            mask, dtype=values.dtype, reduction=reduction,
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
    valid = compat_losses.masked_valid_count(valid)
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
    if recorder is None:
        return loss
    reduction = compat_losses.standardize_reduction(reduction)
    name = _caller_name()
    if reduction in (None, NONE):
        recorder.terms.append(LossTerm(NONE, None, loss, name=name))
        return loss
    scalar_input = tuple(ops.convert_to_tensor(values).shape) in ((), (0,))
    normaliser = _normaliser(values, sample_weight, mask, reduction, dtype)
    term = LossTerm(reduction, normaliser, loss, scalar_input, name)
    recorder.terms.append(term)
    if recorder.watch is not None:
        recorder.watch(loss)
    if recorder.substitute is not None and term.known:
        return recorder.substitute(len(recorder.known_terms) - 1, term)
    return loss


def _caller_name():
    """The name of the `Loss` reducing (for messages), found on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and hasattr(owner, "reduction"):
            return getattr(owner, "name", None) or type(owner).__name__
        frame = frame.f_back
    return "a loss"


def _recording_add_loss(layer, loss):
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        pending = recorder.pending_penalty
        if pending is not None and pending[0] is layer:
            recorder.penalties.append(ActivityPenalty(loss, pending[1]))
            recorder.pending_penalty = None
        else:
            recorder.added.append((layer.name, loss))
    return _original_add_loss(layer, loss)


def note_aggregated(loss):
    """Notes that `loss`, a `model.losses` entry, is being added to the
    step's loss by Keras' `_aggregate_additional_loss`."""
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        recorder.aggregated.add(id(loss))


def expect_activity_penalty(layer, output):
    """Notes that `layer`'s next `add_loss` is its activity penalty on
    `output` (called by the regulariser wrapper of
    `compat_regularisers.record_activity_regularisation`)."""
    recorder = getattr(_state, "recorder", None)
    if recorder is None:
        return
    examples = None
    if (
        compat_regularisers.ACTIVITY_REGULARISATION_IS_BATCH_MEAN
        and len(output.shape) > 0
    ):
        examples = ops.shape(output)[0]
    recorder.pending_penalty = (layer, examples)


def _hooked(current, hook):
    """`(original, installed)`: the function `hook` wraps, and whether
    `current` is a hook installed already (a module reloaded in the same
    process keeps the first one)."""
    if getattr(current, "_keras_accum_hook", False):
        return current._keras_accum_original, True
    hook._keras_accum_hook = True
    hook._keras_accum_original = current
    hook.__doc__ = current.__doc__
    return current, False


def _install():
    global _original_add_loss, _original_reduce_weighted_values
    _original_add_loss, installed = _hooked(
        keras.layers.Layer.add_loss, _recording_add_loss
    )
    if not installed:
        keras.layers.Layer.add_loss = _recording_add_loss
    _original_reduce_weighted_values, installed = _hooked(
        compat_losses.reduce_weighted_values(),
        _recording_reduce_weighted_values,
    )
    if not installed:
        compat_losses.set_reduce_weighted_values(
            _recording_reduce_weighted_values
        )


_original_reduce_weighted_values = None
_original_add_loss = None
_install()


@contextlib.contextmanager
def record_loss_normalisers(model=None, substitute=None):
    """Collects a `LossTerm` for each Keras loss reduced inside the block,
    and the losses layers add (a `StepLosses`).

    Args:
        model: `None`, or the model whose activity regularisers' penalties
            to tell from other added losses (wrap its forward pass too).
        substitute: `None`, or a function `(index, term) -> value` whose
            result a known term's reduction returns instead of its value
            (see `loss_attribution`).

    Example:

    >>> import keras
    >>> with record_loss_normalisers() as terms:
    ...     _ = keras.losses.MeanSquaredError()([[1.0], [2.0]], [[0.0], [0.0]])
    >>> [t.reduction for t in terms]
    ['sum_over_batch_size']
    """
    previous = getattr(_state, "recorder", None)
    recorded = StepLosses(substitute=substitute)
    _state.recorder = recorded
    try:
        with compat_regularisers.record_activity_regularisation(
            model, expect_activity_penalty
        ):
            yield recorded
    finally:
        _state.recorder = previous
