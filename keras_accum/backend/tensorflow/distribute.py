"""`tf.distribute` helpers: multi-worker fixes."""

import tensorflow as tf


def is_multi_worker(strategy):
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` across workers."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def first_local_batch(strategy, batch):
    """One replica's part of a distributed batch, for shape inference.

    Keras reduces a distributed batch with `strategy.reduce("MEAN", ...)` only
    to learn shapes before building the model; under a multi-worker strategy
    that reduction fails (keras-team/keras#20585). A local part serves as well.
    """

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def rank_one_logs(logs):
    """Reshapes scalar logs to shape `(1,)`.

    Keras' train function reduces per-replica logs with
    `strategy.reduce("MEAN", value, axis=0)` under a multi-worker strategy,
    which fails on scalars; a length-1 vector reduces to the same mean.
    """
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, (1,)) if v.shape.rank == 0 else v, logs
    )
