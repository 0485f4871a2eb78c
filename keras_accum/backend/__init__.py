"""Each Keras backend's half of `AccumulatingModel`.

As Keras mixes its backend's trainer into `keras.Model`
(`keras/src/models/model.py`), `AccumulationTrainer` is the train step of
the backend Keras runs on: `backend/tensorflow/trainer.py` or
`backend/jax/trainer.py` or `backend/torch/trainer.py`. Only that backend
is imported, so `import keras_accum` on JAX or torch never imports
TensorFlow.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_accum.backend.tensorflow.trainer import (
        TensorFlowAccumulationTrainer as AccumulationTrainer,
    )
elif _BACKEND == "jax":
    from keras_accum.backend.jax.trainer import (
        JAXAccumulationTrainer as AccumulationTrainer,
    )
elif _BACKEND == "torch":
    from keras_accum.backend.torch.trainer import (
        TorchAccumulationTrainer as AccumulationTrainer,
    )
else:
    # `AccumulatingModel.__init__` raises, naming the supported backends.
    from keras_accum.core.accumulators import (
        GradientAccumulator as _GradientAccumulator,
    )

    class AccumulationTrainer:
        accumulator_class = _GradientAccumulator
