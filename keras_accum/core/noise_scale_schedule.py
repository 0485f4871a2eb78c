"""`NoiseScaleSchedule`: each epoch's window from the gradient noise scale."""

import math

import keras

from keras_accum.core import validation

#: The smallest window the schedule picks: one micro-batch cannot measure
#: the noise scale (its estimator compares two batch sizes), so a window
#: of 1 would never measure again.
MIN_WINDOW = 2


@keras.saving.register_keras_serializable(package="keras_accum")
class NoiseScaleSchedule:
    """Sets each epoch's window from the measured gradient noise scale.

    McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training")
    show that the gradient noise scale `B_noise = tr(S) / |G|^2` predicts
    the critical batch size: below it a bigger batch buys almost
    proportionally fewer updates, above it mostly wastes examples. At the
    start of every `every`-th epoch the schedule sets the window to

        round(B_noise / normaliser of one batch)

    clipped to `[2, max_window]`, from the estimate the model measured so
    far (`AccumulatingModel.noise_scale_estimate`). The window changes only
    at epoch boundaries, so every window is exact. Until there is an
    estimate, the window is `initial`. A window below 2 cannot measure the
    noise scale, so 2 is the smallest. Where the estimate of `|G|^2` is not
    positive (noise swamps the gradient), the window is `max_window`.

    Pass it as `accumulate`; `accumulate="auto"` is
    `NoiseScaleSchedule()`. It turns `noise_scale` on. The window in force
    is part of the schedule's config, and the estimate is saved with the
    model's state, so training resumes exactly after `load_model`.

    Args:
        max_window: The largest window, an int >= 2. Defaults to 64.
        every: Epochs between window changes, an int >= 1. Defaults to 1.
        initial: The window until the first estimate, an int >= 2.
            Defaults to 2.
        current: The window in force (restored from a config); `None`
            starts at `initial`.

    Example:

    >>> schedule = NoiseScaleSchedule(max_window=32)
    >>> model = AccumulatingModel(inputs, outputs, accumulate=schedule)
    ... # doctest: +SKIP
    """

    def __init__(self, max_window=64, every=1, initial=2, current=None):
        for name, value, least in (
            ("max_window", max_window, MIN_WINDOW),
            ("every", every, 1),
            ("initial", initial, MIN_WINDOW),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or (
                value < least
            ):
                raise ValueError(
                    f"`{name}` must be an int >= {least}. Received: "
                    f"{name}={value!r}"
                )
        if initial > max_window:
            raise ValueError(
                "`initial` must be at most `max_window`. Received: "
                f"initial={initial}, max_window={max_window}"
            )
        self.max_window = max_window
        self.every = every
        self.initial = initial
        self.current = initial if current is None else validation.\
            validate_window(current, name="current")

    def begin_epoch(self, epoch, estimate):
        """Decides the window of `epoch` from `estimate` (a
        `NoiseScaleEstimate`, or `None` before the first)."""
        if estimate is not None and epoch % self.every == 0:
            self.current = self.window_for(estimate)
        return self.current

    def window_for(self, estimate):
        """The rule: `round(B_noise / batch normaliser)`, clipped."""
        if estimate.grad_sq <= 0 or not math.isfinite(estimate.noise_scale):
            return self.max_window
        batches = estimate.noise_scale / max(estimate.batch_normaliser, 1e-12)
        return int(min(self.max_window, max(MIN_WINDOW, round(batches))))

    def __call__(self, epoch):
        """The window in force (as an `accumulate` callable)."""
        return self.current

    def get_config(self):
        return {
            "max_window": self.max_window,
            "every": self.every,
            "initial": self.initial,
            "current": self.current,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"NoiseScaleSchedule(max_window={self.max_window}, "
            f"every={self.every}, initial={self.initial}, "
            f"current={self.current})"
        )
