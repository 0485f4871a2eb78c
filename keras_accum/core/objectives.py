"""The normalisation rule: how each part of a step's loss enters the window.

Keras normalises each loss term per batch (`sum / normaliser`). The window's
gradient must be normalised by the window's total instead, so a micro-batch
contributes `normaliser * gradient(term)` (the gradient of its unnormalised
sum) and its normaliser; the window divides the summed gradients by the
summed normalisers when it is applied. The normaliser multiplies the
gradient, not the loss, so a scaled loss under `mixed_float16` stays in the
float16 range, as in plain Keras training.

The rule, applied here and nowhere else (`docs/semantics.md`, "The
normalisation rule"): a step's loss is split into parts whose normalisers
Keras tells the library, each accumulated in its own way:

- a Keras loss term (every `keras.losses.Loss` reduction, compiled or called
  in a custom `compute_loss`): its reduction's normaliser, over the window;
- weight regularisation: the same for every micro-batch of a window, so
  once per window;
- an activity regulariser's penalty: as the installed Keras normalises it
  (a sum over the batch before 3.14, a mean over examples from 3.14).

Anything else is refused with an error before the first update: a loss
that is not reduced to a scalar, a loss passed to `add_loss` that is not an
activity penalty, and (decided in `loss_attribution`) a loss that is not a
fixed linear combination of those parts.
"""

import dataclasses

from keras import ops

from keras_accum._compat import losses as compat_losses
from keras_accum._compat import trainer as compat_trainer
from keras_accum.core.loss_normalisers import NONE
from keras_accum.core.loss_normalisers import SUM

AUTO = "auto"
SHARED = "shared"
PER_LOSS = "per_loss"
LOSS_NORMALISATIONS = (AUTO, SHARED, PER_LOSS)


def term_sets(loss_normalisation, reduction, terms):
    """Number of accumulator sets for the loss terms.

    `"shared"` keeps one. `"per_loss"` keeps one per Keras loss term, and so
    does `"auto"` (the default) when there are several: only then is a
    window exact for any mix of reductions, masks and sample weights. With
    `reduction="sum"` the whole loss is summed over the window: one set.

    Args:
        loss_normalisation: The model's `loss_normalisation`.
        reduction: The model's `reduction`.
        terms: The number of Keras loss terms in the step, or `None` while
            it is not known (the compiled loss is not built, or a custom
            `compute_loss` not traced yet).

    Returns:
        An int >= 1, or `None` while `terms` is not known.
    """
    if loss_normalisation == SHARED or reduction == SUM:
        return 1
    if terms is None:
        return None
    return max(1, terms)


@dataclasses.dataclass
class Coefficients:
    """How the step's loss combines its parts (see `loss_attribution`).

    Attributes:
        terms: One scalar per known Keras loss term: its factor in the loss.
        regularisation: One scalar per weight-regularisation loss of
            `regularization_losses(model)`: its factor in the loss (Keras'
            `compute_loss` adds each scaled for distribution).
        regularisation_scales: One scalar per weight-regularisation loss:
            1, or Keras' scaling for distribution where the loss holds it
            unscaled (see `loss_attribution.Probe`).
        penalty_scale: The same for the activity penalties.
    """

    terms: list
    regularisation: list
    regularisation_scales: list
    penalty_scale: object = 1.0


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


def replica_scale(normaliser):
    """The factor of a replica's mean-loss gradient: its normaliser, with
    Keras' distribution scaling divided out exactly.

    Keras multiplies each replica's mean loss by `cast(1 / replicas)`
    (`scale_loss_for_distribution`), which is float32(1 / 3) = (1 + 3e-8) / 3
    on 3 replicas even in float64. Dividing out exactly the factor it
    applied, not multiplying by the replica count, makes the weighted
    replica gradients add up to the window's sum for any replica count.
    """
    applied = compat_losses.scale_loss_for_distribution(
        ops.ones((), normaliser.dtype)
    )
    return ops.stop_gradient(normaliser) / applied


