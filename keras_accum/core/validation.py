"""Argument checks shared by the public API.

Every error names the argument, says what is allowed and echoes the value
received, as Keras does (`keras/src/optimizers/base_optimizer.py`).
"""

import difflib
import sys

import keras

EPOCH = "epoch"
REDUCTIONS = ("mean", "sum")
NONFINITE_POLICIES = ("raise", "skip")


#: The Keras backends `AccumulatingModel` has a train step for.
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def require_supported_backend(what):
    """Raises if Keras runs on a backend keras_accum has no step for."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"`{what}` supports the TensorFlow, JAX and torch backends of "
            "Keras 3; set `KERAS_BACKEND` to \"tensorflow\", \"jax\" or "
            "\"torch\" before "
            "importing keras. Received: "
            f"keras.backend.backend()={backend!r}"
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
            others = (
                ' (or "auto", a dict or a callable schedule)'
                if name == "accumulate" else ""
            )
            raise ValueError(
                f"`{name}` must be \"epoch\" or an int >= 1{others}. "
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


def validate_noise_scale(value, schedule, reduction, micro_batch_size):
    """Checks `noise_scale` against the other arguments.

    Args:
        value: `noise_scale`: `True`, `False` or `None` (on exactly when
            the window follows the noise scale).
        schedule: The model's `WindowSchedule`.
        reduction: The model's `reduction`.
        micro_batch_size: The model's `micro_batch_size`.

    Returns:
        The resolved bool.

    Raises:
        TypeError: if `value` is not a bool or `None`.
        ValueError: if the noise scale cannot be measured: with
            `reduction="sum"` (no batch size to compare), with windows of
            one micro-batch, or turned off under a window that follows it.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            "`noise_scale` must be True, False or None. Received: "
            f"noise_scale={value!r} of type {type(value).__name__}"
        )
    if value is None:
        value = schedule.follows_noise_scale
    elif not value and schedule.follows_noise_scale:
        raise ValueError(
            f"`accumulate={schedule.value!r}` sets the window from the "
            "gradient noise scale, which `noise_scale=False` turns off. "
            "Pass noise_scale=True (or leave it out). Received: "
            "noise_scale=False"
        )
    if value and reduction != "mean":
        raise ValueError(
            "`noise_scale=True` compares the mean gradients of micro-batches "
            "and of the window, and with `reduction=\"sum\"` the applied "
            "gradient is a sum, with no batch size. Use reduction=\"mean\". "
            f"Received: reduction={reduction!r}"
        )
    if value and schedule.value == 1 and micro_batch_size is None:
        raise ValueError(
            "`noise_scale=True` needs windows of at least two micro-batches "
            "(its estimator compares two batch sizes), and `accumulate=1` "
            "applies every batch alone. Pass accumulate >= 2, \"epoch\", "
            "or a `micro_batch_size`. Received: accumulate=1"
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


def validate_choice(value, name, allowed):
    """Checks that `value` is one of the strings in `allowed`."""
    if value not in allowed:
        choices = " or ".join(f'"{a}"' for a in allowed)
        raise ValueError(
            f"`{name}` must be {choices}. Received: {name}={value!r}"
        )
    return value


def reject_unknown_arguments(kwargs, valid, where):
    """Raises for keyword arguments that `where` does not take.

    Names each unknown keyword and, where one is close, the valid keyword
    it may be a misspelling of (`difflib.get_close_matches`).

    Args:
        kwargs: The keyword arguments received.
        valid: The keyword names `where` takes.
        where: What received them, for the message (e.g. `"wrap()"`).

    Raises:
        TypeError: if a key of `kwargs` is not in `valid`.
    """
    unknown = [key for key in kwargs if key not in valid]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        if close:
            hints.append(
                f"`{close[0]}`" if len(unknown) == 1
                else f"`{close[0]}` for `{key}`"
            )
    hint = f" Did you mean {', '.join(hints)}?" if hints else ""
    received = ", ".join(f"{key}={kwargs[key]!r}" for key in unknown)
    raise TypeError(
        f"Argument(s) not recognized by `{where}`: "
        f"{', '.join(f'`{key}`' for key in unknown)}.{hint} Valid keyword "
        f"arguments: {', '.join(sorted(valid))}. Received: {received}"
    )


def validate_fit_arguments(schedule, x, steps_per_epoch, callbacks):
    """Rejects `fit` arguments that would train wrongly or forever.

    Args:
        schedule: The model's `WindowSchedule`.
        x: The `x` argument of `fit`.
        steps_per_epoch: The `steps_per_epoch` argument of `fit`.
        callbacks: The `callbacks` argument of `fit`.

    Raises:
        ValueError: for `accumulate="epoch"` on an infinite dataset without
            `steps_per_epoch` (the epoch, and so the window, never ends), and
            for windows applied mid-epoch combined with
            `BackupAndRestore(save_freq=<int>)` (Keras restores mid-epoch
            weights but restarts the epoch from its first batch, so windows
            would be applied twice).
    """
    # A `tf.data.Dataset` exists only once TensorFlow is imported; on JAX
    # without TensorFlow there is none to check.
    tf = sys.modules.get("tensorflow")
    if (
        steps_per_epoch is None
        and tf is not None
        and isinstance(x, tf.data.Dataset)
        and schedule.uses_epoch_windows
        and x.cardinality() == tf.data.INFINITE_CARDINALITY
    ):
        raise ValueError(
            '`accumulate="epoch"` applies the gradient at the end of each '
            "epoch, and an infinite dataset has no end: pass "
            "`steps_per_epoch` to `fit()`. Received: steps_per_epoch=None "
            "with an infinite `tf.data.Dataset`"
        )
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = callbacks.callbacks
    for callback in callbacks or []:
        save_freq = getattr(callback, "save_freq", None)
        if (
            isinstance(callback, keras.callbacks.BackupAndRestore)
            and isinstance(save_freq, int)
            and not isinstance(save_freq, bool)
            and schedule.applies_mid_epoch
        ):
            raise ValueError(
                "`BackupAndRestore` with an integer `save_freq` saves "
                "mid-epoch weights but restarts the interrupted epoch from "
                "its first batch, so windows applied before the backup would "
                'be applied twice. Use save_freq="epoch", or '
                f'accumulate="epoch". Received: save_freq={save_freq}, '
                f"accumulate={schedule.value!r}"
            )


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


def validate_jax_optimizer(optimizer):
    """Rejects dynamic loss scaling on JAX, which keras_accum does not do
    per micro-batch there (TensorFlow does; `mixed_bfloat16` needs none)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "On the JAX backend, `AccumulatingModel` does not support "
            "dynamic loss scaling (`LossScaleOptimizer`, the default of the "
            "`mixed_float16` policy): an overflowing micro-batch would have "
            "to lower the scale inside the window. Use the "
            "`mixed_bfloat16` policy (no loss scaling; what TPUs use), "
            "float32, or the TensorFlow backend. Received: "
            f"optimizer of type {type(optimizer).__name__}"
        )
