"""The JAX analysis of a step's loss for `loss_attribution`.

`compute_loss` is traced again inside the step with each Keras loss term
and each `model.losses` entry replaced by a probe, as a function of the
probes, the weights, the predictions and the data. The factors are its
gradient with respect to the probes (constants, which XLA folds: the
second trace costs nothing per step). Whether they can be trusted is read
from the jaxprs of the function and of its gradient: which outputs depend
on which inputs.
"""

import jax
import keras
from jax import numpy as jnp

from keras_accum._compat import trainer as compat_trainer
from keras_accum.core.loss_attribution import Probe
from keras_accum.core.loss_normalisers import record_loss_normalisers


def probe(model, state, data, y_pred, terms, losses, check):
    """The `Probe` of `model`'s `compute_loss` (see `loss_attribution`).

    Args:
        model: The model.
        state: `(trainable, non_trainable, metrics)` values of the step.
        data: `(x, y, sample_weight)` of the step.
        y_pred: The step's predictions.
        terms: Number of known Keras loss terms.
        losses: Number of `model.losses` entries.
        check: Whether to check the factors (from jaxprs).
    """
    trainable, non_trainable, metrics = state
    x, y, sample_weight = data
    dtype = keras.backend.floatx()

    def substituted(probes, entries, trainable, y_pred, x, y, sample_weight):
        def substitute(index, term):
            return probes[index].astype(term.value.dtype)

        mapping = (
            list(zip(model.trainable_variables, trainable))
            + list(zip(model.non_trainable_variables, non_trainable))
            + list(zip(model.metrics_variables, metrics))
        )
        with keras.StatelessScope(state_mapping=mapping):
            with record_loss_normalisers(substitute=substitute):
                with compat_trainer.losses_override(
                    model, [entries[j] for j in range(losses)]
                ):
                    return jnp.reshape(
                        compat_trainer.compute_loss(
                            model, x=x, y=y, y_pred=y_pred,
                            sample_weight=sample_weight, training=True,
                        ),
                        (),
                    ).astype(dtype)

    factors = jax.grad(substituted, argnums=(0, 1))
    arguments = (
        jnp.zeros((terms,), dtype), jnp.zeros((losses,), dtype),
        list(trainable), y_pred, x, y, sample_weight,
    )
    arguments = jax.tree_util.tree_map(jax.lax.stop_gradient, arguments)
    term_factors, loss_factors = factors(*arguments)
    term_factors = [term_factors[t] for t in range(terms)]
    loss_factors = [loss_factors[j] for j in range(losses)]
    if not check:
        return Probe(term_factors, loss_factors, None, None)
    positions = _leaf_positions(arguments)
    loss_jaxpr = jax.make_jaxpr(substituted)(*arguments)
    attributed = not _depends(
        loss_jaxpr, positions[2] | positions[3], tracer_constants=False
    )
    factors_jaxpr = jax.make_jaxpr(factors)(*arguments)
    constant = not _depends(
        factors_jaxpr, set().union(*positions), tracer_constants=True
    )
    return Probe(term_factors, loss_factors, attributed, constant)


def _leaf_positions(arguments):
    """For each argument, the positions of its leaves among the flat
    inputs of a jaxpr traced on `arguments`."""
    positions, start = [], 0
    for argument in arguments:
        count = len(jax.tree_util.tree_leaves(argument))
        positions.append(set(range(start, start + count)))
        start += count
    return positions


def _depends(closed, sources, tracer_constants):
    """Whether an output of `closed` depends on the inputs at `sources`
    (and, with `tracer_constants`, on values of the enclosing trace)."""
    jaxpr = closed.jaxpr
    tainted = {v for i, v in enumerate(jaxpr.invars) if i in sources}
    if tracer_constants:
        tainted |= {
            v for v, c in zip(jaxpr.constvars, closed.consts)
            if isinstance(c, jax.core.Tracer)
        }
    for equation in jaxpr.eqns:
        if any(_is_var(v) and v in tainted for v in equation.invars):
            tainted.update(equation.outvars)
    return any(_is_var(v) and v in tainted for v in jaxpr.outvars)


def _is_var(atom):
    return not hasattr(atom, "val")  # A `Literal` has a value.
