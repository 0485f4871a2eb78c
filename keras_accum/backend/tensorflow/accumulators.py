"""Adding to, checking and zeroing the accumulators in TensorFlow graphs.

Replica-local (`ON_READ`) variables: a micro-step adds into its own
replica's copy and needs no communication.
"""

import functools

import numpy as np
import tensorflow as tf

from keras_accum.core import noise_scale
from keras_accum.core.accumulators import GradientAccumulator


class TensorFlowGradientAccumulator(GradientAccumulator):
    """`GradientAccumulator` with its TensorFlow graph operations."""

    def add(self, term_gradients, normalisers):
        """Adds one micro-batch (replica context: local, no communication).

        Args:
            term_gradients: One list of gradients per loss term.
            normalisers: Vector of each term's normaliser for this batch.
        """
        for accumulators, gradients in zip(self.gradients, term_gradients):
            for accumulator, gradient in zip(accumulators, gradients):
                if gradient is None:
                    continue
                variable = accumulator.value
                if isinstance(gradient, tf.IndexedSlices):
                    gradient = tf.IndexedSlices(
                        tf.cast(gradient.values, variable.dtype),
                        gradient.indices,
                        gradient.dense_shape,
                    )
                    if not isinstance(
                        variable, tf.distribute.DistributedValues
                    ):
                        # One device: add only the rows the batch touched.
                        variable.scatter_add(gradient)
                        continue
                    # Replica-local (ON_READ) variables have no
                    # `scatter_add`; the dense sum (`unsorted_segment_sum`
                    # over the rows, duplicates added) is as exact.
                    gradient = tf.convert_to_tensor(gradient)
                # `assign(sum + g)`, not `assign_add(g)`: measured 9%
                # faster per epoch on the benchmark MLP (2 CPU cores), as
                # fast as Keras' own accumulation, which does this.
                variable.assign(
                    variable + tf.cast(gradient, variable.dtype),
                    read_value=False,
                )
        normalisers = tf.cast(normalisers, self.normalisers.dtype)
        self.normalisers.value.assign_add(normalisers, read_value=False)
        if self.noise_sums is not None:
            # The set's gradients as added (one set: `noise_scale` refuses
            # more): the window's block of them.
            state = tf.convert_to_tensor(self.noise_state.value)
            self.noise_sums.value.assign_add(
                noise_scale.micro_batch_sums(
                    _block_squared_norm(
                        term_gradients[0],
                        [a.value.shape for a in self.gradients[0]],
                        noise_scale.window_block(state),
                        noise_scale.blocks_of(state),
                        self.noise_sums.dtype,
                    ),
                    normalisers[0],
                ),
                read_value=False,
            )

    def count_micro_batch(self):
        """Counts one micro-batch of the window, added or skipped."""
        self.mini_step.value.assign_add(1, read_value=False)

    def local_sums_are_finite(self):
        """Whether this replica's gradient sums are all finite (scalar bool).

        Replica context. Once per window, so it can afford an element-wise
        check: a sum of finite gradients can overflow, which a check of the
        sum alone would mistake for a non-finite gradient.
        """
        return tf.reduce_all(
            tf.stack(
                [
                    tf.reduce_all(tf.math.is_finite(v.value))
                    for term in self.gradients
                    for v in term
                ]
            )
        )

    def discard(self):
        """Drops the window without applying it, and counts it."""
        self.discarded.value.assign_add(1, read_value=False)
        self.reset()

    def reset(self):
        """Zeroes the gradient sums, normalisers and the window counter."""
        for term in self.gradients:
            for accumulator in term:
                variable = accumulator.value
                # `sum * 0` through `multiply_no_nan` is 0 even for a NaN or
                # infinite sum. Not `tf.zeros(shape)`: grappler folds that
                # into a graph constant as large as the variable, held for
                # the graph's lifetime at every place that resets (measured:
                # +17 MiB on a 5 MiB model). In cross-replica context the
                # read sums the replicas, and the product is zero all the
                # same.
                variable.assign(
                    tf.math.multiply_no_nan(
                        variable.read_value(), tf.zeros((), variable.dtype)
                    ),
                    read_value=False,
                )
        for variable in [self.normalisers, self.mini_step] + (
            [] if self.noise_sums is None else [self.noise_sums]
        ):
            # Assigning a constant (small): reading an on-read variable in
            # cross-replica context would sum the replicas first.
            variable.value.assign(
                tf.zeros(variable.shape, variable.dtype), read_value=False
            )


