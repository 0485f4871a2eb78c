"""Time per epoch under `tf.distribute.MirroredStrategy` on logical CPUs.

Runs in a freshly spawned interpreter: the logical CPU devices must be
configured before TensorFlow runs its first op. The same configurations are
also timed without a strategy in the same process (interleaved), which
separates the cost of the strategy from that of the accumulation method.
A configuration that fails to build or train is recorded with its error.
"""

import methods
import timing


def measure_distributed(devices, k, global_batch, examples, rounds,
                        learning_rate, model="mlp", optimizer="adam",
                        quick=False):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices
    )
    logical = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(logical)
    configs = [
        {"method": "plain_b", "k": 1},
        {"method": "plain_kb", "k": k},
        {"method": "builtin", "k": k},
        {"method": "keras_accum", "k": k},
        {"method": "keras_accum_epoch", "k": None},
    ]
    if quick:
        configs = [c for c in configs
                   if c["method"] in ("builtin", "keras_accum")]
    rows = timing.time_group(
        model, optimizer, ks=(k,), examples=examples, rounds=rounds,
        micro_batch=global_batch, learning_rate=learning_rate,
        configs=configs,
        strategies={"mirrored": strategy, "none": None},
    )
    return {
        "devices": logical,
        "replicas": strategy.num_replicas_in_sync,
        "global_batch": global_batch,
        "per_replica_batch": global_batch // strategy.num_replicas_in_sync,
        "model": model,
        "optimizer": optimizer,
        "k": k,
        "rows": rows,
        "method_labels": {c["method"]: methods.LABELS[c["method"]]
                          for c in configs},
    }
