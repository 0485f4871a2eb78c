"""Data shared by the distribution tests and their worker processes."""

import numpy as np

from tests import helpers

# 15 global batches of 64 and a ragged last one of 2: over 4 replicas, two
# of them get no example from it.
N_EXAMPLES = 962
GLOBAL_BATCH = 64
EPOCHS = 2


def training_data():
    x, y = helpers.regression_data(N_EXAMPLES)
    sample_weight = np.random.default_rng(7).uniform(0.0, 3.0, N_EXAMPLES)
    return x, y, sample_weight
