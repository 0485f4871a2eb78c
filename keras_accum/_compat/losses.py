"""`keras.src.losses.loss`: the reduction every Keras loss goes through.

Serves `loss_normalisers` (the reduction hook that records each loss term's
normaliser, masks, reductions) and the distribution scaling of `objectives`
and the backends' loss attribution. Checked on Keras 3.10.0 to 3.15.1; the
masked-loss divisor differs before and from 3.13 (`masked_valid_count`).
"""

import keras

from keras_accum._compat import versions

try:
    from keras.src.losses import loss as _loss_module
except ImportError as error:  # pragma: no cover - only on a foreign Keras
    raise versions.missing(f"keras.src ({error.name})") from None

#: The module whose `reduce_weighted_values` `loss_normalisers` hooks.
#: Checked on Keras 3.10.0 to 3.15.1: `Loss.__call__` calls the module-level
#: `reduce_weighted_values(values, sample_weight, mask, reduction, dtype)`
#: through the module global, so replacing the attribute is seen by every
#: loss.
loss_module = _loss_module
versions.require(_loss_module, "reduce_weighted_values",
                 "keras.src.losses.loss.reduce_weighted_values")
versions.require_parameters(
    _loss_module.reduce_weighted_values,
    ("values", "sample_weight", "mask", "reduction", "dtype"),
    "keras.src.losses.loss.reduce_weighted_values",
)

#: `apply_mask(sample_weight, mask, dtype, reduction)`: folds a prediction
#: mask into the sample weights. Checked on Keras 3.10.0 to 3.15.1 (its
#: divisor changed in 3.13, see `masked_valid_count`).
apply_mask = versions.require(
    _loss_module, "apply_mask", "keras.src.losses.loss.apply_mask"
)
squeeze_or_expand_to_same_rank = versions.require(
    _loss_module, "squeeze_or_expand_to_same_rank",
    "keras.src.losses.loss.squeeze_or_expand_to_same_rank",
)
standardize_reduction = versions.require(
    _loss_module, "standardize_reduction",
    "keras.src.losses.loss.standardize_reduction",
)
_scale_loss = versions.require(
    _loss_module, "scale_loss_for_distribution",
    "keras.src.losses.loss.scale_loss_for_distribution (Keras >= 3.8)",
)
_unscale_loss = versions.require(
    _loss_module, "unscale_loss_for_distribution",
    "keras.src.losses.loss.unscale_loss_for_distribution (Keras >= 3.8)",
)


def reduce_weighted_values():
    """The current `keras.src.losses.loss.reduce_weighted_values`.

    Checked on Keras 3.10.0 to 3.15.1. Returns the module attribute as it is
    now (possibly keras_accum's own recording hook).
    """
    return _loss_module.reduce_weighted_values


def set_reduce_weighted_values(function):
    """Replaces `keras.src.losses.loss.reduce_weighted_values`.

    Checked on Keras 3.10.0 to 3.15.1: `Loss.__call__` looks the function up
    in the module at each call, so the replacement sees every reduction.
    """
    _loss_module.reduce_weighted_values = function


def scale_loss_for_distribution(value):
    """Divides `value` by the replica count, as Keras does for a loss.

    `keras.src.losses.loss.scale_loss_for_distribution`, from Keras 3.8;
    checked on Keras 3.10.0 to 3.15.1.
    """
    return _scale_loss(value)


def unscale_loss_for_distribution(value):
    """Undoes `scale_loss_for_distribution` (for logging the loss).

    `keras.src.losses.loss.unscale_loss_for_distribution`, from Keras 3.8;
    checked on Keras 3.10.0 to 3.15.1.
    """
    return _unscale_loss(value)


#: Keras < 3.13 divides a masked `"sum_over_batch_size"` loss by
#: `valid + backend.epsilon()` (`apply_mask` weights valid entries
#: `total / (valid + 1e-7)`); 3.13 onward by `valid` exactly
#: (`divide_no_nan`). Checked on Keras 3.10.0, 3.12.x and 3.13 to 3.15.1.
MASK_DIVISOR_HAS_EPSILON = versions.KERAS_VERSION < (3, 13)


def masked_valid_count(valid):
    """The count of valid entries Keras divides a masked mean loss by.

    Args:
        valid: Scalar tensor, the number of unmasked loss entries.

    Returns:
        `valid`, plus `keras.backend.epsilon()` on Keras < 3.13, which
        divides by `valid + epsilon` there.
    """
    if MASK_DIVISOR_HAS_EPSILON:
        return valid + keras.backend.epsilon()
    return valid
