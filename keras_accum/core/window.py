"""The window's arithmetic, shared by every backend's step.

When a window is full, whether its sums may be applied, and the gradient
a window applies: each loss term's sum divided by its window-wide
normaliser. Written with `keras.ops`, so that the same code runs inside a
traced JAX or TensorFlow step and in PyTorch's eager one.
"""

from keras import ops


def is_full(schedule, mini_step, window):
    """Whether a window of `mini_step` mini-batches is full.

    Args:
        schedule: The model's `WindowSchedule`.
        mini_step: Mini-batches accumulated (scalar).
        window: The current window's size from the accumulators (0: the
            epoch); read only for schedules that change per epoch.

    Returns:
        A scalar bool.
    """
    if schedule.is_static:
        return ops.greater_equal(mini_step, schedule.value)
    return ops.logical_and(
        ops.greater(window, 0), ops.greater_equal(mini_step, window)
    )


def all_finite(values):
    """Whether every entry of every tensor in `values` is finite (scalar
    bool; `None` entries are skipped)."""
    return ops.all(
        ops.stack(
            [ops.all(ops.isfinite(v)) for v in values if v is not None]
        )
    )


def window_gradient(sums, normalisers, plan):
    """The gradient a window applies.

    Args:
        sums: One list of gradient sums per loss term.
        normalisers: Vector, each term's summed normaliser.
        plan: The step's `WindowPlan`: which terms are divided by their
            normaliser, and which variables got a gradient (the others
            get `None`, as plain Keras passes them to the optimizer).

    Returns:
        One gradient (or `None`) per variable: each term's sum, divided by
        its normaliser where the term is averaged, summed over terms. An
        empty term (normaliser 0) adds 0, as Keras' `divide_no_nan`.
    """
    gradient = None
    for term, term_sums in enumerate(sums):
        if plan.divides[term]:
            normaliser = normalisers[term]
            term_sums = [
                ops.divide_no_nan(s, ops.cast(normaliser, s.dtype))
                for s in term_sums
            ]
        gradient = (
            list(term_sums) if gradient is None
            else [a + b for a, b in zip(gradient, term_sums)]
        )
    exists = plan.gradient_exists or (True,) * len(gradient)
    return [g if e else None for g, e in zip(gradient, exists)]
