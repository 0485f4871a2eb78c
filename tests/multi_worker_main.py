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
from tests import distribution_cases as cases  # noqa: E402


def main(output_path, accumulate, model_name="dense"):
    keras.backend.set_floatx("float64")
    if model_name == "embedding":
        # `Embedding` + pooling: a sparse gradient, a last global batch of
        # one example (the second worker's shard is empty). SGD, as in
        # `distributed_dropin_test`.
        tokens, _, scores, _ = cases.token_data()
        dataset = tf.data.Dataset.from_tensor_slices((tokens, scores)).batch(
            cases.DROPIN_BATCH
        )
        graph = cases.embedding_pool_graph
        make_optimizer = lambda: keras.optimizers.SGD(  # noqa: E731
            learning_rate=0.1, momentum=0.9
        )
    else:
        x, y, sample_weight = cases.training_data()
        dataset = tf.data.Dataset.from_tensor_slices(
            (x, y, sample_weight)
        ).batch(cases.GLOBAL_BATCH)
        graph = helpers.dense_graph
        make_optimizer = lambda: helpers.make_optimizer("adam")  # noqa: E731
    with strategy.scope():
        model = AccumulatingModel(*graph(), accumulate=accumulate)
        # The optimizer's variables belong to the strategy: create it here.
        model.compile(optimizer=make_optimizer(), loss="mse")
    model.fit(dataset, epochs=2, verbose=0)
    np.savez(output_path, *model.get_weights(),
             iterations=model.optimizer.iterations.numpy())


if __name__ == "__main__":
    window = sys.argv[2]
    main(sys.argv[1], window if window == "epoch" else int(window),
         *sys.argv[3:])
