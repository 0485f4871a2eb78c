"""Fine-tunes a keras-hub text classifier with gradient accumulation.

    python examples/keras_hub_classifier.py
    python examples/keras_hub_classifier.py --examples 256 --epochs 2

A `keras_hub.models.BertTextClassifier` is built from config with random
weights (no preset is downloaded) and wrapped with `keras_accum.wrap`, which
returns an `AccumulatingModel` over the same layers: training the wrapper
trains the classifier, which stays usable as the keras-hub task it is. Each
batch of `--batch-size` is one update, computed inside the step in
micro-batches of `--micro-batch-size` (`micro_batch_size`); `--accumulate`
adds batches per update on top.

The data are synthetic token sequences in the backbone's input format (a dict
of `token_ids`, `segment_ids` and `padding_mask`); the label says whether a
marker token occurs in the sequence.
"""

import argparse
import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import keras_hub_config as config  # noqa: E402
import numpy as np  # noqa: E402

import keras_accum  # noqa: E402

_PAD, _CLS, _SEP = 0, 1, 2


def make_data(num_examples, sequence_length, vocabulary_size, seed):
    """Random sequences `[CLS] tokens... [SEP] padding`, labelled 0 or 1.

    Returns:
        `(inputs, labels)`: a dict of int32 arrays of shape
        `(num_examples, sequence_length)`, and int32 labels, 1 where the
        marker token occurs.
    """
    rng = np.random.default_rng(seed)
    positions = np.arange(sequence_length)
    lengths = rng.integers(
        sequence_length // 2, sequence_length + 1, size=num_examples
    )
    tokens = rng.integers(
        3, vocabulary_size, size=(num_examples, sequence_length)
    )
    tokens[tokens == config.MARKER_TOKEN] = config.MARKER_TOKEN + 1
    labels = rng.integers(0, 2, size=num_examples).astype("int32")
    # One marker in each positive sequence, between [CLS] and [SEP].
    marker_at = 1 + (rng.random(num_examples) * (lengths - 2)).astype(int)
    rows = np.flatnonzero(labels)
    tokens[rows, marker_at[rows]] = config.MARKER_TOKEN
    tokens[:, 0] = _CLS
    tokens[np.arange(num_examples), lengths - 1] = _SEP
    padding_mask = positions[np.newaxis, :] < lengths[:, np.newaxis]
    tokens = np.where(padding_mask, tokens, _PAD)
    inputs = {
        "token_ids": tokens.astype("int32"),
        "segment_ids": np.zeros_like(tokens, dtype="int32"),
        "padding_mask": padding_mask.astype("int32"),
    }
    return inputs, labels


def build_classifier(args):
    """A small BERT classifier from config: random init, no preprocessor."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=args.vocabulary_size,
        num_layers=args.num_layers,
        num_heads=config.NUM_HEADS,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.hidden_dim * 2,
        max_sequence_length=args.sequence_length,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=config.NUM_CLASSES, preprocessor=None
    )


def expected_updates(num_train, batch_size, accumulate, epochs):
    """Updates `fit` makes: one per full window, plus the epoch's leftover."""
    steps = math.ceil(num_train / batch_size)
    return epochs * math.ceil(steps / accumulate)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=config.NUM_EXAMPLES,
        help="synthetic examples (a quarter validate)",
    )
    parser.add_argument(
        "--sequence-length", type=int, default=config.SEQUENCE_LENGTH
    )
    parser.add_argument(
        "--vocabulary-size", type=int, default=config.VOCABULARY_SIZE
    )
    parser.add_argument("--num-layers", type=int, default=config.NUM_LAYERS)
    parser.add_argument(
        "--hidden-dim",
        type=int,
        default=config.HIDDEN_DIM,
        help="hidden size (the feed-forward size is twice it)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=config.BATCH_SIZE,
        help="batch size given to `fit`",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=config.MICRO_BATCH_SIZE,
        help="examples per forward and backward pass inside a step",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=config.ACCUMULATE,
        help="batches per optimizer update",
    )
    parser.add_argument("--epochs", type=int, default=config.EPOCHS)
    parser.add_argument(
        "--verbose", type=int, default=2, help="`verbose` of `fit`"
    )
    args = parser.parse_args(argv)
    if args.vocabulary_size <= config.MARKER_TOKEN + 1:
        parser.error(
            "--vocabulary-size must be > "
            f"{config.MARKER_TOKEN + 1}. Received: "
            f"{args.vocabulary_size}"
        )
    return args


def main(argv=None):
    """Builds, wraps and fine-tunes; returns the objects for inspection.

    Returns:
        A dict with the keras-hub `classifier`, the wrapping `model`, the
        `history` of `fit` and the `expected_updates`.
    """
    args = parse_args(argv)
    keras.utils.set_random_seed(config.SEED)
    inputs, labels = make_data(
        args.examples,
        args.sequence_length,
        args.vocabulary_size,
        config.DATA_SEED,
    )
    num_train = args.examples - args.examples // 4
    train = ({k: v[:num_train] for k, v in inputs.items()}, labels[:num_train])
    validation = (
        {k: v[num_train:] for k, v in inputs.items()},
        labels[num_train:],
    )

    classifier = build_classifier(args)
    model = keras_accum.wrap(
        classifier,
        accumulate=args.accumulate,
        micro_batch_size=args.micro_batch_size,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(config.LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    effective = args.batch_size * args.accumulate
    print(
        f"{classifier.count_params():,} parameters; batches of "
        f"{args.batch_size} in micro-batches of {args.micro_batch_size}, "
        f"{args.accumulate} batch(es) per update: effective batch "
        f"{effective}."
    )
    history = model.fit(
        *train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=validation,
        verbose=args.verbose,
    )

    updates = int(model.optimizer.iterations.numpy())
    expected = expected_updates(
        num_train, args.batch_size, args.accumulate, args.epochs
    )
    # The classifier itself is trained: it shares every weight with `model`.
    logits = classifier.predict(validation[0], verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == validation[1]))
    print(f"Optimizer updates: {updates} (expected {expected}).")
    print(f"Validation accuracy of the keras-hub classifier: {accuracy:.3f}")
    return {
        "classifier": classifier,
        "model": model,
        "history": history,
        "expected_updates": expected,
    }


if __name__ == "__main__":
    main()
