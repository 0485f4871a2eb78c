"""The accumulator variables, created like optimizer slots.

Backend-neutral: each backend's trainer adds to them in its own way
(`keras_accum/backend/<name>/`).
"""

import keras
import numpy as np

from keras_accum._compat import variables as compat_variables
from keras_accum.core import noise_scale

# Replica-local under `tf.distribute`: a micro-step adds into its own
# replica's copy and needs no communication; reading in cross-replica
# context sums the copies. Backends without replicas ignore it.
_LOCAL_SUM = compat_variables.REPLICA_LOCAL_SUM


def _accumulator_dtype(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    # float16/bfloat16 weights still accumulate in float32: a window sums
    # many micro-batches and half precision would lose the small ones.
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _slot_name(variable, suffix):
    return variable.path.replace("/", "_") + suffix


class GradientAccumulator:
    """Running sums of gradients and of loss normalisers over a window.

    One zero, non-trainable variable per trainable weight (named after the
    weight, ending `_gradient_accumulator`, as Keras names its own) for each
    loss term that is normalised separately (one, unless
    `loss_normalisation="per_loss"`), a vector with each term's normaliser
    sum (examples, valid entries or sample-weight sum), the `mini_step`
    counter of micro-batches in the window, the count of micro-batches
    skipped for non-finite gradients, and the count of windows discarded
    because their sum was not finite. The object is deliberately not a
    `keras.layers.Layer`, so the model does not track these variables:
    `model.weights`, `get_weights()` and saved weights are exactly those of
    the user's layers.

    Attributes:
        variables: The trainable variables the accumulators were built for,
            in order: `gradients[t][i]` holds the gradient of `variables[i]`.
            The window is applied to exactly these variables, so a stale
            pairing cannot happen when the trainable set changes (see
            `matches`).
        gradients: One list of accumulator variables per loss term, in the
            order of `variables`.
        normalisers: Vector variable, each term's normaliser sum.
        mini_step: Int64 scalar variable, micro-batches in this window.
        window: Int64 scalar variable, the current window (0: epoch end).
        skipped: Int64 scalar variable, (global) micro-batches with
            non-finite gradients that were not added, since the start of
            `fit`.
        discarded: Int64 scalar variable, windows not applied because
            their accumulated gradient was not finite, since the start of
            `fit`.
        noise_sums: With `noise_scale=True`, the window's sums for the
            noise scale (`core.noise_scale`), replica-local, zeroed with
            the window; else `None`.
        noise_state: With `noise_scale=True`, the noise scale's moving
            averages, kept across windows and `fit` calls; else `None`.
    """

    def __init__(self):
        self.built = False
        self.variables = []
        self.gradients = []
        self.normalisers = None
        self.mini_step = None
        self.window = None
        self.skipped = None
        self.discarded = None
        self.noise_sums = None
        self.noise_state = None

    def matches(self, trainable_variables, terms):
        """Whether the accumulators were built for exactly these variables
        (the same objects, in the same order) and this many loss terms."""
        return (
            self.built
            and len(self.gradients) == terms
            and len(self.variables) == len(trainable_variables)
            and all(
                a is b for a, b in zip(self.variables, trainable_variables)
            )
        )

    def build(self, trainable_variables, normaliser_dtype, terms=1, window=0,
              noise_state=None):
        """Creates the variables (call under the model's strategy scope).

        Building again replaces every variable: the gradient sums, the
        normalisers and the counters start from zero.

        Args:
            trainable_variables: The variables to accumulate gradients for.
            normaliser_dtype: Dtype of the normaliser sums.
            terms: Number of separately normalised loss terms.
            window: Initial value of the `window` variable (mini-batches
                per update, 0 for epoch windows). An initial value, not an
                assignment, so that building inside a traced step adds no
                op that would run on every step.
            noise_state: The noise scale's state to start from (a NumPy
                vector of `noise_scale.state_size(blocks)`), or `None` when
                the noise scale is off.
        """
        self.variables = list(trainable_variables)
        self.gradients = [
            [
                keras.Variable(
                    initializer="zeros",
                    shape=v.shape,
                    dtype=_accumulator_dtype(v),
                    trainable=False,
                    name=_slot_name(
                        v, f"_{term}_gradient_accumulator" if term else
                        "_gradient_accumulator"
                    ),
                    **_LOCAL_SUM,
                    **self._placement(v),
                )
                for v in trainable_variables
            ]
            for term in range(terms)
        ]
        self.normalisers = keras.Variable(
            initializer="zeros",
            shape=(terms,),
            dtype=normaliser_dtype,
            trainable=False,
            name="normaliser_accumulator",
            **_LOCAL_SUM,
        )
        self.mini_step = self._counter("mini_step")
        self.window = self._counter("window", initial=window)
        self.discarded = self._counter("discarded_windows")
        # Every replica takes the same skip decision (a global micro-batch
        # is skipped whole), so the first replica's count is the count.
        self.skipped = self._counter("skipped_micro_batches")
        self.noise_sums = self.noise_state = None
        if noise_state is not None:
            self.noise_sums = keras.Variable(
                initializer="zeros",
                shape=(noise_scale.SUMS_SIZE,),
                dtype=normaliser_dtype,
                trainable=False,
                name="noise_scale_sums",
                **_LOCAL_SUM,
            )
            # The saved state exactly: a `Constant` of a list would pass
            # through float32 on TensorFlow.
            state = np.asarray(noise_state, dtype=normaliser_dtype)
            self.noise_state = keras.Variable(
                initializer=lambda shape, dtype: keras.ops.convert_to_tensor(
                    state, dtype=dtype
                ),
                shape=state.shape,
                dtype=normaliser_dtype,
                trainable=False,
                name="noise_scale_state",
                aggregation="only_first_replica",
            )
        self.built = True

    def _placement(self, variable):
        """Extra `keras.Variable` arguments placing the accumulator of
        `variable` (a backend may shard it as `variable`)."""
        return {}

    @staticmethod
    def _counter(name, initial=0):
        return keras.Variable(
            initializer=keras.initializers.Constant(initial),
            shape=(),
            # Keras' own counter dtype (`optimizer.iterations`): int64 on
            # TensorFlow, int32 on JAX (int64 there warns without x64).
            dtype="int",
            trainable=False,
            name=name,
            aggregation="only_first_replica",
        )

    def noise_variables(self):
        """The noise scale's variables (none when it is off)."""
        if self.noise_state is None:
            return []
        return [self.noise_sums, self.noise_state]

    def state_variables(self):
        """Every variable of the window, in a fixed order: the gradient
        sums (term by term), the normalisers, the counters and the noise
        scale's variables."""
        return [v for term in self.gradients for v in term] + [
            self.normalisers,
            self.mini_step,
            self.window,
            self.skipped,
            self.discarded,
        ] + self.noise_variables()
