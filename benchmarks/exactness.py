"""Exactness: weights after accumulated training vs big-batch training.

Float64, a tiny MLP, `shuffle=False`, several epochs. The reference is plain
`fit` with `batch_size = k * b` (one update per window) or the whole data
set (`accumulate="epoch"`). On *ragged* data (the last micro-batch of an
epoch is short) Keras' built-in averages the micro-batch means with equal
weights and carries the leftover micro-steps into the next epoch, so it does
not reproduce the big batch; on *divisible* data it does, up to round-off.
"""

import math

import keras
import numpy as np
from models import build_model

import keras_accum


def _flat(tensors):
    return np.concatenate([np.ravel(t) for t in tensors])


def _relative_errors(weights, reference, initial):
    """||w - r|| / ||r|| over all weights, the same relative to the size of
    the reference's total update ||r - w0||, and the largest per-tensor
    ||w - r|| / ||r|| (the tests' definition; biases start at zero, so it
    can exceed 1)."""
    w, r, w0 = _flat(weights), _flat(reference), _flat(initial)
    difference = np.linalg.norm(w - r)
    per_tensor = max(
        np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
        for a, b in zip(weights, reference)
    )
    return (
        float(difference / max(np.linalg.norm(r), 1e-300)),
        float(difference / max(np.linalg.norm(r - w0), 1e-300)),
        float(per_tensor),
    )


def _train(model, optimizer, x, y, batch_size, epochs, initial):
    model.set_weights(initial)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
              shuffle=False)
    return [np.asarray(w, np.float64) for w in model.get_weights()]


def _optimizer(name, steps=None):
    if name == "sgd":
        return keras.optimizers.SGD(0.1, gradient_accumulation_steps=steps)
    return keras.optimizers.Adam(0.01, gradient_accumulation_steps=steps)


def measure_exactness(ragged_examples, divisible_examples, micro_batch, ks,
                      epochs, optimizers):
    keras.backend.set_floatx("float64")
    rows = []
    for data_name, examples in (
        ("ragged", ragged_examples), ("divisible", divisible_examples)
    ):
        if examples is None:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal((examples, 6))
        y = rng.integers(0, 3, examples)
        steps_per_epoch = math.ceil(examples / micro_batch)
        initial = build_model("tiny_mlp").get_weights()
        for optimizer in optimizers:
            windows = [(k, k * micro_batch, k) for k in ks]
            # "epoch": the built-in's closest setting is one window of
            # steps_per_epoch micro-batches.
            windows.append(("epoch", examples, steps_per_epoch))
            for window, big_batch, builtin_steps in windows:
                reference = _train(
                    build_model("tiny_mlp"), _optimizer(optimizer), x, y,
                    big_batch, epochs, initial,
                )
                accumulated = _train(
                    build_model(
                        "tiny_mlp", keras_accum.AccumulatingModel,
                        accumulate=window,
                    ),
                    _optimizer(optimizer), x, y, micro_batch, epochs,
                    initial,
                )
                builtin = _train(
                    build_model("tiny_mlp"),
                    _optimizer(optimizer, builtin_steps), x, y, micro_batch,
                    epochs, initial,
                )
                for method, weights in (
                    ("keras_accum", accumulated), ("builtin", builtin)
                ):
                    error, update_error, per_tensor = _relative_errors(
                        weights, reference, initial
                    )
                    rows.append({
                        "data": data_name,
                        "examples": examples,
                        "micro_batch": micro_batch,
                        "optimizer": optimizer,
                        "window": window,
                        "builtin_steps": builtin_steps,
                        "method": method,
                        "relative_error": error,
                        "error_relative_to_update": update_error,
                        "max_per_tensor_relative_error": per_tensor,
                    })
    return rows
