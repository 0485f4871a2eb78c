"""What a micro-batch adds to the window: weighted losses and normalisers.

Keras normalises each loss term per batch (`sum / normaliser`). The window's
gradient must be normalised by the window's total instead, so a micro-batch
contributes `normaliser * gradient(loss)` (the gradient of its unnormalised
sum) and its normaliser; the window divides the summed gradients by the
summed normalisers when it is applied. The normaliser multiplies the
gradient, not the loss, so a scaled loss under `mixed_float16` stays in the
float16 range, as in plain Keras training.
"""

import dataclasses

from keras import ops

from keras_accum import _keras_internals
from keras_accum.loss_normalisers import SUM

AUTO = "auto"
SHARED = "shared"
PER_LOSS = "per_loss"
LOSS_NORMALISATIONS = (AUTO, SHARED, PER_LOSS)


def loss_terms(loss_normalisation, compiled_losses):
    """Number of separately normalised loss terms (accumulator sets).

    `"shared"` keeps one. `"per_loss"` keeps one per compiled loss term, and
    so does `"auto"` (the default) when there are several: only then is a
    window exact for any mix of reductions, masks and sample weights.

    Args:
        loss_normalisation: The model's `loss_normalisation`.
        compiled_losses: The compiled loss terms, or `None` while the
            compiled loss is not built.

    Returns:
        An int >= 1, or `None` while the compiled loss is not built yet.
    """
    if loss_normalisation == SHARED:
        return 1
    if compiled_losses is None:
        return None
    return max(1, len(compiled_losses))


@dataclasses.dataclass
class MicroBatchContribution:
    """The losses whose gradients a micro-batch adds, one per term.

    Attributes:
        objectives: Scalar losses; the gradient of `objectives[t]`, times
            `gradient_scales[t]`, is added to the accumulators of term `t`.
        gradient_scales: Scalars, one per term.
        normalisers: Vector, each term's normaliser for this micro-batch
            (0 for terms that are summed, not averaged, over the window).
        divides: Static tuple of bools: whether term `t`'s window sum is
            divided by its summed normaliser.
        logging_weight: Weight of this micro-batch in the logged epoch loss.
        logged_terms: `None` to log the loss weighted by `logging_weight`,
            or `(values, normalisers, examples)` for
            `window_loss.WindowLoss.update_window`: several terms, whose
            window loss needs each term's own sums.
    """

    objectives: list
    gradient_scales: list
    normalisers: object
    divides: tuple
    logging_weight: object
    logged_terms: object = None


def _regularisation_loss(model, dtype):
    losses = _keras_internals.regularization_losses(model)
    if not losses:
        return None
    return sum(ops.cast(value, dtype) for value in losses)


def replica_scale(normaliser):
    """The factor of a replica's mean-loss gradient: its normaliser, with
    Keras' distribution scaling divided out exactly.

    Keras multiplies each replica's mean loss by `cast(1 / replicas)`
    (`scale_loss_for_distribution`), which is float32(1 / 3) = (1 + 3e-8) / 3
    on 3 replicas even in float64. Dividing out exactly the factor it
    applied, not multiplying by the replica count, makes the weighted
    replica gradients add up to the window's sum for any replica count.
    """
    applied = _keras_internals.scale_loss_for_distribution(
        ops.ones((), normaliser.dtype)
    )
    return ops.stop_gradient(normaliser) / applied


def _summed(model, loss, first_in_window):
    """A summed loss, with weight regularisation kept once per window."""
    regularisation = _regularisation_loss(model, loss.dtype)
    if regularisation is None:
        return loss
    later = 1.0 - ops.cast(first_in_window, loss.dtype)
    return loss - later * _keras_internals.scale_loss_for_distribution(
        regularisation
    )


def shared_contribution(model, terms, loss, batch_size, first_in_window):
    """One normaliser for the whole loss: that of its first averaged term.

    Exact for a single loss term and for several terms whose normalisers are
    proportional across micro-batches. Regularisation losses included in
    `loss` get the same weight, so after division by the window's normaliser
    they count once per update, as in one big batch.
    """
    dtype = loss.dtype
    one = ops.ones((), dtype)
    if model.reduction == "sum":
        return MicroBatchContribution(
            [loss], [one], ops.zeros((1,), dtype), (False,),
            ops.cast(batch_size, dtype),
        )
    normalisers = [t.normaliser for t in terms if t.normaliser is not None]
    if normalisers:
        normaliser = ops.cast(normalisers[0], dtype)
    elif terms and all(t.reduction == SUM for t in terms):
        return MicroBatchContribution(
            [_summed(model, loss, first_in_window)],
            [one],
            ops.zeros((1,), dtype),
            (False,),
            ops.cast(batch_size, dtype),
        )
    else:
        # No Keras loss reported a normaliser (e.g. a custom `compute_loss`
        # returning a mean): weight by examples.
        normaliser = ops.cast(batch_size, dtype)
    return MicroBatchContribution(
        [loss],
        [replica_scale(normaliser)],
        ops.reshape(normaliser, (1,)),
        (True,),
        normaliser,
    )


