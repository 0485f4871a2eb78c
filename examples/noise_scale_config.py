"""Settings of `noise_scale_digits.py`, as plain Python constants.

The command-line flags of `noise_scale_digits.py` override the ones they
name. The defaults run in about a minute on 2 CPU cores (TensorFlow).
"""

# Data: scikit-learn's bundled `load_digits` (1797 8x8 greyscale images),
# split by `digits_data.py` as for `train_digits.py` (`digits_config.py`):
# 1280 training images (80 micro-batches of 16 per epoch), 517 validation.

# Model: a small multilayer perceptron (64 pixels, 64 ReLU units, 10
# classes), fast on every backend. No dropout, no batch normalisation.
HIDDEN_UNITS = 64
NUM_CLASSES = 10

# Training, the same for every run: Adam at one learning rate, the same
# initial weights (`keras.utils.set_random_seed(SEED)` before each model is
# built) and the same example order (one permutation per epoch).
SEED = 1234
BATCH_SIZE = 16
LEARNING_RATE = 3e-3

# The `accumulate="auto"` run: `NoiseScaleSchedule(max_window=MAX_WINDOW)`
# (the defaults of "auto": windows from 2 to 64 micro-batches, starting at
# 2, re-chosen every epoch), trained for `EPOCHS` epochs.
MAX_WINDOW = 64
EPOCHS = 30

# The comparison: the epochs until each run first reaches a validation
# loss of `TARGET_LOSS`, for the auto run and fixed windows chosen badly on
# either side (1: plain `fit` at batch 16; 64: batches of 1024, 80% of the
# epoch). A fixed run stops at the target, or after `MAX_EPOCHS`.
TARGET_LOSS = 0.3
SMALL_WINDOW = 1
LARGE_WINDOW = 64
MAX_EPOCHS = 120

# Outputs, relative to the working directory.
OUT_DIR = "out"
PLOT_FILE = "noise_scale.png"
RESULTS_FILE = "noise_scale_results.json"
