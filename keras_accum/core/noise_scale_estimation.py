"""The noise scale on the model: the argument, the estimate, its state.

The arithmetic is in `noise_scale`; each backend adds a micro-batch's sums
where it adds its gradients, and updates the moving averages where it
applies a window.
"""

import numpy as np

from keras_accum.core import noise_scale

# The key of the moving averages' state among the model's own saved
# variables (`save_own_variables`).
_STATE_KEY = "noise_scale_state"


class NoiseScaleEstimation:
    """The gradient noise scale of `AccumulatingModel` (a mixin).

    Reads the model's `_noise_scale` (bool), `_accumulator` and
    `_read_array`; keeps the moving averages' state in Python
    (`_noise_state`) until the accumulators that hold it are built.
    """

    @property
    def noise_scale(self):
        """Whether the model measures the gradient noise scale."""
        return self._noise_scale

    @property
    def noise_scale_estimate(self):
        """The current `NoiseScaleEstimate`, smoothed over windows.

        `None` when `noise_scale` is off, and before the first applied
        window of at least two micro-batches.
        """
        state = self._noise_scale_state()
        return None if state is None else noise_scale.estimate(state)

    def _noise_scale_logs(self):
        """The estimate under its epoch-log keys (NaN before the first)."""
        estimate = self.noise_scale_estimate
        if estimate is None:
            return dict(noise_scale.NO_ESTIMATE_LOGS)
        return estimate.logs()

    def _noise_scale_state(self):
        """The moving averages' state (a NumPy vector), or `None` when the
        noise scale is off."""
        if not self._noise_scale:
            return None
        accumulator = self._accumulator
        if accumulator.built and accumulator.noise_state is not None:
            return np.asarray(self._read_array(accumulator.noise_state))
        if self._noise_state is None:
            return np.zeros(noise_scale.STATE_SIZE)
        return self._noise_state

    def _initial_noise_state(self):
        """The state accumulators built now start from (`None`: off).

        The estimate so far (restored by `load_model`) when they are built
        the first time; zeros when they are rebuilt because the trainable
        weights changed (a layer frozen or unfrozen, then `compile()`):
        the noise scale is that of the gradient of the weights trained, and
        a new set starts a new estimate.
        """
        if not self._noise_scale:
            return None
        if self._accumulator.built:
            return np.zeros(noise_scale.STATE_SIZE)
        return self._noise_scale_state()

    def save_own_variables(self, store):
        super().save_own_variables(store)
        state = self._noise_scale_state()
        if state is not None:
            store[_STATE_KEY] = state

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _STATE_KEY in keys:
            state = np.asarray(store[_STATE_KEY])
            store = {k: store[k] for k in keys if k != _STATE_KEY}
            if self._noise_scale:
                self._noise_state = state
                accumulator = self._accumulator
                if accumulator.built and accumulator.noise_state is not None:
                    accumulator.noise_state.assign(
                        state.astype(accumulator.noise_state.dtype)
                    )
        super().load_own_variables(store)