def check_step_losses(model, recorded, loss):
    """Refuses a step whose loss the rule cannot normalise.

    Called while the step is traced, so the error comes from `fit` before
    any update.

    Raises:
        ValueError: for a Keras loss that is not reduced to a scalar, a
            step loss that is not a scalar, or (with `reduction="mean"`) a
            loss passed to `add_loss` that is not an activity penalty.
    """
    for term in recorded.terms:
        if term.reduction == NONE:
            raise ValueError(
                f"The loss `{term.name}` is not reduced to a scalar "
                "(`reduction=None`): a step's loss must be a scalar, and "
                "keras_accum normalises each Keras loss by its reduction. "
                'Use reduction="sum_over_batch_size" (Keras\' default), '
                '"sum" or "mean_with_sample_weight". Received: '
                f"reduction=None for `{term.name}`"
            )
    shape = tuple(loss.shape)
    if shape not in ((), (1,)):
        raise ValueError(
            "The step's loss must be a scalar, as Keras needs to compute "
            "its gradient. Received: a loss of shape "
            f"{shape} from `compute_loss`"
        )
    if model.reduction == SUM or not recorded.added:
        return
    names = sorted({name for name, _ in recorded.added})
    raise ValueError(
        "With `reduction=\"mean\"` keras_accum normalises every loss of the "
        "step over the whole window, and a loss passed to `add_loss()` "
        "has no normaliser Keras knows (it may be a mean over the batch, a "
        "sum, or a constant). Use a weight regulariser "
        "(`kernel_regularizer=...`) for a penalty on weights, "
        "`activity_regularizer=...` for a penalty on outputs, or compute a "
        "data-dependent loss with a Keras loss (`keras.losses.Loss`) in "
        "`compute_loss()`; or pass `reduction=\"sum\"` to sum the "
        "mini-batches' gradients. Received: `add_loss()` called by "
        f"layer(s) {', '.join(f'`{n}`' for n in names)}"
    )


def micro_batch_contribution(model, recorded, loss, batch_size,
                             first_in_window, coefficients, sets,
                             activity_set):
    """What a micro-batch adds to the window, by the rule.

    Args:
        model: The model (`reduction`, regularisation losses).
        recorded: The step's `loss_normalisers.StepLosses`.
        loss: The step's loss, as `compute_loss` returned it.
        batch_size: The micro-batch's examples (this replica's).
        first_in_window: Scalar bool, whether it starts a window.
        coefficients: `Coefficients` of the loss's parts.
        sets: Number of accumulator sets for the Keras loss terms.
        activity_set: Whether one more set holds the activity penalties.

    Returns:
        A `MicroBatchContribution` with `sets + activity_set` terms.
    """
    dtype = loss.dtype
    loss = ops.reshape(loss, ())
    examples = ops.cast(batch_size, dtype)
    if model.reduction == SUM:
        return MicroBatchContribution(
            [loss], [ops.ones((), dtype)], ops.zeros((1,), dtype), (False,),
            examples,
        )
    terms = recorded.known_terms
    weighted = [
        ops.stop_gradient(ops.cast(c, dtype)) * ops.cast(t.value, dtype)
        for c, t in zip(coefficients.terms, terms)
    ]
    in_loss, regularisation = _weight_regularisation(
        model, coefficients, dtype
    )
    # What is neither a Keras loss term nor weight regularisation: the
    # activity penalties (anything else was refused).
    terms_total = sum(weighted, ops.zeros((), dtype))
    penalties = loss - terms_total - in_loss
    if sets == 1:
        parts = [_shared_part(
            terms, terms_total, first_in_window, regularisation
        )]
    else:
        parts = [
            _term_part(term, value) for term, value in zip(terms, weighted)
        ]
        parts[0] = _with_regularisation(
            parts[0], regularisation, first_in_window
        )
    if activity_set:
        parts.append(_activity_part(
            recorded.penalties,
            penalties * ops.cast(coefficients.penalty_scale, dtype), dtype,
        ))
    objectives, scales, normalisers, divides = (list(p) for p in zip(*parts))
    normalisers = ops.stack([ops.cast(n, dtype) for n in normalisers])
    logging_weight = normalisers[0] if divides[0] else examples
    logged_terms = None
    if len(parts) > 1:
        unscale = compat_losses.unscale_loss_for_distribution
        values = [
            unscale(value) if divided else value
            for value, divided in zip(weighted, divides)
        ]
        if activity_set:
            # Added through `_aggregate_additional_loss`, scaled for
            # distribution whether it is summed or a mean.
            values.append(unscale(penalties))
        logged_terms = (
            ops.stack(values + [unscale(regularisation)]),
            ops.concatenate([normalisers, ops.reshape(examples, (1,))]),
            examples,
        )
    return MicroBatchContribution(
        objectives, scales, normalisers, tuple(divides), logging_weight,
        logged_terms=logged_terms,
    )


