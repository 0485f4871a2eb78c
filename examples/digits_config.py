"""Settings of `train_digits.py`, as plain Python constants.

The command-line flags of `train_digits.py` override the ones they name.
"""

# Data: scikit-learn's bundled `load_digits` (1797 8x8 greyscale images).
# 1280 training images are 40 micro-batches of 32, i.e. exactly 5 windows of
# 8 per epoch. The other 517 images are the test set.
TRAIN_SIZE = 1280
SPLIT_SEED = 0

# Training.
SEED = 1234
BATCH_SIZE = 32
ACCUMULATE = 8
EPOCHS = 20
LEARNING_RATE = 3e-3

# Model: 3x3 convolutions at the digits' full 8x8 resolution, a 2x2
# max-pool and two dense layers. The convolutions' outputs (kept for the
# backward pass) are most of what a batch costs in memory, as in most
# vision and language models. No dropout and no batch normalisation, so
# accumulated micro-batches reproduce the big batch exactly.
FILTERS = (32, 64)
DENSE_UNITS = 32
NUM_CLASSES = 10

# Outputs, relative to the working directory. `saved_models/` is written
# only with `--save-models`.
OUT_DIR = "out"
SAVED_MODELS_DIR = "saved_models"
MODEL_FILE = "digits_accum.keras"
EXPORT_DIR = "digits_accum_export"
PLOT_FILE = "digits_curves.png"
