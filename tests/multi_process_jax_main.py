"""One process of the two-process `keras.distribution` test on JAX.

Run by `multi_process_jax_test.py` as
`python multi_process_jax_main.py PROCESS_ID PORT OUTPUT_DIR`, once per
process, all on 127.0.0.1. This is how JAX trains beyond one machine (TPU
pods, multi-host GPU): every process calls `keras.distribution.initialize`,
one `DataParallel` spans every process's devices, and each process feeds its
own shard of every global batch (`auto_shard_dataset=False`).

Each process has two host CPU devices and talks to the other over gloo (JAX's
CPU collectives). It trains every case of `CASES` in turn (one pair of
processes for all of them: starting JAX and the cluster is most of a case's
time), in float64, and saves each case's final weights to
`<OUTPUT_DIR>/<case>.npz`.

The module doubles as the cases' definition: the test imports it (nothing
below `main` runs on import) for the data and the model of its reference.
"""

import os
import sys

PROCESSES = 2
LOCAL_DEVICES = 2
# Each process's share of a step's global batch of 16: 4 per device.
LOCAL_BATCH = 8
# Examples per process: 6 steps per epoch, the last one of 6 per process
# (3 per device: a ragged last micro-batch with `micro_batch_size=2`).
SHARD = 46
EPOCHS = 2

# Model arguments of each case. A new `AccumulatingModel` argument (such as
# `micro_batch_size`) is one more entry.
CASES = {
    # Windows of 4 steps, then the epoch's last 2.
    "every-4": {"accumulate": 4},
    "epoch": {"accumulate": "epoch"},
    # Each device's 4 examples of a step in micro-batches of 2 (of 2 and 1
    # in the last step).
    "every-4-micro-batch-2": {"accumulate": 4, "micro_batch_size": 2},
}
# The naive method (average the steps' mean gradients) trained the same way:
# the test checks that it misses the reference, so the comparison can fail.
NAIVE_CASE = "naive-every-4"
NAIVE_ACCUMULATE = 4


def padded_sequences():
    """All processes' examples: `normalisation_test`'s token ids padded
    with 0, and labels, imported once Keras is configured.

    Sorted by length: process 0's shard holds the short sequences, process
    1's the long ones, so the processes' valid-token counts differ at every
    step (and the steps' counts differ too).
    """
    from tests import normalisation_test

    return normalisation_test.padded_sequences(n=PROCESSES * SHARD, seed=0)


def shard(process_id):
    """The examples process `process_id` feeds to `fit`."""
    tokens, labels = padded_sequences()
    rows = slice(process_id * SHARD, (process_id + 1) * SHARD)
    return tokens[rows], labels[rows]


def global_order():
    """Rows of `padded_sequences` in the order of the global batches.

    A step's global batch is every process's local batch of that step,
    process after process: the big batch a single process would see.
    """
    import numpy as np

    order = []
    for start in range(0, SHARD, LOCAL_BATCH):
        stop = min(start + LOCAL_BATCH, SHARD)
        for process in range(PROCESSES):
            order.extend(range(process * SHARD + start, process * SHARD + stop))
    return np.array(order)


def sequence_graph():
    """Inputs and outputs of `normalisation_test`'s masked sequence tagger
    (`mask_zero=True`: the loss is divided by the number of valid tokens),
    imported once Keras is configured."""
    from tests import normalisation_test

    return normalisation_test.sequence_graph()


def compile_model(model):
    import keras

    # SGD with momentum; the reference compiles the same way.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _start(process_id, port):
    """Configures JAX and joins the cluster; returns Keras."""
    # Before JAX initialises its CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    ).strip()
    os.environ["KERAS_BACKEND"] = "jax"
    # Without TensorFlow, as on a TPU host: `keras.utils.set_random_seed`
    # (which `initialize` calls) would import an installed TensorFlow only
    # to seed it, several seconds per process.
    sys.modules["tensorflow"] = None
    import jax

    jax.config.update("jax_enable_x64", True)
    # Cross-process collectives of CPU devices (the default is none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import keras
    from keras.src.backend.common import dtypes

    # As conftest.py does for the reference: float64 stays float64 in
    # `ops.mean` and `tanh` (Keras maps it to float32 on JAX).
    dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process_id,
    )
    return keras


def _distribute(keras):
    """Sets float64 and one `DataParallel` over every process's devices.

    Again for every case: `keras.backend.clear_session` forgets both.
    """
    keras.backend.set_floatx("float64")
    devices = keras.distribution.list_devices()
    assert len(devices) == PROCESSES * LOCAL_DEVICES, devices
    mesh = keras.distribution.DeviceMesh(
        (len(devices),), ["batch"], devices=devices
    )
    # NumPy input, split by hand: each process passes its own shard.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            device_mesh=mesh, auto_shard_dataset=False
        )
    )


def main(process_id, port, output_dir):
    keras = _start(process_id, port)
    import numpy as np

    # The repository, after an installed keras_accum (as pytest's
    # `--import-mode=append`), for `tests.helpers`.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_accum import AccumulatingModel
    from tests import helpers

    tokens, labels = shard(process_id)
    runs = [(name, AccumulatingModel, kwargs) for name, kwargs in CASES.items()]
    runs.append((NAIVE_CASE, helpers.NaiveAveragingModel,
                 {"accumulate": NAIVE_ACCUMULATE}))
    for name, model_class, kwargs in runs:
        helpers.fresh_keras_state()
        _distribute(keras)
        model = model_class(*sequence_graph(), **kwargs)
        compile_model(model)
        model.fit(tokens, labels, batch_size=LOCAL_BATCH, epochs=EPOCHS,
                  shuffle=False, verbose=0)
        # `get_weights` gathers each (replicated) weight to this process.
        np.savez(os.path.join(output_dir, f"{name}.npz"), *model.get_weights(),
                 iterations=int(model.optimizer.iterations.numpy()))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
