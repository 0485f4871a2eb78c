"""Settings of `train_digits.py`, as plain Python constants.

The command-line flags of `train_digits.py` override the ones they name.
"""

# Data: scikit-learn's bundled `load_digits` (1797 8x8 greyscale images).
# 1280 training images are 40 micro-batches of 32, i.e. exactly 5 windows of
# 8: every epoch ends on a full window and TensorBoard's `update_freq`
# lines up with the optimizer updates. The other 517 images are the test set.
TRAIN_SIZE = 1280
SPLIT_SEED = 0

# Training.
SEED = 1234
BATCH_SIZE = 32
ACCUMULATE = 8
EPOCHS = 20
LEARNING_RATE = 3e-3

# Model: two 3x3 convolutions, a 2x2 max-pool and two dense layers; no
# dropout and no batch normalisation, so accumulated micro-batches reproduce
# the big batch exactly.
FILTERS = (16, 32)
DENSE_UNITS = 32
NUM_CLASSES = 10

# Outputs, relative to the working directory.
OUT_DIR = "out"
SAVED_MODELS_DIR = "saved_models"
MODEL_FILE = "digits_accum.keras"
EXPORT_DIR = "digits_accum_export"
PLOT_FILE = "digits_curves.png"

# Memory is sampled this often (seconds) while `fit` runs.
MEMORY_SAMPLE_INTERVAL = 0.002
