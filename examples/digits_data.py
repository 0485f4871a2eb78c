"""The digits data of the examples, and the example order they train on.

Shared by `train_digits.py` and `noise_scale_digits.py`: scikit-learn's
bundled `load_digits` (offline), split as `digits_config.py` says, and a
`keras.utils.PyDataset` whose order depends only on the epoch.
"""

import math

import digits_config as config
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_data():
    """The digits as (8, 8, 1) float32 images in [0, 1], split with a seed.

    Returns:
        `x_train, x_test, y_train, y_test` (`TRAIN_SIZE` training images,
        stratified by label).
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    labels = digits.target.astype("int32")
    return train_test_split(
        images,
        labels,
        train_size=config.TRAIN_SIZE,
        random_state=config.SPLIT_SEED,
        stratify=labels,
    )


class ShuffledBatches(keras.utils.PyDataset):
    """Batches of `(x, y)` in an order that depends only on the epoch.

    Every run sees the same example order whatever its batch size, so the
    accumulated run's windows hold exactly the big batch's examples.
    """

    def __init__(self, x, y, batch_size, seed):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self._rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def batch_examples(self, index):
        """The number of examples in batch `index` (the last may be short)."""
        return len(self._order[index * self.batch_size:][: self.batch_size])

    def __getitem__(self, index):
        rows = self._order[index * self.batch_size:][: self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        self._order = self._rng.permutation(len(self.x))
