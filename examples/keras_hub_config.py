"""Settings of `keras_hub_classifier.py`, as plain Python constants.

The command-line flags of `keras_hub_classifier.py` override the ones they
name. The defaults train in well under a minute on 2 CPU cores.
"""

# Synthetic data: random token sequences; the label says whether the marker
# token occurs. Ids 0, 1 and 2 stand for padding, [CLS] and [SEP].
NUM_EXAMPLES = 1024
SEQUENCE_LENGTH = 32
VOCABULARY_SIZE = 256
MARKER_TOKEN = 7
DATA_SEED = 0

# A BERT-shaped backbone built from config with random weights (no preset,
# nothing downloaded).
NUM_LAYERS = 2
NUM_HEADS = 2
HIDDEN_DIM = 32
INTERMEDIATE_DIM = 64
NUM_CLASSES = 2

# Fine-tuning: batches of 64 for each AdamW update, computed inside the
# step in micro-batches of 16 (the memory of 16 examples' activations).
SEED = 1234
BATCH_SIZE = 64
MICRO_BATCH_SIZE = 16
ACCUMULATE = 1
EPOCHS = 5
LEARNING_RATE = 2e-3
