"""Dynamic loss scaling per micro-batch, for `mixed_float16` training.

Keras wraps the optimizer in a `LossScaleOptimizer` under `mixed_float16`.
That optimizer adjusts its scale once per `apply`; with accumulation the
scale must follow every micro-batch instead: each micro-batch's gradient is
unscaled before it is added, and one whose scaled gradient overflows is not
added and halves the scale, as a skipped step would.
"""

import tensorflow as tf
from keras import optimizers


def is_dynamic(optimizer):
    """Whether `optimizer` scales the loss dynamically."""
    return isinstance(optimizer, optimizers.LossScaleOptimizer)


def update_dynamic_scale(optimizer, finite):
    """Grows or shrinks `optimizer`'s loss scale after one micro-batch.

    Mirrors `LossScaleOptimizer`: a finite micro-batch counts towards
    `dynamic_growth_steps`, after which the scale doubles; a non-finite one
    halves it and restarts the count. Under a strategy every replica gets
    the same `finite` (a micro-batch that overflows on one replica is
    skipped on all), so the scale stays the same on every replica.
    No-op for other optimizers.

    Args:
        optimizer: The model's optimizer.
        finite: Scalar bool tensor, whether the micro-batch's gradients were
            all finite.
    """
    if not is_dynamic(optimizer):
        return

    def grow():
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 2.0)
        return tf.no_op()

    def count():
        optimizer.step_counter.assign_add(1)
        return tf.no_op()

    def finite_step():
        tf.cond(
            tf.equal(
                optimizer.step_counter, optimizer.dynamic_growth_steps - 1
            ),
            grow,
            count,
        )
        return tf.no_op()

    def shrink():
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)
        return tf.no_op()

    def update(strategy, finite):
        if tf.distribute.in_cross_replica_context():
            finite = strategy.experimental_local_results(finite)[0]
        tf.cond(finite, finite_step, shrink)

    tf.__internal__.distribute.interim.maybe_merge_call(
        update, tf.distribute.get_strategy(), finite
    )
