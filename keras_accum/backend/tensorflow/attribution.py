"""The TensorFlow analysis of a step's loss for `loss_attribution`.

The factors are read from the step itself: a tape around `compute_loss`
gives the gradient of the loss with respect to each Keras loss term and
each `model.losses` entry. Whether they can be trusted is decided on a
second trace of `compute_loss`, in a graph of its own that is never run
(so the analysis costs nothing per step, and a `compute_loss` that updates
metrics is not counted twice), where each part is replaced by a probe: a
gradient that TensorFlow does not connect (`None`) is a structural zero.
"""

import keras
import tensorflow as tf

from keras_accum._compat import losses as compat_losses
from keras_accum._compat import trainer as compat_trainer
from keras_accum.core.loss_attribution import Probe
from keras_accum.core.loss_normalisers import record_loss_normalisers


def probe(model, loss_tape, loss, recorded, entries, data, y_pred, check):
    """The `Probe` of the step's loss (see `loss_attribution`).

    Args:
        model: The model.
        loss_tape: The tape that watched `compute_loss` (and `entries`).
        loss: The step's loss.
        recorded: The step's `StepLosses`.
        entries: The `model.losses` entries `compute_loss` saw.
        data: `(x, y, sample_weight)` of the step.
        y_pred: The step's predictions.
        check: Whether to check the factors on a second trace.
    """
    terms = recorded.known_terms
    sources = [t.value for t in terms] + list(entries)
    factors = loss_tape.gradient(
        loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    term_factors, loss_factors = factors[:len(terms)], factors[len(terms):]
    # Keras scales each entry for distribution when its `compute_loss`
    # adds it; one added as it is counts once per replica.
    applied = compat_losses.scale_loss_for_distribution(
        tf.ones((), loss.dtype)
    )
    scaled = [id(entry) in recorded.aggregated for entry in entries]
    loss_scales = [1.0 if s else applied for s in scaled]
    penalties = len(recorded.penalties) + len(recorded.added)
    penalty_scale = 1.0 if all(scaled[:penalties]) else applied
    attributed = constant = None
    if check:
        attributed, constant = _check(
            model, data, y_pred, len(terms), len(entries)
        )
    return Probe(term_factors, loss_factors, attributed, constant,
                 loss_scales, penalty_scale)


def _check(model, data, y_pred, terms, losses):
    """Whether the loss is attributed and its factors constant, from a
    second trace of `compute_loss` with probes, never run."""
    verdict = {}
    dtype = tf.as_dtype(keras.backend.floatx())

    def traced(probes, entries, data, y_pred):
        x, y, sample_weight = data
        watched = [
            t for t in tf.nest.flatten((data, y_pred))
            if t is not None and t.dtype.is_floating
        ]
        weights = list(model.trainable_variables)
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([probes, entries] + watched)
            with tf.GradientTape(persistent=True) as inner:
                inner.watch([probes, entries] + watched)
                value = _substituted_loss(
                    model, probes, entries, x, y, y_pred, sample_weight
                )
            found = inner.gradient(
                value, [probes, entries],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            direct = inner.gradient(
                value, [t for t in tf.nest.flatten(y_pred)
                        if t.dtype.is_floating] + weights
            )
        dependence = outer.gradient(found, [probes, entries] + watched + weights)
        verdict["attributed"] = all(g is None for g in direct)
        verdict["constant"] = all(g is None for g in dependence)
        return value

    specs = tf.nest.map_structure(
        lambda t: None if t is None else tf.TensorSpec(t.shape, t.dtype),
        (tuple(data), y_pred),
    )
    tf.function(traced, autograph=False).get_concrete_function(
        tf.TensorSpec((terms,), dtype), tf.TensorSpec((losses,), dtype),
        *specs,
    )
    return verdict["attributed"], verdict["constant"]


def _substituted_loss(model, probes, entries, x, y, y_pred, sample_weight):
    """`compute_loss` with the known terms and `model.losses` replaced."""

    def substitute(index, term):
        return tf.cast(probes[index], term.value.dtype)

    with record_loss_normalisers(substitute=substitute):
        with compat_trainer.losses_override(
            model, tf.unstack(entries) if entries.shape[0] else []
        ):
            return compat_trainer.compute_loss(
                model, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
