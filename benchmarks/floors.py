"""Raw floors of micro-batching: what the hardware allows, without Keras.

The summed gradient of `k` micro-batches of `b` against one gradient of the
big batch `k * b`, for the benchmark's models, with nothing of `fit` around
it (no optimizer, metrics, data pipeline or host loop):

- JAX: one jitted function that runs `jax.lax.scan` over the `k`
  micro-batches and sums their gradients, against one jitted gradient of
  `k * b`; also the same scan with `unroll=True` (XLA sees `k` copies of
  the body instead of a while loop).
- TensorFlow: one `tf.function` with a `tf.while_loop` over the `k`
  micro-batches, against one `tf.function` gradient of `k * b`; both
  without XLA (Keras' default on CPU) and with `jit_compile=True`.

The gradient is that of the compiled loss (mean over the batch) with
respect to the trainable weights, taken with `model.stateless_call` on JAX
and a `tf.GradientTape` on TensorFlow. Each pair is timed alternating in
one process, `rounds` calls each after one warm-up call; a floor is the
fastest big call's time over the fastest micro-batched call's time, as a
throughput ratio (< 1: micro-batching is slower). A pair whose warm-up
call (after the one that compiles) took over `SLOW_S` seconds is timed
once (XLA's while loops over a
convolution's gradient run 10-20x slower than the big batch on CPU: tens
of seconds a call at k = 32). `keras_accum`'s
`micro_batch_size` cannot beat these floors by much: its step does this
plus the optimizer, metrics and `fit`'s host loop.
"""

import time

import keras
import numpy as np
from models import build_model
from models import loss
from models import make_data

SLOW_S = 1.0


def measure_floors(model, ks, micro_batch, rounds, calls=1):
    """Returns one row per (k, variant): seconds per big-batch call and per
    micro-batched call (fastest of `rounds`, each round `calls` calls),
    and their throughput ratio."""
    built = build_model(model)
    x, y = make_data(model, max(ks) * micro_batch)
    backend = keras.backend.backend()
    rows = []
    for k in ks:
        size = k * micro_batch
        if backend == "jax":
            variants = {
                "jax: lax.scan (jit)": _jax_pair(built, k, 1),
                "jax: lax.scan unroll=True (jit)": _jax_pair(built, k, True),
            }
        else:
            variants = {
                "tf: tf.while_loop (no XLA)": _tf_pair(built, k, False),
                "tf: tf.while_loop (jit_compile=True)": _tf_pair(
                    built, k, True
                ),
            }
        for name, (big, micro, prepare) in variants.items():
            big_inputs = prepare(x[:size], y[:size], 1, size)
            micro_inputs = prepare(x[:size], y[:size], k, micro_batch)
            big_s, micro_s, agreement = _time_pair(
                big, big_inputs, micro, micro_inputs, rounds, calls
            )
            rows.append({
                "model": model, "k": k, "micro_batch": micro_batch,
                "variant": name, "big_batch_ms": 1000 * big_s,
                "micro_batches_ms": 1000 * micro_s,
                "ratio": big_s / micro_s,
                "gradient_agreement": agreement,
            })
    return rows


def _time_pair(big, big_inputs, micro, micro_inputs, rounds, calls):
    """Fastest call of each, alternating; plus the relative difference of
    the two gradients (both are the gradient of the big batch's mean
    loss)."""
    big_gradients = _numpy(big(*big_inputs))
    micro_gradients = _numpy(micro(*micro_inputs))
    started = time.perf_counter()
    _block(micro(*micro_inputs))
    probe = time.perf_counter() - started
    slow = probe > SLOW_S
    difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in
                             zip(big_gradients, micro_gradients)))
    norm = np.sqrt(sum(np.sum(b ** 2) for b in big_gradients))
    times = {"big": [], "micro": [probe]}
    for round_index in range(rounds):
        order = [("big", big, big_inputs), ("micro", micro, micro_inputs)]
        if round_index % 2:
            order.reverse()
        if slow:  # Timed once: the probe.
            order = order[:1] if order[0][0] == "big" else order[1:]
        for name, function, inputs in order:
            started = time.perf_counter()
            for _ in range(calls):
                result = function(*inputs)
            _block(result)
            times[name].append((time.perf_counter() - started) / calls)
    return min(times["big"]), min(times["micro"]), float(
        difference / max(norm, 1e-30)
    )


def _numpy(gradients):
    return [np.asarray(keras.ops.convert_to_numpy(g), "float64")
            for g in gradients]


def _block(result):
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(result)
    else:
        # A `tf.function`'s result is computed when it returns; reading one
        # element makes sure of it.
        keras.ops.convert_to_numpy(result[0])


def _jax_pair(model, k, unroll):
    import jax

    loss_fn = loss()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def batch_loss(weights, x, y):
        y_pred, _ = model.stateless_call(weights, non_trainable, x,
                                         training=True)
        return loss_fn(y, y_pred)

    gradient = jax.grad(batch_loss)

    @jax.jit
    def big(weights, x, y):
        return gradient(weights, x[0], y[0])

    @jax.jit
    def micro(weights, x, y):
        def body(total, batch):
            step = gradient(weights, *batch)
            return [t + g for t, g in zip(total, step)], None

        zeros = [jax.numpy.zeros_like(w) for w in weights]
        total, _ = jax.lax.scan(body, zeros, (x, y), unroll=unroll)
        # The mean over the big batch: micro-batches are of equal size.
        return [t / k for t in total]

    def prepare(x, y, count, size):
        return (trainable, x.reshape(count, size, *x.shape[1:]),
                y.reshape(count, size))

    return (lambda *a: big(*a), lambda *a: micro(*a), prepare)


def _tf_pair(model, k, jit_compile):
    import tensorflow as tf

    loss_fn = loss()
    weights = model.trainable_variables

    def gradient(x, y):
        with tf.GradientTape() as tape:
            value = loss_fn(y, model(x, training=True))
        return [tf.convert_to_tensor(g) for g in
                tape.gradient(value, weights)]

    @tf.function(jit_compile=jit_compile)
    def big(x, y):
        return gradient(x[0], y[0])

    @tf.function(jit_compile=jit_compile)
    def micro(x, y):
        def body(index, total):
            step = gradient(x[index], y[index])
            return index + 1, [t + g for t, g in zip(total, step)]

        zeros = [tf.zeros_like(w) for w in weights]
        _, total = tf.while_loop(
            lambda index, _: index < k, body, [tf.constant(0), zeros],
            parallel_iterations=1,
        )
        return [t / k for t in total]

    def prepare(x, y, count, size):
        return (tf.constant(x.reshape(count, size, *x.shape[1:])),
                tf.constant(y.reshape(count, size)))

    return big, micro, prepare
