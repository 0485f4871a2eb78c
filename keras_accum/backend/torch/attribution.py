"""The PyTorch analysis of a step's loss for `loss_attribution`.

The factors are read from the step itself: the gradient of the loss with
respect to each Keras loss term and each `model.losses` entry, through
the step's own autograd graph. Whether they can be trusted is decided on a
second run of `compute_loss` where each part is replaced by a probe, with
the model's non-trainable and metric variables restored afterwards (so a
`compute_loss` that updates a metric is not counted twice): a gradient
autograd does not connect (`None`) is a structural zero. Keras on torch
runs eagerly, so that check runs once per compiled model and loss
structure (as TensorFlow and JAX check once per trace), and only for a
loss that is not Keras' own combination.
"""

import keras
import torch

from keras_accum._compat import trainer as compat_trainer
from keras_accum.core.loss_attribution import Probe
from keras_accum.core.loss_normalisers import record_loss_normalisers


def step_probe(model, loss, recorded, entries, data, y_pred):
    """The step's probe for `loss_attribution.attribute`: the factors from
    this step's graph, the check's verdict kept per compiled model and
    loss structure `(terms, losses)`, as a trace keeps it."""
    checked = model._functions.checked_losses

    def step(terms, losses, check):
        key = (terms, losses)
        found = probe(
            model, loss, recorded, entries, data, y_pred,
            check and key not in checked,
        )
        if check:
            if key not in checked:
                checked[key] = (found.attributed, found.constant)
            found.attributed, found.constant = checked[key]
        return found

    return step


def probe(model, loss, recorded, entries, data, y_pred, check):
    """The `Probe` of the step's loss (see `loss_attribution`).

    Args:
        model: The model.
        loss: The step's loss (with its autograd graph).
        recorded: The step's `StepLosses`.
        entries: The `model.losses` entries `compute_loss` saw.
        data: `(x, y, sample_weight)` of the step.
        y_pred: The step's predictions.
        check: Whether to check the factors on a second run.
    """
    terms = [t.value for t in recorded.known_terms]
    sources = terms + list(entries)
    if not sources:
        factors = []
        attributed = constant = None
        if check:
            attributed, constant, _ = _substituted(
                model, data, y_pred, 0, 0, check=True
            )
    elif all(_differentiable(s) for s in sources) and loss.requires_grad:
        factors = torch.autograd.grad(
            loss, sources, retain_graph=True, allow_unused=True
        )
        factors = [
            torch.zeros((), dtype=loss.dtype) if f is None else f.detach()
            for f in factors
        ]
        attributed = constant = None
        if check:
            attributed, constant, _ = _substituted(
                model, data, y_pred, len(terms), len(entries), check=True
            )
    else:
        # A part the weights do not reach has no graph to read its factor
        # from: the second run gives it.
        attributed, constant, factors = _substituted(
            model, data, y_pred, len(terms), len(entries), check=check
        )
    return Probe(factors[:len(terms)], factors[len(terms):], attributed,
                 constant)


def _differentiable(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad


def _substituted(model, data, y_pred, terms, losses, check):
    """Runs `compute_loss` with probes for its parts.

    Returns:
        `(attributed, constant, factors)`: the first two `None` unless
        `check`.
    """
    dtype = getattr(torch, keras.backend.floatx())
    probes = torch.zeros((terms,), dtype=dtype, requires_grad=True)
    entries = torch.zeros((losses,), dtype=dtype, requires_grad=True)
    x, y, sample_weight = (
        keras.tree.map_structure(_watched, part) for part in data
    )
    y_pred = keras.tree.map_structure(_watched, y_pred)
    watched = [
        t for t in keras.tree.flatten((x, y, sample_weight, y_pred))
        if _differentiable(t)
    ]
    predictions = [t for t in keras.tree.flatten(y_pred) if _differentiable(t)]
    weights = [v.value for v in model.trainable_variables]

    def substitute(index, term):
        return probes[index].to(term.value.dtype)

    saved = [
        (v, v.value.detach().clone())
        for v in model.non_trainable_variables + model.metrics_variables
    ]
    try:
        with record_loss_normalisers(substitute=substitute):
            with compat_trainer.losses_override(
                model, [entries[j] for j in range(losses)]
            ):
                value = torch.reshape(
                    compat_trainer.compute_loss(
                        model, x=x, y=y, y_pred=y_pred,
                        sample_weight=sample_weight, training=True,
                    ),
                    (),
                ).to(dtype)
    finally:
        with torch.no_grad():
            for variable, before in saved:
                # Only what the run changed: writing a frozen weight the
                # step's forward pass used would invalidate its backward.
                if not torch.equal(variable.value, before):
                    variable.value.copy_(before)
    found = torch.autograd.grad(
        value, [probes, entries], create_graph=check, allow_unused=True,
        retain_graph=True,
    )
    found = [
        torch.zeros(shape, dtype=dtype) if f is None else f
        for f, shape in zip(found, [(terms,), (losses,)])
    ]
    factors = [f[i].detach() for f in found for i in range(f.shape[0])]
    if not check:
        return None, None, factors
    direct = (
        torch.autograd.grad(
            value, predictions + weights, allow_unused=True,
            retain_graph=True,
        )
        if value.requires_grad and predictions + weights else []
    )
    attributed = all(g is None for g in direct)
    inputs = [probes, entries] + watched + weights
    constant = True
    for f in found:
        if f.requires_grad:
            dependence = torch.autograd.grad(
                f.sum(), inputs, allow_unused=True, retain_graph=True
            )
            constant = constant and all(g is None for g in dependence)
    return attributed, constant, factors


def _watched(value):
    """A leaf copy of a floating tensor that autograd follows (else the
    value as it is)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value
