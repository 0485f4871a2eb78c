"""`WindowPlan`: how a window's sums become the applied gradient."""

import collections


class WindowPlan(collections.namedtuple(
    "WindowPlan", ["divides", "gradient_exists"], defaults=[(True,), None]
)):
    """How a window's sums become the applied gradient; static per trace.

    A namedtuple of Python bools, so a `tf.function` taking it retraces
    only when it changes.

    Attributes:
        divides: Per loss term, whether its window sum is divided by its
            summed normaliser.
        gradient_exists: Per accumulated variable, whether the step gives
            it a gradient (`None`: all do). Those without one are passed to
            the optimizer as `None`, as plain Keras does.
    """

    __slots__ = ()


def gradient_exists(term_gradients):
    """Per variable, whether some loss term gave it a gradient."""
    return tuple(
        any(gradients[i] is not None for gradients in term_gradients)
        for i in range(len(term_gradients[0]))
    )