def _weight_regularisation(model, coefficients, dtype):
    """The weight-regularisation part of the loss: as the loss holds it,
    and as its objective (scaled for distribution as Keras scales it)."""
    # Two tensors, and `x = x + y`, not `+=`: a torch tensor adds in place.
    in_loss, objective = ops.zeros((), dtype), ops.zeros((), dtype)
    for value, factor, scale in zip(
        compat_trainer.regularization_losses(model),
        coefficients.regularisation,
        coefficients.regularisation_scales,
    ):
        part = ops.stop_gradient(ops.cast(factor, dtype)) * ops.cast(
            ops.sum(value), dtype
        )
        in_loss = in_loss + part
        objective = objective + part * ops.cast(scale, dtype)
    return in_loss, objective


def _term_part(term, value):
    """`(objective, scale, normaliser, divides)` of one Keras loss term."""
    dtype = value.dtype
    if term.reduction == SUM:
        return value, ops.ones((), dtype), ops.zeros((), dtype), False
    normaliser = ops.cast(term.normaliser, dtype)
    return value, replica_scale(normaliser), normaliser, True


def _with_regularisation(part, regularisation, first_in_window):
    """Adds weight regularisation to a term's part, once per window: a
    divided term weights it by the micro-batch's share of the window's
    normaliser (the weights do not change inside a window), a summed term
    keeps it on the window's first micro-batch only."""
    objective, scale, normaliser, divides = part
    if not divides:
        later = 1.0 - ops.cast(first_in_window, regularisation.dtype)
        regularisation = regularisation - later * regularisation
    return objective + regularisation, scale, normaliser, divides


def _shared_part(terms, terms_total, first_in_window, regularisation):
    """One set for all the Keras loss terms (`terms_total`, their weighted
    sum) and weight regularisation, normalised by the first averaged term's
    normaliser: exact for one term, and for several whose normalisers are
    proportional (`"shared"`). With only summed terms, or none, the set is
    summed over the window."""
    dtype = terms_total.dtype
    averaged = [t for t in terms if t.reduction != SUM]
    if averaged:
        normaliser = ops.cast(averaged[0].normaliser, dtype)
        objective = terms_total + regularisation
        return objective, replica_scale(normaliser), normaliser, True
    return _with_regularisation(
        (terms_total, ops.ones((), dtype), ops.zeros((), dtype), False),
        regularisation, first_in_window,
    )


def _activity_part(penalties, value, dtype):
    """The activity penalties' set: a mean over examples (Keras >= 3.14,
    normalised by the examples Keras divided by) or a sum over the batch
    (summed over the window)."""
    examples = [p.examples for p in penalties if p.examples is not None]
    if not examples:
        summed_scale = replica_scale(ops.ones((), dtype))
        return value, summed_scale, ops.zeros((), dtype), False
    mean_normaliser = ops.cast(examples[0], dtype)
    return value, replica_scale(mean_normaliser), mean_normaliser, True
