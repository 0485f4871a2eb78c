"""Which factor each part of a step's loss has in it, or a refusal.

`objectives` accumulates each Keras loss term and the weight regularisation
by its own normaliser, so it needs the loss as a fixed linear combination
`sum_t c_t * term_t + sum_j d_j * regularisation_j + penalties`. The
factors are read from the step by the backend's automatic differentiation
(`backend/<name>/attribution.py`): the gradient of the loss with respect to
each part, the factor Keras itself applied (a `loss_weights` entry, a
replica scaling). Keras' own `compute_loss` is such a combination. A
custom `compute_loss` (or a compiled loss function that calls Keras losses
itself) is also checked while the step is traced, with every Keras loss
term and every loss of `model.losses` replaced by a probe:

- the loss must not depend on the predictions or the weights other than
  through those probes (else a part of it has no normaliser Keras knows:
  a hand-written mean, say);
- each factor must be constant: independent of the probes (the loss is
  linear in its parts), of the predictions, weights and data.

Piecewise-linear combinations (`maximum`, `abs` or `where` of loss terms)
pass both checks and are outside what the analysis can see.
"""

import dataclasses

import keras

from keras_accum._compat import trainer as compat_trainer
from keras_accum.core.objectives import Coefficients


@dataclasses.dataclass
class Probe:
    """What the backend's analysis of a loss found.

    Attributes:
        terms: Each known Keras loss term's factor in the loss (scalars).
        losses: Each `model.losses` entry's factor, in its order.
        loss_scales: For each entry, 1 where Keras scaled it for
            distribution (`_aggregate_additional_loss`), else that scale:
            a custom `compute_loss` that adds an entry as it is counts it
            once per replica, where one device counts it once. `None`: all
            1.
        penalty_scale: The same correction for the activity penalties.
        attributed: Whether the loss depends on predictions and weights only
            through the probed parts (`None`: not checked).
        constant: Whether every factor is constant (`None`: not checked).
    """

    terms: list
    losses: list
    attributed: bool
    constant: bool
    loss_scales: list = None
    penalty_scale: object = 1.0


def is_keras_combination(model, recorded):
    """Whether the step's loss is Keras' own combination of its parts:
    Keras' `compute_loss`, one known Keras loss term per compiled loss,
    each times its `loss_weights`, plus `model.losses`. Its factors are
    read from the step; nothing else needs checking."""
    if overrides_compute_loss(model):
        return False
    flat = compat_trainer.compiled_losses(model)
    terms = recorded.terms
    return (
        flat is not None
        and len(flat) == len(terms)
        and all(term.known for term in terms)
    )


def overrides_compute_loss(model):
    """Whether `model`'s class defines its own `compute_loss`.

    True when the first class up `type(model).__mro__` that defines
    `compute_loss` is not one `keras.Model` inherits from: a class of the
    user's. keras_accum's own classes (`AccumulatingModel` and the
    backends' trainers) leave `compute_loss` to Keras, which
    `tests/loss_rule_test.py` checks.
    """
    for cls in type(model).__mro__:
        if "compute_loss" in cls.__dict__:
            return not issubclass(keras.Model, cls)
    return False


def losses_count(model, recorded):
    """Entries of `model.losses` in the step: added losses, then weight
    regularisation (the order of `Layer.losses`)."""
    return (
        len(recorded.penalties)
        + len(recorded.added)
        + len(compat_trainer.regularization_losses(model))
    )


def attribute(model, recorded, probe):
    """The `Coefficients` of the step's loss, or a refusal.

    Args:
        model: The model.
        recorded: The step's `loss_normalisers.StepLosses`.
        probe: The backend's analysis: a function
            `(terms, losses, check) -> Probe` of the number of known terms
            and of `model.losses` entries, and whether to check the
            factors (`Probe.attributed` and `Probe.constant` are `None`
            when not).

    Raises:
        ValueError: if the loss has a part whose normaliser is unknown, or
            is not a fixed linear combination of its parts.
    """
    losses = losses_count(model, recorded)
    checked = not is_keras_combination(model, recorded)
    found = probe(len(recorded.known_terms), losses, checked)
    regularisation = len(compat_trainer.regularization_losses(model))
    scales = found.loss_scales or [1.0] * len(found.losses)
    first = len(found.losses) - regularisation
    coefficients = Coefficients(
        list(found.terms),
        list(found.losses[first:]),
        list(scales[first:]),
        found.penalty_scale,
    )
    if not checked:
        return coefficients
    scalars = [t.name for t in recorded.terms if t.scalar_input]
    if not found.attributed:
        detail = (
            f" The loss(es) {', '.join(f'`{n}`' for n in scalars)} reduced "
            "a scalar: the function they wrap averaged it already, over "
            "entries keras_accum cannot count."
            if scalars else ""
        )
        raise ValueError(
            "keras_accum normalises each part of the loss over the whole "
            "window, and this step's loss depends on the predictions or "
            "weights through something other than Keras loss terms "
            "(`keras.losses.Loss` called on per-example values), weight "
            "regularisers and `model.losses`: a hand-written mean, for "
            f"instance, whose normaliser Keras does not report.{detail} "
            "Compute each data-dependent part with a Keras loss (e.g. "
            "`keras.losses.MeanAbsoluteError()(y, y_pred)`, or a "
            "`keras.losses.Loss` subclass whose `call` returns per-example "
            'values), or pass `reduction="sum"` to sum the mini-batches\' '
            "gradients. Received: a loss from "
            f"`{type(model).__name__}.compute_loss` with "
            f"{len(recorded.known_terms)} Keras loss term(s)"
        )
    if not found.constant:
        raise ValueError(
            "keras_accum accumulates each Keras loss term over the whole "
            "window, which is exact only when the step's loss is a fixed "
            "linear combination of its terms (e.g. `a + 0.5 * b`): a "
            "product, square root or data-dependent factor of loss terms "
            "takes a different value on the big batch. Combine the terms "
            'linearly, or pass `reduction="sum"` to sum the mini-batches\' '
            "gradients. Received: a loss from "
            f"`{type(model).__name__}.compute_loss` that is not linear in "
            "its loss terms"
        )
    return coefficients
