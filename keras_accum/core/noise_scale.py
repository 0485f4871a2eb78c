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
two-batch-size estimators.

Reading each micro-batch's whole gradient once more for its squared norm
is a pass over memory as large as the weights, about a tenth of a small
micro-step on a CPU. So the weights are cut into `BLOCKS` fixed blocks
(each variable, flattened, into `BLOCKS` contiguous pieces: `block_size`)
and a window reads one block of each micro-batch's gradient and of its
own: the `w`-th window that measures reads block `w mod BLOCKS` (a
window that cannot measure leaves the next window its block), a choice
made before the window's data is seen. (Windows of a whole epoch read
one block that is the whole gradient: `blocks_for`.) The estimators
above, restricted to block `q`, estimate that block's share of `tr(S)`
and `|G|^2` without bias. Each block's two estimates are smoothed with
an exponential moving average over the windows that measure it,
numerator and denominator apart, as the paper does; summed over the
blocks they are `tr(S)` and `|G|^2`, and their ratio is
`B_simple = tr(S) / |G|^2`, the noise scale.

A micro-batch adds `|a_i^(q)|^2 / b_i` (block `q` of its added gradient
`a_i = b_i g_i`) and `1` (when not empty) to two replica-local sums:
under a `tf.distribute` strategy each replica's shard is a micro-batch of
its own. The window's update reads them once, with its normalisers.
Written with `keras.ops`, so the same arithmetic runs in every backend's
step.
"""

import collections

import keras
import numpy as np
from keras import ops

from keras_accum.core import validation

#: Decay of each block's moving averages, per window that measures it.
DECAY = 0.9
#: The blocks each variable is cut into when windows are counted in
#: batches; a window reads one.
BLOCKS = 8

# The moving averages' state, a vector variable of `state_size(blocks)`:
# per block, the averages of its trace and squared-norm estimates and the
# weight both are divided by (the sum of the averaging weights, as Adam's
# bias correction); then the average normaliser of one `fit` batch (for
# `NoiseScaleSchedule`) and its weight, and the block the next window
# reads. `_layout` gives the slices of a state of any size.
_BATCH_NORMALISER, _BATCH_WEIGHT = -3, -2
#: The state's entry holding the block the next window reads.
BLOCK = -1
# The window's sums: `Q` and the count of non-empty micro-batches.
SUMS_SIZE = 2
#: A normaliser at most this is an empty micro-batch: Keras < 3.13 divides
#: a masked mean by `valid + epsilon()`, so a fully masked micro-batch has
#: the normaliser `epsilon()` (1e-7), not 0.
EMPTY = keras.config.epsilon()
#: A variable whose blocks hold fewer elements than this is read with the
#: other small ones, in one reduction: on a CPU one reduction per small
#: variable costs more in launches than in reads.
SMALL_BLOCK = 4096


def blocks_for(schedule_value):
    """The number of blocks for windows of `schedule_value`
    (`WindowSchedule.value`): `BLOCKS`, or 1 (the whole gradient each
    window) for windows of a whole epoch, which would otherwise need
    `BLOCKS` epochs to measure every block once."""
    return 1 if schedule_value == validation.EPOCH else BLOCKS


def state_size(blocks):
    """The length of the state vector with `blocks` blocks."""
    return 3 * blocks + 3


def blocks_of(state):
    """The number of blocks of a state vector (from its static length)."""
    return (int(state.shape[0]) - 3) // 3


def _layout(blocks):
    """The state's `(trace, grad_sq, weight)` slices for `blocks`."""
    return (
        slice(0, blocks),
        slice(blocks, 2 * blocks),
        slice(2 * blocks, 3 * blocks),
    )


def block_size(size, blocks):
    """The length of a variable's blocks but the last: `size // blocks`.

    A variable of `size` elements, flattened, is cut into `blocks` pieces:
    block `q < blocks - 1` holds elements `[q c, (q + 1) c)` with
    `c = block_size(size, blocks)`, the last block the rest,
    `[(blocks - 1) c, size)` (the whole variable when it has fewer than
    `blocks` elements).
    """
    return int(size) // blocks


def block_bounds(size, block, blocks):
    """`(start, stop)`: the flat elements of block `block` (a Python int)
    of a variable of `size` elements (see `block_size`)."""
    c = block_size(size, blocks)
    return block * c, (size if block == blocks - 1 else (block + 1) * c)


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
    """The `NoiseScaleEstimate` of a state vector, or `None` until every
    block has been measured.

    Args:
        state: The moving averages' state, as a NumPy array.
    """
    state = np.asarray(state, dtype="float64")
    trace_slice, grad_sq_slice, weight_slice = _layout(blocks_of(state))
    weights = state[weight_slice]
    if not np.all(weights > 0):
        return None
    trace = float(np.sum(state[trace_slice] / weights))
    grad_sq = float(np.sum(state[grad_sq_slice] / weights))
    return NoiseScaleEstimate(
        noise_scale=trace / grad_sq if grad_sq != 0 else float("inf"),
        trace=trace,
        grad_sq=grad_sq,
        batch_normaliser=float(
            state[_BATCH_NORMALISER] / state[_BATCH_WEIGHT]
        ),
    )


