"""Exact gradient accumulation for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_accum.accumulating_model import AccumulatingModel
from keras_accum.accumulating_model import wrap
from keras_accum.core import loss_normalisers as _loss_normalisers  # noqa: F401
from keras_accum.core.noise_scale import NoiseScaleEstimate
from keras_accum.core.noise_scale_schedule import NoiseScaleSchedule
from keras_accum.flush_callback import ApplyAccumulatedGradients
from keras_accum.update_tensorboard import UpdateTensorBoard
from keras_accum.version import __version__

__all__ = [
    "AccumulatingModel",
    "ApplyAccumulatedGradients",
    "NoiseScaleEstimate",
    "NoiseScaleSchedule",
    "UpdateTensorBoard",
    "wrap",
    "__version__",
]
