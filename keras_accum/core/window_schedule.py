"""`accumulate` as a schedule: the accumulation window of each epoch."""

import keras

from keras_accum.core import validation
from keras_accum.core.noise_scale_schedule import NoiseScaleSchedule

#: `accumulate="auto"`: a `NoiseScaleSchedule()`.
AUTO = "auto"

# The window of `accumulate="epoch"` as stored in the model's window
# variable: never applied in-step, only at epoch end.
EPOCH_WINDOW = 0


class WindowSchedule:
    """Resolves `accumulate` to the window of each epoch.

    `accumulate` is `"epoch"`, an int >= 1, a dict `{first_epoch: window}`
    (each key is the first epoch its window applies to, as in Lightning's
    `GradientAccumulationScheduler`; key `0` is required) or a callable
    `epoch -> window`. Growing the window instead of decaying the learning
    rate follows Smith et al. 2017, "Don't Decay the Learning Rate, Increase
    the Batch Size". A `NoiseScaleSchedule` (or `"auto"`, the default
    one) sets the window from the measured gradient noise scale.

    Args:
        accumulate: The user's `accumulate` argument.

    Raises:
        TypeError, ValueError: if `accumulate` or a window in it is invalid.
    """

    def __init__(self, accumulate):
        if isinstance(accumulate, str) and accumulate == AUTO:
            accumulate = NoiseScaleSchedule()
        self.value = accumulate
        if isinstance(accumulate, dict):
            self._validate_dict(accumulate)
            self._starts = sorted(accumulate)
        elif callable(accumulate) and not isinstance(accumulate, str):
            pass
        else:
            validation.validate_window(accumulate)

    @property
    def is_static(self):
        """Whether every epoch has the same window."""
        return not (isinstance(self.value, dict) or callable(self.value))

    @property
    def follows_noise_scale(self):
        """Whether the window follows the measured noise scale."""
        return isinstance(self.value, NoiseScaleSchedule)

    def begin_epoch(self, epoch, estimate):
        """Lets a `NoiseScaleSchedule` decide the window of `epoch` from
        the model's `NoiseScaleEstimate` (or `None`)."""
        if self.follows_noise_scale:
            self.value.begin_epoch(epoch, estimate)

    @property
    def uses_epoch_windows(self):
        """Whether some epoch may apply its window only at epoch end."""
        if self.follows_noise_scale:
            return False
        if isinstance(self.value, dict):
            return validation.EPOCH in self.value.values()
        return callable(self.value) or self.value == validation.EPOCH

    @property
    def applies_mid_epoch(self):
        """Whether some epoch may apply a window before its end."""
        if isinstance(self.value, dict):
            return any(w != validation.EPOCH for w in self.value.values())
        # `accumulate=1` is plain Keras training, with Keras' own rules.
        return callable(self.value) or self.value not in (validation.EPOCH, 1)

    def window(self, epoch):
        """The window of `epoch`: `"epoch"` or an int >= 1."""
        if isinstance(self.value, dict):
            start = max(s for s in self._starts if s <= epoch)
            return self.value[start]
        if callable(self.value):
            return validation.validate_window(
                self.value(epoch), name=f"accumulate({epoch})"
            )
        return self.value

    def window_size(self, epoch):
        """The window of `epoch` as an int, `EPOCH_WINDOW` for `"epoch"`."""
        window = self.window(epoch)
        return EPOCH_WINDOW if window == validation.EPOCH else window

    @staticmethod
    def _validate_dict(schedule):
        for key, window in schedule.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise ValueError(
                    "The keys of an `accumulate` schedule must be epochs, "
                    f"ints >= 0. Received: accumulate={schedule!r} with key "
                    f"{key!r}"
                )
            validation.validate_window(window, name=f"accumulate[{key}]")
        if 0 not in schedule:
            raise ValueError(
                "An `accumulate` schedule must give the window of epoch 0 "
                f"(key 0). Received: accumulate={schedule!r}"
            )

    def get_config(self):
        """A JSON-friendly form of `accumulate` for `Model.get_config`."""
        if isinstance(self.value, dict):
            return {"schedule": {str(k): v for k, v in self.value.items()}}
        if callable(self.value):
            return {"callable": keras.saving.serialize_keras_object(self.value)}
        return self.value


def accumulate_from_config(config):
    """Inverse of `WindowSchedule.get_config`."""
    if isinstance(config, dict) and "schedule" in config:
        return {int(k): v for k, v in config["schedule"].items()}
    if isinstance(config, dict) and "callable" in config:
        return keras.saving.deserialize_keras_object(config["callable"])
    return config
