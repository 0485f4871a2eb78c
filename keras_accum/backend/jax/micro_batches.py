"""Splitting a JAX step's batch into micro-batches, and sizing them.

A batch under `keras.distribution` is one global array sharded over the
devices of the mesh's batch axis, each device holding a contiguous block
of rows. A micro-batch takes the same rows from every device's block, so
it stays sharded as the batch was and every device computes on its own
rows, as `DataParallel` does with the whole batch.
"""

import jax
import keras
from jax import numpy as jnp

from keras_accum._compat import trainer as compat_trainer
from keras_accum.core import micro_batches

_MIB = 2.0**20


def batch_size(data):
    """The examples in a batch (its leaves' leading dimension)."""
    return next(
        leaf for leaf in jax.tree_util.tree_leaves(data) if leaf is not None
    ).shape[0]


def data_parallel_devices(batch):
    """The devices a batch of `batch` examples is split over: the size of
    the distribution's batch axis, or 1 (no distribution, or a batch that
    does not divide evenly, which is then split as one block)."""
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if name is None:
        return 1
    mesh = distribution.device_mesh
    devices = dict(zip(mesh.axis_names, mesh.shape)).get(name, 1)
    return devices if batch % devices == 0 else 1


def full_micro_batches(data, devices, split):
    """The full micro-batches of `data`, stacked on a new leading axis
    (for `jax.lax.scan`): micro-batch `i` holds rows `i * size` to
    `(i + 1) * size` of each device's block."""

    def stack(leaf):
        rest = leaf.shape[1:]
        shards = leaf.reshape((devices, -1) + rest)
        shards = shards[:, : split.full * split.size]
        shards = shards.reshape((devices, split.full, split.size) + rest)
        return jnp.swapaxes(shards, 0, 1).reshape(
            (split.full, devices * split.size) + rest
        )

    return jax.tree_util.tree_map(stack, data)


def last_micro_batch(data, devices, split):
    """The shorter last micro-batch: each device block's last rows."""

    def last(leaf):
        rest = leaf.shape[1:]
        shards = leaf.reshape((devices, -1) + rest)
        return shards[:, split.full * split.size:].reshape((-1,) + rest)

    return jax.tree_util.tree_map(last, data)


def step_memory(model, state, data):
    """The peak memory of `model`'s train step on one device, as XLA
    accounts it: arguments plus outputs, less the outputs that reuse the
    donated state's buffers, plus temporaries (activations, gradients).

    Args:
        model: The model.
        state: The step's state, arrays or `jax.ShapeDtypeStruct`s.
        data: A batch, likewise.

    Returns:
        Bytes.
    """
    # Jitted as Keras jits it (`JAXTrainer.make_train_function`). A new
    # function: JAX refuses to trace a jitted function inside its own
    # trace, which is where `choose` runs.
    step = jax.jit(
        lambda state, data: model.train_step(state, data), donate_argnums=0
    )
    analysis = step.lower(state, data).compile().memory_analysis()
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def choose(model, state, data, memory_limit):
    """The largest micro-batch whose compiled step fits `memory_limit`.

    Compiles the model's train step for candidate sizes (the device's
    batch, then powers of two below it; a binary search, since memory
    grows with the micro-batch) on one device's share of the batch, and
    reads XLA's memory accounting of each (`step_memory`): chosen before
    the step runs, not by catching out-of-memory errors.

    Args:
        model: The `AccumulatingModel`.
        state: The train step's state (arrays or tracers).
        data: The batch.
        memory_limit: Bytes the step may use on a device.

    Returns:
        The micro-batch size, per device.

    Raises:
        ValueError: if even a micro-batch of one example does not fit.
    """
    devices = data_parallel_devices(batch_size(data))
    shard = batch_size(data) // devices

    def spec(leaf, rows=None):
        shape = tuple(leaf.shape)
        if rows is not None:
            shape = (rows,) + shape[1:]
        return jax.ShapeDtypeStruct(shape, leaf.dtype)

    state_specs = jax.tree_util.tree_map(spec, state)
    data_specs = jax.tree_util.tree_map(lambda v: spec(v, shard), data)
    measured = {}

    def fits(size):
        # One device's program: its share of the batch, no distribution.
        distribution = keras.distribution.distribution()
        model._functions.micro_batch_override = size
        keras.distribution.set_distribution(None)
        try:
            measured[size] = step_memory(model, state_specs, data_specs)
        finally:
            keras.distribution.set_distribution(distribution)
            model._functions.micro_batch_override = None
        return measured[size] <= memory_limit

    sizes = micro_batches.candidates(shard)
    size = micro_batches.largest_fitting(sizes, fits)
    if size is None:
        raise ValueError(
            "`micro_batch_size=\"auto\"` found no micro-batch whose step "
            f"fits `memory_limit`: one example needs "
            f"{measured[sizes[-1]] / _MIB:.1f} MiB. Raise `memory_limit` or "
            "use a smaller model. Received: "
            f"memory_limit={memory_limit} ({memory_limit / _MIB:.1f} MiB)"
        )
    compat_trainer.print_msg(
        f"keras_accum: micro_batch_size=\"auto\" chose {size} for batches "
        f"of {shard} per device (step memory "
        f"{measured[size] / _MIB:.1f} MiB of the "
        f"{memory_limit / _MIB:.1f} MiB memory_limit)."
    )
    return size
