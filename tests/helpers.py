"""Models, data and reference training shared by the exactness tests."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest

from keras_accum.accumulating_model import FunctionalAccumulatingModel

# Float64 round-off of a few hundred updates; the naive averaging that the
# tests must reject is off by 1e-4 to 1e-2. (On JAX, conftest.py keeps
# Keras' float64 in float64.)
RTOL = 1e-9


def fresh_keras_state(seed=1234):
    """Clears Keras' global state and seeds every generator.

    Without `gc.collect()` (`free_memory=False`): with TensorFlow's objects
    on the heap a full collection takes ~0.3 s, which was a third of a
    harness row; Python's own collector still runs.
    """
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(seed)


#: For parameters with `steps_per_execution` > 1: Keras' torch trainer
#: refuses them itself (`steps_per_execution` must be 1 on torch).
SEVERAL_STEPS_PER_EXECUTION = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras on torch runs one step per execution",
)


def own_torch_update(self, data):
    """A torch `train_step` that applies its own update: Keras' own torch
    step, written out (backward, then `optimizer.apply`). Set it as a
    subclass's `train_step`; keras_accum must refuse it."""
    x, y = data
    self.zero_grad()
    loss = keras.ops.mean((self(x, training=True) - y) ** 2)
    loss.backward()
    variables = self.trainable_variables
    self.optimizer.apply([v.value.grad for v in variables], variables)
    return {"loss": loss}


def relative_error(weights, reference):
    """Max over tensors of ||w - r|| / ||r||.

    A tensor a million times smaller than the largest (a bias that is zero
    up to round-off, say 4e-19) is measured against a millionth of the
    largest norm instead: its own norm is round-off, which the order of a
    sum changes (torch sums in another order than TensorFlow).
    """
    pairs = [
        (np.asarray(w, np.float64), np.asarray(r, np.float64))
        for w, r in zip(weights, reference)
    ]
    floor = 1e-6 * max([np.linalg.norm(r) for _, r in pairs] + [0.0])
    return max(
        np.linalg.norm(w - r) / max(np.linalg.norm(r), floor, 1e-300)
        for w, r in pairs
    )


def assert_exact(weights, expected):
    """Asserts finite weights within `RTOL` of `expected` (relative)."""
    assert all(np.all(np.isfinite(w)) for w in weights), "non-finite weights"
    error = relative_error(weights, expected)
    assert error <= RTOL, f"relative error {error:.3g}"


def run_python(script, backend, timeout=300):
    """Runs `script` in a fresh Python process on Keras `backend`."""
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KERAS_BACKEND": backend},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def regression_data(n=1000, features=5, outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    y = x @ rng.normal(size=(features, outputs)) + 0.1 * rng.normal(
        size=(n, outputs)
    )
    return x, y


def dense_graph(features=5, outputs=1, hidden=8, regularizer=None):
    """Inputs and outputs of a small MLP with a fixed initialisation."""
    inputs = keras.Input((features,))
    hidden_layer = keras.layers.Dense(
        hidden,
        activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        kernel_regularizer=regularizer,
    )
    output_layer = keras.layers.Dense(
        outputs, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
    )
    return inputs, output_layer(hidden_layer(inputs))


def make_optimizer(name):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=0.01)
    raise ValueError(name)


def windows(n, batch_size, accumulate):
    """Example index ranges `[start, stop)` of each window of one epoch."""
    batch_starts = list(range(0, n, batch_size))
    step = len(batch_starts) if accumulate == "epoch" else accumulate
    result = []
    for first in range(0, len(batch_starts), step):
        start = batch_starts[first]
        last = min(first + step, len(batch_starts))
        stop = batch_starts[last] if last < len(batch_starts) else n
        result.append((start, stop))
    return result