def with_summed_activity(model, contribution, penalties):
    """Moves a summed activity penalty (Keras < 3.14) into a term of its own.

    Those Keras versions add an activity penalty summed over the batch, so
    one big batch's gradient holds the plain sum of its micro-batches'
    penalty gradients, while the rest of the loss is divided by the window's
    normaliser. Weighting the penalty inside the divided term would need
    that normaliser before the window ends (and, under a strategy, summed
    over replicas), so the penalty gets an extra accumulator set instead:
    summed over the window (`divides=False`, normaliser 0), weighted 1 with
    Keras' 1/replicas scaling divided out, as `replica_scale` does for the
    averaged terms. That costs one more set of accumulators and a backward
    pass through the layers below the regularised ones, and only on those
    Keras versions, for models with an activity regulariser.

    Args:
        model: The model (its `_aggregate_additional_loss`).
        contribution: The micro-batch's `MicroBatchContribution`, whose
            first objective includes the penalties.
        penalties: The activity penalties recorded in the forward pass.

    Returns:
        A `MicroBatchContribution` with one more term, last.
    """
    objectives = list(contribution.objectives)
    dtype = objectives[0].dtype
    penalty = ops.zeros((), dtype)
    for value in penalties:
        penalty += ops.cast(
            _keras_internals.aggregate_additional_loss(model, value), dtype
        )
    objectives[0] -= penalty
    normalisers = contribution.normalisers
    return MicroBatchContribution(
        objectives + [penalty],
        list(contribution.gradient_scales)
        + [replica_scale(ops.ones((), dtype))],
        ops.concatenate(
            [normalisers, ops.zeros((1,), normalisers.dtype)], axis=0
        ),
        tuple(contribution.divides) + (False,),
        contribution.logging_weight,
    )


def per_loss_contribution(model, terms, loss, batch_size, first_in_window):
    """One normaliser per compiled loss term, each over the whole window.

    Exact for multi-output models whose outputs carry their own masks or
    sample weights. Losses outside the compiled ones (regularisation,
    `add_loss`) go with the first term.
    """
    flat_losses = _keras_internals.compiled_losses(model)
    if len(terms) != len(flat_losses):
        raise ValueError(
            "Exact accumulation of several loss terms normalises each "
            "compiled loss term by its own window-wide count, so it needs "
            "every Keras loss reduced in the step to come from "
            f"`compile(loss=...)`: {len(flat_losses)} compiled loss "
            f"term(s), {len(terms)} Keras loss reduction(s) in the step "
            "(a custom `compute_loss`?). Pass "
            '`loss_normalisation="shared"` to weight the whole loss by its '
            "first term's normaliser (exact only when the terms' normalisers "
            "are proportional). Received: "
            f"loss_normalisation={model.loss_normalisation!r}"
        )
    dtype = loss.dtype
    objectives, scales, normalisers, divides = [], [], [], []
    compiled_total = ops.zeros((), dtype)
    for term, flat in zip(terms, flat_losses):
        weight = 1.0 if flat.loss_weights is None else flat.loss_weights
        value = ops.cast(term.value, dtype) * ops.cast(weight, dtype)
        compiled_total += value
        objectives.append(value)
        if term.normaliser is None:
            scales.append(ops.ones((), dtype))
            normalisers.append(ops.zeros((), dtype))
            divides.append(False)
        else:
            normaliser = ops.cast(term.normaliser, dtype)
            scales.append(replica_scale(normaliser))
            normalisers.append(normaliser)
            divides.append(True)
    rest = loss - compiled_total
    logged_terms = _logged_terms(model, objectives, divides, rest,
                                 normalisers, batch_size)
    if divides[0]:
        objectives[0] += rest
    else:
        objectives[0] += _summed(model, rest, first_in_window)
    logging_weight = normalisers[0] if divides[0] else ops.cast(batch_size, dtype)
    return MicroBatchContribution(
        objectives, scales, ops.stack(normalisers), tuple(divides),
        logging_weight,
        logged_terms=logged_terms,
    )


def _logged_terms(model, values, divides, rest, normalisers, batch_size):
    """Each term's loss and normaliser, for the exact logged window loss.

    The big batch's loss is each term's window sum over its window
    normaliser, plus the rest (regularisation, `add_loss`), which Keras adds
    per batch: weight regularisation is the same for every micro-batch of a
    window and activity regularisation is a mean over examples, so the rest
    is averaged over the window's examples. `reduction="sum"` has no big
    batch to match and keeps the shared logging.

    Keras divides averaged terms and the rest by the replica count under a
    strategy, not summed terms: only the former are unscaled, so that the
    replicas' sums add up to the global batch's.
    """
    if model.reduction == "sum":
        return None
    unscale = _keras_internals.unscale_loss_for_distribution
    values = [
        unscale(value) if divided else value
        for value, divided in zip(values, divides)
    ]
    examples = ops.cast(batch_size, rest.dtype)
    return (
        ops.stack(values + [unscale(rest)]),
        ops.stack(normalisers + [examples]),
        examples,
    )
