"""Private, experimental variants of the library's step (profiling only).

Nothing here is used by the main benchmark tables, which measure the real
`keras_accum`. `profile_step.py` times these variants beside the library to
put numbers on suggested library changes. They subclass the library and
override one or two of its private methods, so a change of the library's
internals can break them; the profile then records the error instead of a
time. Each is checked to train to the library's weights.
"""

import tensorflow as tf

from keras_accum.accumulating_model import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel


class XlaMicroStepAccumulatingModel(FunctionalAccumulatingModel):
    """`jit_compile=True` for the micro-step only; the window apply runs
    outside XLA.

    With `compile(jit_compile=True)`, Keras compiles the whole step with XLA,
    including the `tf.cond` that applies the window. An XLA conditional
    returns every variable either branch writes, so every micro-step copies
    the weights, the optimizer slots and the accumulators, even when the
    window is not full. Here the library's step is compiled as a nested
    `tf.function(jit_compile=True)` whose call to `_apply_window_when` is
    deferred, and the deferred call runs in the ordinary graph after it.
    """

    _micro_step_jit = False
    _micro_step = None
    _defer_apply = False
    _deferred = None

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        requested = bool(self.jit_compile)
        self._micro_step_jit = requested
        self._micro_step = None
        self._jit_compile = False
        try:
            return super().make_train_function(force=force)
        finally:
            self._jit_compile = requested

    def _apply_window_when(self, condition, divides):
        if self._defer_apply:
            self._deferred = (condition, divides)
            return None
        return super()._apply_window_when(condition, divides)

    def train_step(self, data):
        if not self._micro_step_jit:
            return super().train_step(data)
        if self._micro_step is None:

            def micro_step(batch):
                self._defer_apply = True
                try:
                    return AccumulatingModel.train_step(self, batch)
                finally:
                    self._defer_apply = False

            self._micro_step = tf.function(micro_step, jit_compile=True)
        self._deferred = None
        logs = self._micro_step(data)
        if self._deferred is not None:
            condition, divides = self._deferred
            AccumulatingModel._apply_window_when(self, condition, divides)
        return logs


class _XlaApplyMixin:
    """Runs the library's window apply (`_apply_window`: divide by the
    normaliser, optimizer update, reset) as one XLA-compiled function.

    The micro-step is unchanged and the `tf.cond` stays outside XLA, so
    nothing is copied on micro-steps that do not apply; the apply itself
    runs fused (Keras' Adam is ~20 separate element-wise ops per weight
    without XLA).
    """

    _xla_apply = None

    def _apply_window(self, strategy, divides):
        if self._xla_apply is None:
            parent = super()

            def apply_window():
                parent._apply_window(strategy, divides)
                return tf.constant(True)

            self._xla_apply = tf.function(apply_window, jit_compile=True)
        return self._xla_apply()


class XlaApplyAccumulatingModel(_XlaApplyMixin, FunctionalAccumulatingModel):
    """XLA for the window apply only (micro-steps run without XLA)."""


class XlaSplitAccumulatingModel(_XlaApplyMixin, XlaMicroStepAccumulatingModel):
    """XLA for the micro-step and, separately, for the window apply."""
