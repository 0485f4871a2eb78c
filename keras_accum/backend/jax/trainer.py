"""The JAX train step: pure and jitted, with the window in the step's state.

Keras' `JAXTrainer.train_step(state, data)` takes and returns the state
`(trainable, non_trainable, optimizer_variables, metrics_variables)`. Here
the accumulators travel in it too, after the optimizer's own variables in
the third entry (`_get_jax_state`, `jax_state_sync` and
`_get_state_sharding_spec` add them; before Keras 3.12, which has no
`_get_state_sharding_spec`, the step constrains Keras' part of the state
as Keras' own step does), so that `fit`'s loop, which unpacks
four entries, carries them from step to step on the device, with no host
round trip per micro-step. They are not optimizer variables, so saving and
loading the optimizer is unchanged.

A full window is applied inside the step under `jax.lax.cond`: on a
micro-step that does not end a window the optimizer update is not computed.

This module holds the step itself and the hooks Keras' JAX trainer and the
backend-neutral model call; its parts live beside it:

- `window.py`: `Window`, the accumulators' values inside the step;
- `accumulators.py`: the accumulator variables between steps;
- `state.py`: the accumulators in the trainer's state;
- `accumulation.py`: one `fit` batch into the window, in micro-batches;
- `window_update.py`: applying, discarding and resetting the window.
"""

from keras_accum._compat import trainer as compat_trainer
from keras_accum.backend.jax.accumulation import JAXBatchAccumulation
from keras_accum.backend.jax.accumulators import JAXGradientAccumulator
from keras_accum.backend.jax.state import JAXWindowState
from keras_accum.backend.jax.state import constrain
from keras_accum.backend.jax.window import Window
from keras_accum.backend.jax.window_update import JAXWindowUpdate
from keras_accum.core import custom_steps
from keras_accum.core import validation


class JAXAccumulationTrainer(
    JAXWindowState, JAXBatchAccumulation, JAXWindowUpdate
):
    """The JAX half of `AccumulatingModel` (a mixin before `keras.Model`,
    as Keras mixes `JAXTrainer` into its `Model`)."""

    accumulator_class = JAXGradientAccumulator

    # --- Hooks of the backend-neutral model -------------------------------

    # `_replicas` is 1: one global program, in which Keras normalises the
    # global batch already (the core's defaults for the other hooks).

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if self._ready_to_accumulate():
            validation.validate_jax_optimizer(self.optimizer)
            # Before Keras jits the step: the state's shardings are read
            # from the variables, which must exist by then.
            self._sync_accumulation_state()
        return super().make_train_function(force=force)

    # --- The step ---------------------------------------------------------

    @custom_steps.own_step
    def train_step(self, state, data):
        if self._trains_as_keras():
            return super().train_step(state, data)
        custom_steps.count_accumulation(self)
        trainable, non_trainable, optimizer_state, metrics = state
        optimizer_count = len(self.optimizer.variables)
        optimizer_values = list(optimizer_state[:optimizer_count])
        self._check_accumulators_in_trace()
        window = Window.from_values(
            optimizer_state[optimizer_count:],
            len(self._accumulator.gradients),
            noise=self._accumulator.noise_state is not None,
        )
        size = self._micro_batch_size_for(state, data)
        window, non_trainable, metrics, logs = self._accumulate_batch(
            (trainable, non_trainable, metrics, optimizer_values),
            window, data, size,
        )
        if self._schedule.value != validation.EPOCH:
            trainable, optimizer_values, window = self._apply_window_if(
                self._window_is_full(window), trainable, optimizer_values,
                window,
            )
        if not compat_trainer.JAX_STATE_SHARDING_IN_JIT:
            # Keras < 3.12: its own step constrains the state it returns to
            # the shardings `fit` recorded (`_enforce_jax_state_sharding`);
            # so does this one, for Keras' part of the state (the window's
            # values are left to `jit`), where they are recorded.
            trainable, non_trainable, optimizer_values, metrics = (
                constrain(values, getattr(self, f"_{name}_shardings", None))
                for values, name in (
                    (trainable, "trainable_variable"),
                    (non_trainable, "non_trainable_variable"),
                    (optimizer_values, "optimizer_variable"),
                    (metrics, "metrics_variable"),
                )
            )
        return logs, (
            trainable,
            non_trainable,
            list(optimizer_values) + window.values(),
            metrics,
        )

    def _check_accumulators_in_trace(self):
        """The accumulators were built before `jit`, for these variables;
        a trace that finds the trainable set changed raises (see
        `_sync_accumulation_state`)."""
        self._functions.tracing = True
        try:
            self._sync_accumulation_state()
        finally:
            self._functions.tracing = False

    def _accumulate_from_custom_step(self, gradients, normaliser):
        raise NotImplementedError(
            "`accumulate_gradients` is for custom TensorFlow train steps; "
            "on JAX, a custom `train_step(self, state, data)` accumulates "
            "through `super().train_step(state, data)`. Received: a call "
            "on the JAX backend"
        )