def window_block(state):
    """The block the current window reads (scalar int32 tensor).

    Args:
        state: The moving averages' state.
    """
    return ops.cast(state[BLOCK], "int32")


def block_squared_norm(gradients, block, blocks, dtype):
    """The squared norm of block `block` (a scalar tensor) of `blocks` of
    a list of dense tensors (`None` skipped), in `dtype`.

    Reads that block only: a dynamic slice of each large tensor, reduced
    on its own (XLA fuses the slice into the reduction), and the small
    tensors' pieces gathered into one vector, reduced once. JAX's step
    reads the block here; TensorFlow reads it in `backend/tensorflow/
    block_norms.py` (no slice at a traced start, sparse gradients) and
    torch in views of the flat tensors (`block_pieces`), both by the same
    `block_bounds`.
    """
    last = ops.cast(ops.equal(block, blocks - 1), dtype)
    total = ops.zeros((), dtype)
    small = []
    for gradient in gradients:
        if gradient is None:
            continue
        flat = ops.cast(ops.reshape(gradient, (-1,)), dtype)
        c = block_size(flat.shape[0], blocks)
        if c >= SMALL_BLOCK:
            total = total + ops.sum(
                ops.square(ops.slice(flat, [block * c], [c]))
            )
        elif c:
            small.append(ops.slice(flat, [block * c], [c]))
        if flat.shape[0] > blocks * c:
            small.append(flat[blocks * c:] * last)
    if small:
        total = total + ops.sum(ops.square(ops.concatenate(small)))
    return total


def micro_batch_sums(added_squared_norm, normaliser):
    """What one micro-batch adds to the window's sums.

    Args:
        added_squared_norm: `|a_i^(q)|^2`, the squared norm of the
            window's block of the gradient the micro-batch added (its mean
            gradient times `b_i`).
        normaliser: `b_i`, its normaliser (0 for an empty or a skipped
            micro-batch, which adds nothing).

    Returns:
        A vector `[|a_i^(q)|^2 / b_i, 1 if the micro-batch is not empty]`,
        in the dtype of `normaliser`.
    """
    dtype = normaliser.dtype
    zero = ops.zeros((), dtype)
    counted = ops.cast(ops.greater(normaliser, EMPTY), dtype)
    # Neither needs the gradient: a graph computes them beside the
    # backward pass, and only a multiply and an add wait for the norm.
    weight = ops.stack([ops.divide_no_nan(counted, normaliser), zero])
    base = ops.stack([zero, counted])
    return ops.cast(added_squared_norm, dtype) * weight + base


def updated_state(state, sums, window_squared_norm, normaliser, batches):
    """The moving averages after one applied window.

    Args:
        state: The state vector before the window.
        sums: The window's sums over every replica: `[Q, n]`.
        window_squared_norm: `|G_B^(q)|^2`, the squared norm of the
            window's block (`window_block`) of the gradient it applies
            (before clipping).
        normaliser: `B`, the window's summed normaliser.
        batches: The `fit` batches in the window.

    Returns:
        The new state vector: where the window can measure (two
        micro-batches or more, finite estimates), its block's averages
        updated and the next block the next window's; otherwise the same.
    """
    dtype = state.dtype
    q, n = sums[0], sums[1]
    g2 = ops.cast(window_squared_norm, dtype)
    total = ops.cast(normaliser, dtype)
    trace = ops.divide_no_nan(q - total * g2, n - 1)
    grad_sq = g2 - ops.divide_no_nan(trace, total)
    valid = ops.logical_and(
        ops.logical_and(ops.greater_equal(n, 2), ops.greater(total, 0)),
        ops.logical_and(ops.isfinite(trace), ops.isfinite(grad_sq)),
    )
    blocks = blocks_of(state)
    trace_slice, grad_sq_slice, weight_slice = _layout(blocks)
    block = window_block(state)
    # The window's block where it measured: one-hot, else all zero.
    mask = ops.one_hot(block, blocks, dtype=dtype) * ops.cast(valid, dtype)
    keep = 1 - (1 - DECAY) * mask

    def average(values, new):
        # `where` first: 0 times a non-finite estimate is NaN.
        new = ops.where(valid, new, ops.zeros((), dtype))
        return keep * values + (1 - DECAY) * mask * new

    measured = ops.stack([
        ops.divide_no_nan(total, ops.cast(batches, dtype)),
        ops.ones((), dtype),
    ])
    batch_state = ops.stack([state[_BATCH_NORMALISER], state[_BATCH_WEIGHT]])
    return ops.concatenate([
        average(state[trace_slice], trace),
        average(state[grad_sq_slice], grad_sq),
        average(state[weight_slice], ops.ones((), dtype)),
        ops.where(
            valid, DECAY * batch_state + (1 - DECAY) * measured, batch_state
        ),
        # The next block only after a measuring window: a window that
        # cannot measure (one micro-batch left at an epoch's end) in the
        # same place every epoch would otherwise skip the same blocks for
        # ever. Either way the choice is made before the window's data.
        ops.reshape(
            ops.cast(ops.where(valid, ops.mod(block + 1, blocks), block),
                     dtype),
            (1,),
        ),
    ])
