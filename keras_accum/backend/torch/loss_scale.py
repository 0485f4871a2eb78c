"""Dynamic loss scaling per micro-batch on torch, for `mixed_float16`.

Keras wraps the optimizer in a `LossScaleOptimizer` under `mixed_float16`;
it adjusts its scale once per `apply`. With accumulation the scale must
follow every micro-batch instead: each micro-batch's gradient is unscaled
before it is added, and one that overflows is not added and halves the
scale, as a skipped step would (as `backend/tensorflow/loss_scale.py` does
in TensorFlow graphs).
"""

import keras
import torch


def dynamic_scale(optimizer):
    """The loss scale of a `LossScaleOptimizer` (`mixed_float16`), as a
    detached scalar, else `None`."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    return optimizer.dynamic_scale.value.detach()


@torch.no_grad()
def update_dynamic_scale(optimizer, finite):
    """Grows or shrinks the loss scale after one micro-batch, as
    `LossScaleOptimizer` does after a step: the scale must follow every
    micro-batch, and one that overflows is not added (see
    `backend/tensorflow/loss_scale.py`)."""
    if not finite:
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)
    elif int(optimizer.step_counter.value) == (
        optimizer.dynamic_growth_steps - 1
    ):
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 2.0)
    else:
        optimizer.step_counter.assign(optimizer.step_counter + 1)
