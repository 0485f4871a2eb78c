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

        `None` when `noise_scale` is off, and until every block of the
        weights has been read: each window of at least two micro-batches
        reads one of 8 (`noise_scale.BLOCKS`), so after the eighth such
        window (the first, with `accumulate="epoch"`).
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
            return self._empty_noise_state()
        return self._noise_state

    def _empty_noise_state(self):
        """The state before any window: zeros, one block per window of a
        whole epoch (`noise_scale.blocks_for`)."""
        return np.zeros(noise_scale.state_size(
            noise_scale.blocks_for(self._schedule.value)
        ))

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
            return self._empty_noise_state()
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
                expected = self._empty_noise_state().shape
                if state.shape != expected:
                    raise ValueError(
                        "The saved noise-scale state does not fit this "
                        f"model: it has shape {state.shape}, this model's "
                        f"has shape {expected} (saved by another version "
                        "of keras_accum, or with another `accumulate`). "
                        f"Received: a state of shape {state.shape}"
                    )
                self._noise_state = state
                accumulator = self._accumulator
                if accumulator.built and accumulator.noise_state is not None:
                    accumulator.noise_state.assign(
                        state.astype(accumulator.noise_state.dtype)
                    )
        super().load_own_variables(store)
