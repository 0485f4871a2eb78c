"""Private, experimental variants of the library's step (profiling only).

Nothing here is used by the main benchmark tables, which measure the real
`keras_accum`. `profile_step.py` times these variants beside the library to
put numbers on suggested library changes. They subclass the library and
override one or two of its private methods, so a change of the library's
internals can break them; the profile then records the error instead of a
time. Each is checked to train to the library's weights.
"""

import tensorflow as tf

from keras_accum.accumulating_model import FunctionalAccumulatingModel


class XlaApplyAccumulatingModel(FunctionalAccumulatingModel):
    """Runs the library's window update (`_apply_local_sums`: divide by
    the normaliser, optimizer update, reset) as one XLA-compiled function.

    The micro-step is unchanged and the `tf.cond` stays outside XLA, so
    nothing is copied on micro-steps that do not apply; the apply itself
    runs fused (Keras' Adam is ~20 separate element-wise ops per weight
    without XLA). The library does this only under `jit_compile=True`;
    this variant measures it without.
    """

    _xla_apply = None

    def _apply_window(self, strategy, normalisers, divides):
        if self._xla_apply is None:
            self._xla_apply = tf.function(
                self._apply_local_sums, jit_compile=True
            )
        self._xla_apply(normalisers, divides)
        return tf.no_op()
