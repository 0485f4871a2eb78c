"""The gradient noise scale, measured from the window's own gradients.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
Appendix A: the squared norm of a batch's mean gradient over `b` examples
has expectation `|G|^2 + tr(S) / b`, where `G` is the true gradient and
`S` the per-example gradient covariance. A window already holds two batch
sizes: each micro-batch (normaliser `b_i`, gradient `g_i`) and the whole
window (normaliser `B = sum(b_i)`, gradient `G_B`). With `n` non-empty
micro-batches and `Q = sum(b_i |g_i|^2)`,

    E[Q] = B |G|^2 + n tr(S)        E[B |G_B|^2] = B |G|^2 + tr(S)

so `(Q - B |G_B|^2) / (n - 1)` estimates `tr(S)` and `|G_B|^2 - tr(S) / B`
estimates `|G|^2`, both without bias, for micro-batches of any sizes (a
ragged last batch, masked tokens): with equal sizes they are the paper's
two-batch-size estimators. Each is smoothed with an exponential moving
average over windows, numerator and denominator apart, as the paper does;
their ratio is `B_simple = tr(S) / |G|^2`, the noise scale.

A micro-batch adds `|a_i|^2 / b_i` (its added gradient `a_i = b_i g_i`)
and `1` to two replica-local sums: under a `tf.distribute` strategy each
replica's shard is a micro-batch of its own. The window's update reads
them once, with its normalisers. Written with `keras.ops`, so the same
arithmetic runs in every backend's step.
"""

import collections

import keras
import numpy as np
from keras import ops

#: Decay of the moving averages, per window.
DECAY = 0.9

# The moving averages' state, a vector variable: the averages of the
# trace and squared-norm estimates, the weight both are divided by (the
# sum of the averaging weights, as Adam's bias correction), and the
# average normaliser of one `fit` batch (for `NoiseScaleSchedule`).
TRACE, GRAD_SQ, WEIGHT, BATCH_NORMALISER = range(4)
STATE_SIZE = 4
# The window's sums: `Q` and the count of non-empty micro-batches.
SUMS_SIZE = 2
#: A normaliser at most this is an empty micro-batch: Keras < 3.13 divides
#: a masked mean by `valid + epsilon()`, so a fully masked micro-batch has
#: the normaliser `epsilon()` (1e-7), not 0.
EMPTY = keras.config.epsilon()


class NoiseScaleEstimate(collections.namedtuple(
    "NoiseScaleEstimate",
    ["noise_scale", "trace", "grad_sq", "batch_normaliser"],
)):
    """The smoothed estimate of the gradient noise scale.

    Attributes:
        noise_scale: `B_simple = tr(S) / |G|^2`, in the units of the loss's
            normaliser (examples, valid tokens or sample-weight sum): the
            batch size around which a bigger batch stops buying updates.
        trace: `tr(S)`, the trace of the per-example gradient covariance.
        grad_sq: `|G|^2`, the squared norm of the true gradient.
        batch_normaliser: The average normaliser of one `fit` batch, so
            `noise_scale / batch_normaliser` is the noise scale in batches.
    """

    __slots__ = ()

    def logs(self):
        """The estimate as epoch logs: `noise_scale`, `noise_scale_trace`
        and `noise_scale_grad_sq`."""
        return {
            "noise_scale": self.noise_scale,
            "noise_scale_trace": self.trace,
            "noise_scale_grad_sq": self.grad_sq,
        }


#: The epoch logs before any window has measured the noise scale.
NO_ESTIMATE_LOGS = {
    "noise_scale": float("nan"),
    "noise_scale_trace": float("nan"),
    "noise_scale_grad_sq": float("nan"),
}


def estimate(state):
    """The `NoiseScaleEstimate` of a state vector, or `None` before the
    first window with two micro-batches.

    Args:
        state: The moving averages' state, as a NumPy array.
    """
    state = np.asarray(state, dtype="float64")
    weight = state[WEIGHT]
    if weight <= 0:
        return None
    trace, grad_sq = state[TRACE] / weight, state[GRAD_SQ] / weight
    return NoiseScaleEstimate(
        noise_scale=float(state[TRACE] / state[GRAD_SQ])
        if state[GRAD_SQ] != 0 else float("inf"),
        trace=float(trace),
        grad_sq=float(grad_sq),
        batch_normaliser=float(state[BATCH_NORMALISER] / weight),
    )


def squared_norm(gradients):
    """The squared norm of a list of dense tensors (`None` skipped)."""
    return sum(
        ops.sum(ops.square(g)) for g in gradients if g is not None
    )


def micro_batch_sums(added_squared_norm, normaliser):
    """What one micro-batch adds to the window's sums.

    Args:
        added_squared_norm: `|a_i|^2`, the squared norm of the gradient
            the micro-batch added (its mean gradient times `b_i`).
        normaliser: `b_i`, its normaliser (0 for an empty or a skipped
            micro-batch, which adds nothing).

    Returns:
        A vector `[|a_i|^2 / b_i, 1 if the micro-batch is not empty]`, in
        the dtype of `normaliser`.
    """
    dtype = normaliser.dtype
    return ops.stack([
        ops.divide_no_nan(ops.cast(added_squared_norm, dtype), normaliser),
        ops.cast(ops.greater(normaliser, EMPTY), dtype),
    ])


def updated_state(state, sums, window_squared_norm, normaliser, batches):
    """The moving averages after one applied window.

    Args:
        state: The state vector before the window.
        sums: The window's sums over every replica: `[Q, n]`.
        window_squared_norm: `|G_B|^2`, the squared norm of the gradient
            the window applies (before clipping).
        normaliser: `B`, the window's summed normaliser.
        batches: The `fit` batches in the window.

    Returns:
        The new state vector; the old one where the window cannot measure
        (fewer than two micro-batches, or a value that is not finite).
    """
    dtype = state.dtype
    q, n = sums[0], sums[1]
    g2 = ops.cast(window_squared_norm, dtype)
    total = ops.cast(normaliser, dtype)
    trace = ops.divide_no_nan(q - total * g2, n - 1)
    grad_sq = g2 - ops.divide_no_nan(trace, total)
    measured = ops.stack([
        trace,
        grad_sq,
        ops.ones((), dtype),
        ops.divide_no_nan(total, ops.cast(batches, dtype)),
    ])
    valid = ops.logical_and(
        ops.logical_and(ops.greater_equal(n, 2), ops.greater(total, 0)),
        ops.all(ops.isfinite(measured)),
    )
    averaged = DECAY * state + (1 - DECAY) * measured
    return ops.where(valid, averaged, state)
