"""Splitting one replica's batch into micro-batches inside a TensorFlow step.

The sizes are read from the batch's shape: Python ints when the traced
shape is static, shape arithmetic otherwise (Keras traces its step with
`reduce_retracing`, so the batch dimension may be unknown), which XLA folds
to compile-time constants.
"""

import tensorflow as tf


class Split:
    """How one replica's batch splits into micro-batches of `size`.

    The first micro-batch holds `min(size, batch)` examples; `full` more
    micro-batches of `size` follow, then the last `remainder` examples.

    Args:
        data: The replica's batch (a nest of tensors).
        size: Examples per micro-batch, an int >= 1.

    Attributes:
        is_static: Whether the sizes below are Python ints.
        full: Full micro-batches after the first (int or scalar tensor).
        remainder: Examples in the shorter last one (int or scalar
            tensor; 0: none).
    """

    def __init__(self, data, size):
        self._data = data
        leaf = next(v for v in tf.nest.flatten(data) if v is not None)
        batch = leaf.shape[0]
        self.is_static = batch is not None
        if not self.is_static:
            batch = tf.shape(leaf)[0]
        self._batch = batch
        self._size = size
        self._first = (
            min(size, batch) if self.is_static else tf.minimum(size, batch)
        )
        rest = batch - self._first
        self.full = rest // size
        self.remainder = rest - self.full * size

    def has_more(self):
        """Whether there may be micro-batches after the first."""
        return not self.is_static or self._batch > self._size

    def first(self):
        """The first micro-batch."""
        return self._rows(0, self._first)

    def full_micro_batches(self):
        """The full micro-batches after the first, stacked on a new
        leading axis: read micro-batch `i` with `micro_batch(stack, i)`.

        Stacked, not sliced at `first + i * size`: a slice of a static
        size longer than a short batch fails XLA's compile even where
        the loop would run no iteration."""

        def stack(leaf):
            rows = leaf[self._first:self._first + self.full * self._size]
            return tf.reshape(
                rows,
                tf.concat(
                    [[self.full, self._size], tf.shape(leaf)[1:]], axis=0
                ),
            )

        return tf.nest.map_structure(
            lambda leaf: None if leaf is None else stack(leaf), self._data
        )

    def last(self):
        """The shorter last micro-batch (empty when `remainder` is 0)."""
        return self._rows(self._batch - self.remainder, self.remainder)

    @staticmethod
    def micro_batch(stack, index):
        """Micro-batch `index` of `full_micro_batches()`."""
        return tf.nest.map_structure(
            lambda leaf: None if leaf is None else tf.gather(leaf, index),
            stack,
        )

    def _rows(self, start, length):
        def rows(leaf):
            if leaf is None:
                return None
            if isinstance(leaf, tf.Tensor) and leaf.shape.rank is not None:
                # `tf.slice`: under XLA a dynamic start with a static size.
                rank = leaf.shape.rank
                return tf.slice(
                    leaf, [start] + [0] * (rank - 1),
                    [length] + [-1] * (rank - 1),
                )
            return leaf[start:start + length]  # Ragged and sparse inputs.

        return tf.nest.map_structure(rows, self._data)
