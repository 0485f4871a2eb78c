"""The `keras.Variable` arguments of replica-local accumulators.

Serves `accumulators`: under `tf.distribute` each accumulator is a
replica-local variable, which needs `keras.Variable(synchronization=...,
aggregation=...)`, new in Keras 3.10. Verified at import; checked on Keras
3.10.0 to 3.15.1.
"""

import inspect

import keras

from keras_accum._compat import versions


def _variable_init():
    """The first `__init__` up `keras.Variable`'s MRO that names its
    parameters: up to Keras 3.11, the JAX backend's `Variable.__init__(self,
    *args, layout=None, **kwargs)` passes them on to `KerasVariable`'s."""
    for cls in keras.Variable.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if not {inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD} <= kinds:
            return init
    return keras.Variable.__init__


versions.require_parameters(
    _variable_init(), ("synchronization", "aggregation"),
    "keras.Variable (Keras >= 3.10)",
)

#: The `keras.Variable` arguments of a replica-local sum (on TensorFlow,
#: `tf.VariableSynchronization.ON_READ` and `tf.VariableAggregation.SUM`).
REPLICA_LOCAL_SUM = {"synchronization": "on_read", "aggregation": "sum"}
