"""The JAX accumulator variables: placement, and zeroing between steps.

Inside a step the accumulators are values in the state (a `Window`); the
variables themselves are only placed, and zeroed or assigned eagerly
between jitted steps.
"""

import functools

import jax
from jax import numpy as jnp

from keras_accum.core.accumulators import GradientAccumulator


class JAXGradientAccumulator(GradientAccumulator):
    """`GradientAccumulator` with eager updates between jitted steps."""

    def _placement(self, variable):
        # Sharded as its weight, as Keras places optimizer slots
        # (`add_variable_from_reference`): under `ModelParallel` a micro-step
        # adds each gradient shard where it already is.
        return {"layout": getattr(variable, "_layout", None)}

    def reset(self):
        """Zeroes the gradient sums, normalisers and the window counter."""
        variables = [v for term in self.gradients for v in term] + [
            self.normalisers, self.mini_step
        ]
        zeros = _zeros_function(
            tuple((tuple(v.shape), v.dtype) for v in variables)
        )
        for variable, zero in zip(variables, zeros()):
            variable.assign(zero)



@functools.lru_cache(maxsize=None)
def _zeros_function(specs):
    """A jitted function of no argument returning zeros of `specs`
    (`(shape, dtype)` pairs): one dispatch for all the accumulators, where
    eager `zeros` pays one per variable (~4 ms a `fit` on the benchmark's
    transformer)."""
    return jax.jit(lambda: [jnp.zeros(shape, dtype) for shape, dtype in specs])