def big_batch_reference(
    model,
    x,
    y,
    batch_size,
    accumulate,
    epochs,
    sample_weight=None,
    class_weight=None,
):
    """Trains a plain model with one big batch per window, in order.

    Returns:
        The model's weights after training.
    """
    n = len(x)
    for _ in range(epochs):
        for start, stop in windows(n, batch_size, accumulate):
            sw = None if sample_weight is None else sample_weight[start:stop]
            if class_weight is not None:
                labels = np.asarray(y[start:stop]).reshape(-1).astype(int)
                cw = np.array([class_weight[c] for c in labels])
                sw = cw if sw is None else sw * cw
            model.train_on_batch(x[start:stop], y[start:stop], sample_weight=sw)
    return [w.numpy() for w in model.weights]


def dense_big_batch_weights(optimizer, x, y, batch_size, accumulate, epochs,
                            **weights):
    """`big_batch_reference` of a fresh plain `dense_graph` model (MSE).

    Args:
        optimizer: Name for `make_optimizer`.
        **weights: `sample_weight` / `class_weight`, as in
            `big_batch_reference`.
    """
    reference = keras.Model(*dense_graph())
    reference.compile(optimizer=make_optimizer(optimizer), loss="mse")
    return big_batch_reference(reference, x, y, batch_size, accumulate,
                               epochs, **weights)


class NaiveAveragingModel(FunctionalAccumulatingModel):
    """Mutant that averages per-step mean gradients (the naive method).

    Exactness tests check that this model misses the big-batch reference by
    far more than their tolerance, so they can fail.
    """

    def __init__(self, inputs, outputs, **kwargs):
        # One accumulator set: the mutant weights the whole loss alike.
        kwargs.setdefault("loss_normalisation", "shared")
        super().__init__(inputs, outputs, **kwargs)

    def _micro_batch_contribution(self, recorded, loss, batch_size,
                                  first_in_window, probe):
        from keras import ops

        from keras_accum.core.objectives import MicroBatchContribution

        strategy = getattr(self, "distribute_strategy", None)
        replicas = 1 if strategy is None else strategy.num_replicas_in_sync
        # The whole loss in the first set; any other set (the activity
        # penalties') gets nothing.
        others = len(self._accumulator.gradients) - 1
        zero = ops.zeros((), loss.dtype)
        return MicroBatchContribution(
            [ops.reshape(loss, ())] + [zero] * others,
            [ops.cast(replicas, loss.dtype)] + [zero] * others,
            ops.concatenate(
                [ops.ones((1,), loss.dtype), ops.zeros((others,), loss.dtype)]
            ),
            (True,) + (False,) * others,
            ops.cast(batch_size, loss.dtype),
        )


def free_port():
    """A TCP port on 127.0.0.1 that is free when this returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands, env, timeout):
    """Runs `commands` (argument lists) as processes started together.

    The processes of one cluster wait for each other: when one of them
    fails, or at `timeout` seconds, the others still running are killed (by
    their own handles), so a failure is reported at once instead of as a
    hang.

    Returns:
        A list of `(returncode, output)`, one per command, with stdout and
        stderr together in `output`; `returncode` is negative for a killed
        process.
    """
    logs = [tempfile.TemporaryFile() for _ in commands]
    processes = [
        subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        for command, log in zip(commands, logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes) or any(codes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for process, log in zip(processes, logs):
        log.seek(0)
        output = log.read().decode(errors="replace")
        results.append((process.returncode, output))
        log.close()
    return results


def masked_tagger_graph(length, vocabulary, classes, width, initializers):
    """Inputs and outputs of a masked token tagger.

    `Embedding(mask_zero=True)` of `width` (a sparse gradient on
    TensorFlow, with repeated tokens), a tanh layer of 8, per-token logits
    over `classes`; `initializers` are the three layers' kernel
    initializers, in that order.
    """
    embeddings, hidden_kernel, output_kernel = initializers
    inputs = keras.Input((length,), dtype="int32")
    embedded = keras.layers.Embedding(
        vocabulary, width, mask_zero=True,
        embeddings_initializer=embeddings,
    )(inputs)
    hidden = keras.layers.Dense(
        8, activation="tanh", kernel_initializer=hidden_kernel
    )(embedded)
    outputs = keras.layers.Dense(
        classes, kernel_initializer=output_kernel
    )(hidden)
    return inputs, outputs
