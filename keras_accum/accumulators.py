"""Replica-local gradient accumulators, created like optimizer slots."""

import keras
import tensorflow as tf

# Replica-local: a micro-step adds into its own replica's copy and needs no
# communication; reading in cross-replica context sums the copies.
_LOCAL_SUM = {"synchronization": "on_read", "aggregation": "sum"}


def _accumulator_dtype(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    # float16/bfloat16 weights still accumulate in float32: a window sums
    # many micro-batches and half precision would lose the small ones.
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _slot_name(variable, suffix):
    return variable.path.replace("/", "_") + suffix


class GradientAccumulator:
    """Running sums of gradients and of the loss normaliser over a window.

    One zero, non-trainable variable per trainable weight (named after the
    weight, ending `_gradient_accumulator`, as Keras names its own), one for
    the normaliser (examples, valid tokens or sample-weight sum) and the
    `mini_step` counter of micro-batches in the current window. The object is
    deliberately not a `keras.layers.Layer`, so the model does not track these
    variables: `model.weights`, `get_weights()` and saved weights are exactly
    those of the user's layers.

    Attributes:
        gradients: List of accumulator variables, in the order of the
            trainable variables passed to `build`.
        normaliser: Scalar variable, sum of the micro-batch normalisers.
        mini_step: Int64 scalar variable, micro-batches in this window.
    """

    def __init__(self):
        self.built = False
        self.gradients = []
        self.normaliser = None
        self.mini_step = None
        # The traced epoch-end apply function; kept here, off the model, so
        # neither Keras nor SavedModel export tracks it.
        self.apply_function = None

    def build(self, trainable_variables, normaliser_dtype):
        """Creates the variables (call under the model's strategy scope)."""
        if self.built:
            return
        self.gradients = [
            keras.Variable(
                initializer="zeros",
                shape=v.shape,
                dtype=_accumulator_dtype(v),
                trainable=False,
                name=_slot_name(v, "_gradient_accumulator"),
                **_LOCAL_SUM,
            )
            for v in trainable_variables
        ]
        self.normaliser = keras.Variable(
            initializer="zeros",
            shape=(),
            dtype=normaliser_dtype,
            trainable=False,
            name="normaliser_accumulator",
            **_LOCAL_SUM,
        )
        self.mini_step = keras.Variable(
            initializer="zeros",
            shape=(),
            dtype="int64",
            trainable=False,
            name="mini_step",
            aggregation="only_first_replica",
        )
        self.built = True

    def add(self, gradients, normaliser):
        """Adds one micro-batch (replica context: local, no communication)."""
        for accumulator, gradient in zip(self.gradients, gradients):
            if gradient is None:
                continue
            variable = accumulator.value
            if isinstance(gradient, tf.IndexedSlices):
                variable.scatter_add(
                    tf.IndexedSlices(
                        tf.cast(gradient.values, variable.dtype),
                        gradient.indices,
                        gradient.dense_shape,
                    )
                )
            else:
                variable.assign_add(tf.cast(gradient, variable.dtype))
        self.normaliser.value.assign_add(
            tf.cast(normaliser, self.normaliser.dtype)
        )
        self.mini_step.value.assign_add(1)

    def reset(self):
        """Zeroes every accumulator and the counter."""
        for variable in self.gradients + [self.normaliser, self.mini_step]:
            # Assigning a constant: reading an on-read variable in
            # cross-replica context would sum the replicas first.
            # (and `read_value=False`: returning the new value would too).
            variable.value.assign(
                tf.zeros(variable.shape, variable.dtype), read_value=False
            )

    @property
    def variables(self):
        return self.gradients + [self.normaliser, self.mini_step]
