"""Applying, discarding and resetting the JAX window.

Inside the step a full window is applied under `jax.lax.cond`: on a
micro-step that does not end a window the optimizer update is not
computed. Outside it (the epoch-end callback), the pending window is
applied by one jitted call over the state.
"""

import jax

from keras_accum.backend.jax.window import Window
from keras_accum.core import noise_scale
from keras_accum.core import window as core_window


class JAXWindowUpdate:
    """When and how the window is applied (a mixin of
    `JAXAccumulationTrainer`)."""

    def _window_is_full(self, window):
        return core_window.is_full(
            self._schedule, window.mini_step, window.window
        )

    def _apply_window_if(self, condition, trainable, optimizer_values,
                         window):
        """Applies `window` when `condition` holds, under `lax.cond`.

        Neither the optimizer update nor the window's finiteness check runs
        on a step whose condition is false. A full window whose sums are
        not finite is discarded and counted instead.

        Returns:
            The new `(trainable, optimizer_values, window)`.
        """
        plan = self._window_plan

        def update(operands):
            trainable, optimizer_values, window = operands
            gradients = core_window.window_gradient(
                window.gradients, window.normalisers, plan
            )
            if window.noise:
                sums, state = window.noise
                window = window._replace(noise=[
                    sums,
                    noise_scale.updated_state(
                        state, sums,
                        noise_scale.block_squared_norm(
                            gradients, noise_scale.window_block(state),
                            noise_scale.blocks_of(state), state.dtype,
                        ),
                        window.normalisers[0], window.mini_step,
                    ),
                ])
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, gradients, trainable
            )
            return list(trainable), list(optimizer_values), window.cleared()

        def discard(operands):
            trainable, optimizer_values, window = operands
            return trainable, optimizer_values, window.cleared(
                discarded=window.discarded + 1
            )

        def apply(operands):
            return jax.lax.cond(
                operands[2].is_finite(), update, discard, operands
            )

        return jax.lax.cond(
            condition,
            apply,
            lambda operands: operands,
            (list(trainable), list(optimizer_values), window),
        )

    # --- Outside the step -------------------------------------------------

    def _apply_pending_window(self):
        """Applies the window if it holds a mini-batch (eager call)."""
        if not self.mini_step:
            # Nothing to apply (the function's `cond` would return every
            # value unchanged): spares a call over the whole state.
            return
        accumulator = self._accumulator
        if self._functions.apply is None:

            def apply_function(trainable, optimizer_values, values):
                window = Window.from_values(
                    values, len(accumulator.gradients),
                    noise=accumulator.noise_state is not None,
                )
                trainable, optimizer_values, window = self._apply_window_if(
                    window.mini_step > 0, trainable, optimizer_values, window
                )
                return trainable, optimizer_values, window.values()

            self._functions.apply = (
                apply_function if self.run_eagerly
                else jax.jit(apply_function)
            )
        targets = (
            accumulator.variables,
            self.optimizer.variables,
            accumulator.state_variables(),
        )
        results = self._functions.apply(
            *[[v.value for v in variables] for variables in targets]
        )
        for variables, values in zip(targets, results):
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _reset_window(self):
        """Zeroes the window's sums and count (eager call)."""
        self._accumulator.reset()

