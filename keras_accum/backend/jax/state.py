"""The accumulators in the JAX trainer's state.

Keras' `JAXTrainer.train_step(state, data)` takes and returns the state
`(trainable, non_trainable, optimizer_variables, metrics_variables)`. The
accumulators travel in it, after the optimizer's own variables in the
third entry: `_get_jax_state`, `jax_state_sync` and
`_get_state_sharding_spec` add them, and while `fit` runs their values are
read from the state, not from the variables. `constrain` applies Keras <
3.12's recorded shardings, which that version's own step enforces.
"""

import jax
import numpy as np
from jax import numpy as jnp


class JAXWindowState:
    """The accumulators in the state of the JAX trainer (a mixin of
    `JAXAccumulationTrainer`, before Keras' `JAXTrainer`)."""

    # --- The counters, read from the state while `fit` runs --------------

    def _read_counter(self, variable):
        return int(self._current_value(variable))

    def _read_array(self, variable):
        return np.asarray(self._current_value(variable))

    def _counter_value(self, variable):
        # A copy, dispatched without waiting: the next step consumes
        # (donates) the state's own array.
        return _copy(self._current_value(variable))

    def _current_value(self, variable):
        """An accumulator variable's value: in the state of a running `fit`
        when it is there, else the variable's own."""
        values = self._unsynced_window_values() or []
        for ref, value in zip(self._accumulator.state_variables(), values):
            if ref is variable:
                return value
        return variable.value

    # --- The accumulators in the JAX trainer's state ----------------------

    def _window_in_state(self):
        return self._accumulator.built and self._accumulates_in_step()

    def _unsynced_window_values(self):
        """The accumulators' values in the state of a running `fit`, or
        `None` when the variables hold them (state synced)."""
        state = getattr(self, "_jax_state", None)
        if not state or self._jax_state_synced or not self._window_in_state():
            return None
        values = state.get("optimizer_variables")
        optimizer_count = len(self.optimizer.variables)
        if values is None or len(values) == optimizer_count:
            return None
        return values[optimizer_count:]

    def _get_jax_state(
        self,
        trainable_variables=False,
        non_trainable_variables=False,
        optimizer_variables=False,
        metrics_variables=False,
        purge_model_variables=False,
    ):
        window = (
            [v.value for v in self._accumulator.state_variables()]
            if optimizer_variables and self._window_in_state()
            else []
        )
        if purge_model_variables:
            self._keep_purged_values(
                trainable_variables, non_trainable_variables,
                optimizer_variables, metrics_variables,
            )
        state = super()._get_jax_state(
            trainable_variables=trainable_variables,
            non_trainable_variables=non_trainable_variables,
            optimizer_variables=optimizer_variables,
            metrics_variables=metrics_variables,
            purge_model_variables=purge_model_variables,
        )
        if not window:
            return state
        state = list(state)
        index = int(trainable_variables) + int(non_trainable_variables)
        state[index] = list(state[index]) + window
        if purge_model_variables:
            # As Keras purges its own variables: one copy, in the state.
            for variable in self._accumulator.state_variables():
                variable._value = None
        return tuple(state)

    def jax_state_sync(self):
        values = self._unsynced_window_values()
        if values is not None:
            for variable, value in zip(
                self._accumulator.state_variables(), values
            ):
                variable.assign(value)
        super().jax_state_sync()
        self._restore_purged_values()

    def _keep_purged_values(self, trainable, non_trainable, optimizer,
                            metrics):
        """Keeps the values `fit` is about to purge from the variables.

        Keras purges the variables when it takes the state and reattaches
        the state a step returns. If the first step fails (e.g. a custom
        `train_step` refused while traced), no state was returned and the
        purged weights would be lost; `_restore_purged_values` puts them
        back.
        """
        groups = [
            (trainable, self.trainable_variables),
            (non_trainable, self.non_trainable_variables),
            (optimizer, self.optimizer.variables if optimizer else []),
            (
                optimizer and self._window_in_state(),
                self._accumulator.state_variables()
                if self._accumulator.built else [],
            ),
            (metrics, self.metrics_variables),
        ]
        self._functions.purged = [
            (variable, variable._value)
            for taken, variables in groups if taken
            for variable in variables
            if variable._value is not None
        ]

    def _restore_purged_values(self):
        for variable, value in self._functions.purged:
            # A value a step consumed (donated) is deleted; the state the
            # step returned was reattached instead.
            if variable._value is None and not value.is_deleted():
                variable._value = value
        self._functions.purged = []

    def _get_state_sharding_spec(self):
        trainable, non_trainable, optimizer, metrics = (
            super()._get_state_sharding_spec()
        )
        if self._window_in_state():
            optimizer = list(optimizer) + [
                v.value.sharding for v in self._accumulator.state_variables()
            ]
        return trainable, non_trainable, optimizer, metrics


# Jitted: JAX's eager `jnp.copy` costs ~10x the dispatch of a jitted one.
_copy = jax.jit(jnp.copy)


def constrain(values, shardings):
    """`values` under `shardings` (Keras < 3.12's recorded spec), or as they
    are where none is recorded for them."""
    values = list(values)
    if shardings is None or len(shardings) != len(values):
        return values
    return [
        jax.lax.with_sharding_constraint(value, sharding)
        for value, sharding in zip(values, shardings)
    ]

