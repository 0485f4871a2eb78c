"""`Window`: the accumulators' values inside the jitted step, as a pytree.

The step takes the accumulator variables' values from its state, works on
them as one `Window` and returns them flattened, in the order of
`GradientAccumulator.state_variables()`.
"""

import collections

from jax import numpy as jnp


class Window(collections.namedtuple(
    "Window",
    ["gradients", "normalisers", "mini_step", "window", "skipped",
     "discarded", "noise"],
)):
    """The values of the accumulator variables inside a step (a pytree).

    Attributes:
        gradients: One list of gradient sums per loss term.
        normalisers: Vector, each term's normaliser sum.
        mini_step: Micro-batches in the window.
        window: Micro-batches per window (0: epoch end).
        skipped: Micro-batches skipped for non-finite gradients.
        discarded: Windows discarded for a non-finite sum.
        noise: `[sums, state]` of the noise scale
            (`GradientAccumulator.noise_variables()`), or `[]` when it is
            off.
    """

    __slots__ = ()

    @classmethod
    def from_values(cls, values, terms, noise=False):
        """Unflattens `GradientAccumulator.state_variables()` values.

        Args:
            values: The values, in that order.
            terms: The number of loss terms.
            noise: Whether the noise scale's two variables end the list.
        """
        values = list(values)
        noise_values = values[-2:] if noise else []
        values = values[:-2] if noise else values
        per_term = (len(values) - 5) // terms
        gradients = [
            values[t * per_term:(t + 1) * per_term] for t in range(terms)
        ]
        return cls(gradients, *values[terms * per_term:], noise_values)

    def values(self):
        """Flattens, in the order of `GradientAccumulator.state_variables()`."""
        return [g for term in self.gradients for g in term] + [
            self.normalisers,
            self.mini_step,
            self.window,
            self.skipped,
            self.discarded,
        ] + list(self.noise)

    def cleared(self, discarded=None):
        """The window after an update (or a discard): sums and count zero."""
        return self._replace(
            gradients=[[jnp.zeros_like(g) for g in term]
                       for term in self.gradients],
            normalisers=jnp.zeros_like(self.normalisers),
            mini_step=jnp.zeros_like(self.mini_step),
            discarded=self.discarded if discarded is None else discarded,
            noise=[jnp.zeros_like(v) for v in self.noise[:1]]
            + list(self.noise[1:]),
        )

    def is_finite(self):
        """Whether every sum and normaliser is finite (scalar bool).

        Once per window, so it can afford an element-wise check: a sum of
        finite gradients can overflow, which a check of the total alone
        would mistake for a non-finite gradient.
        """
        checks = [jnp.all(jnp.isfinite(g)) for t in self.gradients for g in t]
        checks.append(jnp.all(jnp.isfinite(self.normalisers)))
        return jnp.all(jnp.stack(checks))

