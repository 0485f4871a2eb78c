"""Clipping the window's gradient as a whole under several replicas, as
one device clips the big batch's (Keras' `apply` clips each replica's
share), and measuring it whole for the noise scale."""

import tensorflow as tf

# What `apply` reads before clipping: the clipping arguments, then the
# factor it divides the gradients by first.
_CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue", "loss_scale_factor")


def clips(optimizer):
    """Whether `optimizer.apply` clips (as `_clip_gradients` decides)."""
    return any(
        value is not None and value > 0
        for value in (getattr(optimizer, name, None) for name in _CLIPPING[:3])
    )


def _set_clipping(optimizer, values):
    for name, value in zip(_CLIPPING, values):
        setattr(optimizer, name, value)


def apply_reduced_window(optimizer, context, gradients, variables,
                         observe=None):
    """Applies the window's gradient, all-reduced first (replica context),
    and clipped as a whole where the optimizer clips.

    Keras' `apply` clips before its `SUM` all-reduce, i.e. each replica's
    share. Here the shares are all-reduced first and the window's gradient
    is clipped by the optimizer's own `_clip_gradients` (after dividing by
    its `loss_scale_factor`, as `apply` does), on every replica alike. The
    optimizer then gets the clipped gradient on the first replica and zeros
    on the others, with its clipping and `loss_scale_factor` turned off for
    the call, so its all-reduce gives back the clipped gradient exactly for
    any replica count. One more all-reduce per update, only when clipping or measuring
    the noise scale.

    `MirroredStrategy` runs the replicas' functions in turns, switching at
    each all-reduce, on one shared optimizer: the arguments are read before
    the first all-reduce and set again before each read. The step is traced
    once, so this happens at trace time only.

    Args:
        optimizer: The (inner) optimizer.
        context: The replica context.
        gradients: This replica's share of the window's gradient.
        variables: The variables they belong to.
        observe: `None`, or a callable given the window's whole gradient
            (before clipping), on every replica alike: the noise scale's
            squared norm.
    """
    arguments = [getattr(optimizer, name) for name in _CLIPPING]
    reduced = iter(
        context.all_reduce(
            tf.distribute.ReduceOp.SUM, [g for g in gradients if g is not None]
        )
    )
    totals = [None if g is None else next(reduced) for g in gradients]
    if observe is not None:
        observe(totals)
    try:
        _set_clipping(optimizer, arguments)
        scale = optimizer.loss_scale_factor
        if scale is not None:
            totals = [g if g is None else g / scale for g in totals]
        clipped = iter(
            optimizer._clip_gradients([g for g in totals if g is not None])
        )
        first = tf.equal(context.replica_id_in_sync_group, 0)
        shares = [
            None if g is None
            else tf.where(first, next(clipped), tf.zeros_like(g))
            for g in totals
        ]
        _set_clipping(optimizer, [None] * len(_CLIPPING))
        optimizer.apply(shares, variables)
    finally:
        _set_clipping(optimizer, arguments)
