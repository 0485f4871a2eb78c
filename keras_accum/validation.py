"""Argument checks shared by the public API.

Every error names the argument, says what is allowed and echoes the value
received, as Keras does (`keras/src/optimizers/base_optimizer.py`).
"""

import keras

EPOCH = "epoch"
REDUCTIONS = ("mean", "sum")


def require_tensorflow_backend(what):
    """Raises if Keras does not run on the TensorFlow backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"`{what}` requires the TensorFlow backend of Keras 3 (it uses "
            "`tf.GradientTape` and `tf.distribute`). Set "
            "`KERAS_BACKEND=tensorflow` before importing keras. "
            f"Received: keras.backend.backend()={backend!r}"
        )


def validate_window(value, name="accumulate"):
    """Checks one accumulation window: `"epoch"` or an int >= 1.

    Args:
        value: The window to check.
        name: The argument name used in the error message.

    Returns:
        The window, unchanged.

    Raises:
        TypeError: if `value` is neither a string nor an int (a `bool` is
            rejected even though it is an int).
        ValueError: if `value` is a string other than `"epoch"` or an
            int < 1.
    """
    if isinstance(value, str):
        if value != EPOCH:
            raise ValueError(
                f"`{name}` must be \"epoch\" or an int >= 1. "
                f"Received: {name}={value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be \"epoch\" or an int >= 1. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be \"epoch\" or an int >= 1. "
            f"Received: {name}={value!r}"
        )
    return value


def validate_reduction(value):
    """Checks `reduction`: `"mean"` or `"sum"`."""
    if value not in REDUCTIONS:
        raise ValueError(
            "`reduction` must be one of \"mean\" or \"sum\". "
            f"Received: reduction={value!r}"
        )
    return value


def validate_optimizer(optimizer):
    """Rejects an optimizer that accumulates gradients itself."""
    inner = getattr(optimizer, "inner_optimizer", None)
    for candidate in (optimizer, inner):
        steps = getattr(candidate, "gradient_accumulation_steps", None)
        if steps:
            raise ValueError(
                "The optimizer passed to `compile()` has "
                "`gradient_accumulation_steps` set, so gradients would be "
                "accumulated twice. Use `AccumulatingModel(accumulate=...)` "
                "and an optimizer with `gradient_accumulation_steps=None`. "
                f"Received: gradient_accumulation_steps={steps}"
            )
