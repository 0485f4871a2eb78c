"""One worker of the two-process `MultiWorkerMirroredStrategy` test.

Run by `distribution_test.py` with `TF_CONFIG` set; trains in float64 and
saves the final weights to the path given as the first argument.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# The strategy must exist before any other TensorFlow op runs.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_accum import AccumulatingModel  # noqa: E402
from tests import helpers  # noqa: E402
from tests.distribution_cases import GLOBAL_BATCH  # noqa: E402
from tests.distribution_cases import training_data  # noqa: E402


def main(output_path, accumulate):
    keras.backend.set_floatx("float64")
    x, y, sample_weight = training_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(
        GLOBAL_BATCH
    )
    with strategy.scope():
        model = AccumulatingModel(
            *helpers.dense_graph(), accumulate=accumulate
        )
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(dataset, epochs=2, verbose=0)
    np.savez(output_path, *model.get_weights(),
             iterations=model.optimizer.iterations.numpy())


if __name__ == "__main__":
    window = sys.argv[2]
    main(sys.argv[1], window if window == "epoch" else int(window))
