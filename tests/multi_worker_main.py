"""One worker of the two-process `MultiWorkerMirroredStrategy` test.

Run by `distribution_test.py` with `TF_CONFIG` set. Trains every case of
`distribution_cases.MULTI_WORKER_CASES` in turn under one strategy, in float64 (one pair of processes for
all of them: starting TensorFlow and the cluster is most of a case's time),
and saves each case's final weights to `<output_dir>/<case>.npz`.
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
from tests import distribution_cases as cases  # noqa: E402
from tests import helpers  # noqa: E402


def train(accumulate, model_name):
    """Trains one case under `strategy`; returns the model."""
    if model_name == "embedding":
        # `Embedding` + pooling: a sparse gradient, and a last global batch
        # of one example (the second worker's shard is empty).
        tokens, _, scores, _ = cases.token_data()
        dataset = tf.data.Dataset.from_tensor_slices((tokens, scores)).batch(
            cases.DROPIN_BATCH
        )
        graph = cases.embedding_pool_graph
        # SGD, as in `distributed_dropin_test`.
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
    model.fit(dataset, epochs=cases.EPOCHS, verbose=0)
    return model


def main(output_dir):
    keras.backend.set_floatx("float64")
    for name, (accumulate, model_name) in cases.MULTI_WORKER_CASES.items():
        model = train(accumulate, model_name)
        np.savez(os.path.join(output_dir, f"{name}.npz"), *model.get_weights(),
                 iterations=model.optimizer.iterations.numpy())


if __name__ == "__main__":
    main(sys.argv[1])
