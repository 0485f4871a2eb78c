"""Subclasses that write their own `train_step`.

Research and GAN-style code overrides `train_step`. Such a step bypasses
`AccumulatingModel.train_step`, so without a check it would train with
whatever the override does, per mini-batch, and `accumulate` would be
silently ignored. `AccumulatingModel.__init_subclass__` wraps every
overriding `train_step` with `checked_train_step`: when the step is traced
(before any of its ops runs), it must have accumulated, either through
`super().train_step(data)` or through `self.accumulate_gradients(...)`;
otherwise `fit` raises.
"""

import functools

import keras

# Marks `AccumulatingModel.train_step` and the wrappers of overrides.
_OWN_STEP = "_keras_accum_own_step"
_CHECKED = "_keras_accum_checked_step"


def own_step(function):
    """Marks `function` as keras_accum's own `train_step`."""
    setattr(function, _OWN_STEP, True)
    return function


def overrides_train_step(model):
    """Whether `model`'s class replaces `AccumulatingModel.train_step`."""
    return not getattr(type(model).train_step, _OWN_STEP, False)


def count_accumulation(model):
    """Records, at trace time, that the step accumulated a mini-batch."""
    model._functions.accumulations += 1


def checked_train_step(train_step):
    """Wraps an overriding `train_step` so that it must accumulate.

    Args:
        train_step: The subclass's `train_step(self, data)`.

    Returns:
        The wrapped function. It raises `TypeError` when a call (a trace,
        inside `fit`) of a model whose `accumulate` is not 1 neither called
        `super().train_step` nor `self.accumulate_gradients`.
    """
    if getattr(train_step, _CHECKED, False):
        return train_step

    @functools.wraps(train_step)
    def wrapped(self, *args):
        # `(data)` on TensorFlow and torch, `(state, data)` on JAX.
        before = self._functions.accumulations
        saved = _first_eager_call(self)
        try:
            result = train_step(self, *args)
        except Exception as error:
            # On JAX the state holds the accumulators after the optimizer's
            # variables, so a step that hands it to the optimizer itself
            # fails inside Keras; say why instead.
            if len(args) == 2 and self._functions.accumulations == before:
                raise _refusal(self, "raised before accumulating") from error
            raise
        if self._functions.accumulations == before and (
            self.accumulate != 1 or self.micro_batch_size is not None
        ):
            _restore(saved)
            raise _refusal(self, "did neither")
        self._functions.custom_step_checked = True
        return result

    setattr(wrapped, _CHECKED, True)
    return wrapped


def _first_eager_call(model):
    """The model's and optimizer's variable values before the first call
    of an overriding step on torch, else `None`.

    TensorFlow and JAX check a step while tracing it, before any of its
    ops runs; torch runs it eagerly, so a step that applies its own update
    has changed the weights by the time it is refused. The values are
    put back then, so the refusal loses nothing the user trained.
    """
    if keras.backend.backend() != "torch" or getattr(
        model._functions, "custom_step_checked", False
    ):
        return None
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return [(v, keras.ops.copy(v.value)) for v in variables]


def _restore(saved):
    for variable, value in saved or ():
        variable.assign(value)


def _refusal(model, received):
    return TypeError(
        f"`{type(model).__name__}.train_step` overrides "
        "`AccumulatingModel.train_step` and accumulated no gradient, "
        "so its updates would ignore "
        f"accumulate={model.accumulate!r} and "
        f"micro_batch_size={model.micro_batch_size!r}. From a custom "
        "`train_step`, call `super().train_step(...)`, or on TensorFlow "
        "pass each mini-batch's gradients to "
        "`self.accumulate_gradients(gradients, normaliser)` instead "
        "of calling the optimizer (the window is then applied as "
        "usual). For a step that applies its own updates, subclass "
        "`keras.Model` or pass accumulate=1 and micro_batch_size=None. "
        "Received: a `train_step` "
        f"that {received}"
    )