def _block_squared_norm(gradients, shapes, block, blocks, dtype):
    """The squared norm of block `block` (scalar int32 tensor) of `blocks`
    (see `noise_scale.block_size`) of gradients (`None` skipped) of
    variables of static `shapes`, in `dtype`.

    Reads that block only, in few ops (each op costs about as much to
    launch as a small variable's block to read): a slice of each large
    dense gradient, one gather from all the small ones at once, and a
    sparse one's rows in the block.
    """
    totals, small, sizes = [], [], []
    for gradient, shape in zip(gradients, shapes):
        if gradient is None:
            continue
        size = shape.num_elements()
        c = noise_scale.block_size(size, blocks)
        if isinstance(gradient, tf.IndexedSlices):
            totals.append(_sparse_block_squared_norm(
                gradient, shape, block, blocks, dtype
            ))
            continue
        flat = tf.cast(tf.reshape(gradient, [size]), dtype)
        if c < noise_scale.SMALL_BLOCK:
            small.append(flat)
            sizes.append(size)
            continue
        # Static sizes, as XLA needs: the block's `c` entries, and the rest
        # of the variable when the block is the last.
        totals.append(tf.reduce_sum(tf.square(tf.slice(flat, [block * c],
                                                       [c]))))
        if size > blocks * c:
            last = tf.cast(tf.equal(block, blocks - 1), dtype)
            totals.append(last * tf.reduce_sum(tf.square(flat[blocks * c:])))
    if small:
        # A trailing zero for the index table's padding.
        values = tf.concat(small + [tf.zeros((1,), dtype)], axis=0)
        table = tf.constant(_block_table(tuple(sizes), blocks))
        piece = tf.gather(values, tf.gather(table, block))
        totals.append(tf.reduce_sum(tf.square(piece)))
    return tf.add_n(totals) if totals else tf.zeros((), dtype)


@functools.lru_cache(maxsize=None)
def _block_table(sizes, blocks):
    """`(blocks, length)` int32: row `q` lists the entries of block `q` of
    variables of `sizes` concatenated flat, padded with the index of the
    entry after them."""
    rows = [[] for _ in range(blocks)]
    offset = 0
    for size in sizes:
        for q in range(blocks):
            start, stop = noise_scale.block_bounds(size, q, blocks)
            rows[q].append(np.arange(offset + start, offset + stop))
        offset += size
    rows = [np.concatenate(row) for row in rows]
    table = np.full((blocks, max(len(row) for row in rows)), offset)
    for q, row in enumerate(rows):
        table[q, :len(row)] = row
    return table.astype(np.int32)


def _sparse_block_squared_norm(gradient, shape, block, blocks, dtype):
    """`_block_squared_norm` of a sparse gradient: its rows summed per
    index first, as its dense form holds them, and each row's entries
    outside the block left out (a block is a range of the flattened
    variable, so a row's entries in it are a range of its columns)."""
    size = shape.num_elements()
    c = noise_scale.block_size(size, blocks)
    start = tf.cast(block, tf.int64) * c
    stop = tf.where(tf.equal(block, blocks - 1), tf.constant(size, tf.int64),
                    start + c)
    rows, index = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(
        gradient.values, index, tf.shape(rows)[0]
    )
    row_size = shape[1:].num_elements()
    values = tf.cast(tf.reshape(values, [-1, row_size]), dtype)
    first = tf.cast(rows, tf.int64) * row_size
    if c % row_size == 0:
        # Blocks of whole rows: a row is in the block or not.
        inside = tf.logical_and(first >= start, first < stop)
        squares = tf.reduce_sum(tf.square(values), axis=1)
        return tf.reduce_sum(tf.where(inside, squares, tf.zeros_like(squares)))
    # The block's columns of each row, `[low, high)`.
    low = tf.cast(tf.clip_by_value(start - first, 0, row_size), tf.int32)
    high = tf.cast(tf.clip_by_value(stop - first, 0, row_size), tf.int32)
    columns = tf.range(row_size)[None, :]
    inside = tf.logical_and(columns >= low[:, None], columns < high[:, None])
    return tf.reduce_sum(
        tf.square(tf.where(inside, values, tf.zeros_like(values)))
    )
