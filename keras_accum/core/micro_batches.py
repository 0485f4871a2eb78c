"""Micro-batches inside one step: `micro_batch_size` and its split.

With `micro_batch_size=m`, each batch `fit` hands to the train step is
split inside the compiled step into micro-batches of `m` examples per
replica (per device), each forward and backward pass holding one
micro-batch's activations, their gradients added into the accumulators.
The host sees one step per batch; `accumulate` still counts batches.

A batch whose size does not divide by `m` ends with one shorter
micro-batch: its shape is static per trace (JAX, XLA), so it needs no
padding, and every micro-batch is weighted by its own normaliser as any
mini-batch is.

Backend-neutral: the backends' steps loop over the split (`lax.scan` on
JAX, `tf.while_loop` on TensorFlow).
"""

import collections

import keras

AUTO = "auto"


def validate(micro_batch_size, memory_limit):
    """Checks `micro_batch_size` and `memory_limit` together.

    Args:
        micro_batch_size: `None`, an int >= 1 or `"auto"`.
        memory_limit: `None`, or with `"auto"` an int > 0 (bytes).

    Raises:
        TypeError, ValueError: naming the argument and what it takes.
    """
    if isinstance(micro_batch_size, str):
        if micro_batch_size != AUTO:
            raise ValueError(
                "`micro_batch_size` must be None, an int >= 1 or \"auto\". "
                f"Received: micro_batch_size={micro_batch_size!r}"
            )
        if keras.backend.backend() != "jax":
            raise ValueError(
                "`micro_batch_size=\"auto\"` sizes the micro-batch from "
                "XLA's memory accounting of the compiled JAX step; on "
                f"{keras.backend.backend()} set `micro_batch_size` to an "
                "int instead. Received: micro_batch_size=\"auto\" on "
                f"keras.backend.backend()={keras.backend.backend()!r}"
            )
        if (
            isinstance(memory_limit, bool)
            or not isinstance(memory_limit, int)
            or memory_limit <= 0
        ):
            raise ValueError(
                "`micro_batch_size=\"auto\"` needs `memory_limit`, the "
                "bytes one step may use on a device (an int > 0). "
                f"Received: memory_limit={memory_limit!r}"
            )
        return
    if memory_limit is not None:
        raise ValueError(
            "`memory_limit` sizes the micro-batch with "
            "`micro_batch_size=\"auto\"` only. Received: "
            f"memory_limit={memory_limit!r} with "
            f"micro_batch_size={micro_batch_size!r}"
        )
    if micro_batch_size is None:
        return
    if isinstance(micro_batch_size, bool) or not isinstance(
        micro_batch_size, int
    ):
        raise TypeError(
            "`micro_batch_size` must be None, an int >= 1 or \"auto\". "
            f"Received: micro_batch_size={micro_batch_size!r} of type "
            f"{type(micro_batch_size).__name__}"
        )
    if micro_batch_size < 1:
        raise ValueError(
            "`micro_batch_size` must be None, an int >= 1 or \"auto\". "
            f"Received: micro_batch_size={micro_batch_size!r}"
        )


class Split(collections.namedtuple("Split", ["size", "full", "remainder"])):
    """How a batch of one replica splits into micro-batches (static).

    Attributes:
        size: Examples per full micro-batch.
        full: Number of full micro-batches.
        remainder: Examples in the last, shorter micro-batch (0: none).
    """

    __slots__ = ()

    @classmethod
    def of(cls, batch_size, micro_batch_size):
        """The split of `batch_size` examples into `micro_batch_size`s."""
        full, remainder = divmod(batch_size, micro_batch_size)
        return cls(micro_batch_size, full, remainder)


def candidates(batch_size):
    """The micro-batch sizes `"auto"` tries for a batch, largest first:
    the batch itself, then the powers of two below it."""
    sizes = [batch_size]
    power = 1 << (batch_size.bit_length() - 1)
    if power == batch_size:
        power //= 2
    while power >= 1:
        sizes.append(power)
        power //= 2
    return sizes


def largest_fitting(sizes, fits):
    """The largest of `sizes` (descending) for which `fits(size)` holds.

    A binary search: step memory grows with the micro-batch, so it
    compiles about log2(len(sizes)) candidates.

    Returns:
        The size, or `None` when none fits.
    """
    low, high = 0, len(sizes) - 1  # sizes[high] is the smallest.
    if not fits(sizes[high]):
        return None
    while low < high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            high = middle
        else:
            low = middle + 1
    return sizes[low]
