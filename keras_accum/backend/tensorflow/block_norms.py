"""The squared norm of one block of the gradients (`noise_scale.block_size`)
in TensorFlow graphs, for the noise scale: of each micro-batch's gradient
as it is added, and of the window's gradient as it is applied.

On a CPU without XLA each op costs about as much to launch as a small
variable's block to read, so the block is read in few ops: a row of
each large dense gradient, one gather from all the small ones at once, and
a sparse one's rows in the block.
"""

import functools

import numpy as np
import tensorflow as tf

from keras_accum.core import noise_scale

#: A sparse gradient whose blocks are whole rows of at most this many
#: entries is summed per row straight into the block's rows: zero-filling
#: them costs less than deduplicating the rows first (`tf.unique`).
DENSE_SPARSE_BLOCK = 1 << 16


def block_squared_norm(gradients, shapes, block, blocks, dtype):
    """The squared norm of block `block` of `blocks` of gradients.

    Args:
        gradients: Dense tensors or `tf.IndexedSlices` (`None` skipped).
        shapes: The static shapes of their variables.
        block: Scalar int32 tensor, the block to read.
        blocks: Python int, the number of blocks.
        dtype: The result's dtype.

    Returns:
        A scalar tensor: the squared norm of that block of every gradient,
        a sparse one as its dense form (rows of repeated indices summed).
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
        flat = tf.reshape(gradient, [size])
        if c < noise_scale.SMALL_BLOCK:
            small.append(tf.cast(flat, dtype))
            sizes.append(size)
            continue
        # The block's `c` entries as a row of a `(blocks, c)` view, and
        # the rest of the variable when the block is the last. A gather,
        # not `tf.slice`: under XLA a slice's start is a compile-time
        # constant, so the step would be compiled again for every value
        # of the state it is read from, i.e. every window. Cast once
        # read: a half-precision gradient is not copied whole.
        head = flat if size == blocks * c else flat[:blocks * c]
        piece = tf.gather(tf.reshape(head, [blocks, c]), block)
        totals.append(tf.reduce_sum(tf.square(tf.cast(piece, dtype))))
        if size > blocks * c:
            last = tf.cast(tf.equal(block, blocks - 1), dtype)
            rest = tf.cast(flat[blocks * c:], dtype)
            totals.append(last * tf.reduce_sum(tf.square(rest)))
    if small:
        # A trailing zero for the index table's padding.
        values = tf.concat(small + [tf.zeros((1,), dtype)], axis=0)
        table = tf.constant(_block_table(tuple(sizes), blocks))
        piece = tf.gather(values, tf.gather(table, block))
        totals.append(tf.reduce_sum(tf.square(piece)))
    return tf.add_n(totals) if totals else tf.zeros((), dtype)


@functools.cache
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
    """`block_squared_norm` of a sparse gradient: its rows summed per
    index first, as its dense form holds them, and each row's entries
    outside the block left out (a block is a range of the flattened
    variable, so a row's entries in it are a range of its columns)."""
    size = shape.num_elements()
    c = noise_scale.block_size(size, blocks)
    row_size = shape[1:].num_elements()
    if c % row_size == 0:
        rows = c // row_size
        # The last block also holds the remainder's rows.
        block_rows = max(rows, shape[0] - (blocks - 1) * rows)
        if block_rows * row_size <= DENSE_SPARSE_BLOCK:
            return _whole_rows_squared_norm(gradient, block, blocks, rows,
                                            block_rows, dtype)
    start = tf.cast(block, tf.int64) * c
    stop = tf.where(tf.equal(block, blocks - 1), tf.constant(size, tf.int64),
                    start + c)
    rows, index = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(
        gradient.values, index, tf.shape(rows)[0]
    )
    values = tf.cast(tf.reshape(values, [-1, row_size]), dtype)
    first = tf.cast(rows, tf.int64) * row_size
    # The block's columns of each row, `[low, high)`.
    low = tf.cast(tf.clip_by_value(start - first, 0, row_size), tf.int32)
    high = tf.cast(tf.clip_by_value(stop - first, 0, row_size), tf.int32)
    columns = tf.range(row_size)[None, :]
    inside = tf.logical_and(columns >= low[:, None], columns < high[:, None])
    return tf.reduce_sum(
        tf.square(tf.where(inside, values, tf.zeros_like(values)))
    )


def _whole_rows_squared_norm(gradient, block, blocks, rows, block_rows,
                             dtype):
    """`_sparse_block_squared_norm` where each block is `rows` whole rows
    (the last `block_rows`): each listed row is added into the block's
    rows, those of other blocks dropped (a negative segment id)."""
    indices = gradient.indices
    start = tf.cast(block, indices.dtype) * rows
    stop = tf.where(tf.equal(block, blocks - 1),
                    tf.cast(start + block_rows, indices.dtype), start + rows)
    inside = tf.logical_and(indices >= start, indices < stop)
    segments = tf.where(inside, indices - start, -tf.ones_like(indices))
    summed = tf.math.unsorted_segment_sum(gradient.values, segments,
                                          block_rows)
    return tf.reduce_sum(tf.square(tf.cast(summed, dtype)))
