"""The gradient noise scale (`noise_scale=True`) is the estimator of
McCandlish et al. 2018, Appendix A, generalised to unequal micro-batches
and read one block of the weights per window.

Per window, with micro-batch `i` adding the gradient `a_i = b_i g_i` of
its loss's normaliser `b_i`, `n` the micro-batches with `b_i > 0`,
`B = sum b_i`, `G_B` the gradient the window applies, and `x^(q)` the
entries of `x` in the window's block `q` (each variable flattened and cut
into 8 contiguous pieces, the last one holding the rest; the `w`-th
measuring window reads block `w mod 8`), with `Q = sum |a_i^(q)|^2 / b_i`:

    trace_hat_q = (Q - B |G_B^(q)|^2) / (n - 1)
    grad_sq_hat_q = |G_B^(q)|^2 - trace_hat_q / B

smoothed per block over the windows that read it (decay 0.9, debiased as
Adam) and summed over the blocks. Three kinds of checks, all in float64
with the learning rate 0 (the weights never move, so every window measures
the same gradient distribution):

- the truth of a closed form (linear least squares on Gaussian inputs);
- the formula itself, to round-off, from per-example gradients that the
  backend's own autodiff computes one example at a time: ragged, weighted,
  masked, sparse, split and skipped micro-batches, a clipped update, and
  `MirroredStrategy` shards;
- the finite-population truth of a dataset, within sampling error.
"""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_accum import AccumulatingModel
from tests import helpers

KERAS_VERSION = tuple(int(p) for p in keras.version().split(".")[:2])

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("float64")]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """On torch, one intra-op thread while a test runs: the models are
    tiny, and on busy cores torch's threads only wait for each other (the
    closed form took 29 s instead of 4 on 2 cores at load 18)."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: The documented decay of each block's moving averages, per window that
#: reads the block.
DECAY = 0.9
#: The documented number of blocks a window reads one of.
BLOCKS = 8
CLASSES = 3


# --- References in NumPy -----------------------------------------------------


def _masked_divisor(valid):
    """What Keras divides a masked mean loss by: the valid entries, plus
    `epsilon()` before Keras 3.13 (a fully masked batch: `epsilon()`)."""
    epsilon = keras.config.epsilon() if KERAS_VERSION < (3, 13) else 0.0
    return np.sum(valid) + epsilon


def _block_ids(model, blocks=BLOCKS):
    """The block of each entry of the flattened trainable weights, in the
    order of `model.trainable_variables`: each variable of `size` entries
    is cut into `blocks` pieces of `size // blocks`, the last one holding
    the rest."""
    ids = []
    for variable in model.trainable_variables:
        size = int(np.prod(variable.shape))
        c = size // blocks
        ids.append(np.minimum(np.arange(size) // c, blocks - 1) if c
                   else np.full(size, blocks - 1))
    return np.concatenate(ids)


def _window_estimate(added, normalisers, entries=None):
    """`(trace_hat, grad_sq_hat, B)` of one window, over `entries` (a
    boolean mask of the flattened weights, e.g. one block; all of them
    when `None`).

    Args:
        added: `(micro-batches, parameters)`: each micro-batch's added
            gradient `a_i` (the gradient of its summed weighted loss).
        normalisers: Each micro-batch's `b_i`.
    """
    added = np.asarray(added, np.float64)
    if entries is not None:
        added = added[:, entries]
    b = np.asarray(normalisers, np.float64)
    total = b.sum()
    window_gradient = added.sum(axis=0) / total
    g2 = window_gradient @ window_gradient
    # Empty: no valid entry (a normaliser of 0, or Keras < 3.13's
    # `epsilon()` for a fully masked batch).
    nonempty = b > keras.config.epsilon()
    q = np.sum(np.sum(added[nonempty] ** 2, axis=1) / b[nonempty])
    n = np.count_nonzero(nonempty)
    trace = (q - total * g2) / (n - 1)
    return trace, g2 - trace / total, total


def _block_windows(added_per_window, normalisers_per_window, batches,
                   block_ids, first_window=0):
    """The `_smoothed` input of consecutive windows: the `w`-th window
    (counting from `first_window`) estimated over block `w mod BLOCKS`."""
    windows = []
    for w, (added, normalisers) in enumerate(
        zip(added_per_window, normalisers_per_window), start=first_window
    ):
        block = w % BLOCKS
        windows.append((*_window_estimate(added, normalisers,
                                          block_ids == block),
                        batches, block))
    return windows


def _block_averages(windows, blocks=BLOCKS):
    """Each block's debiased moving averages of `(trace_hat_q,
    grad_sq_hat_q)`: a `(2, blocks)` array (the `_smoothed` sums' terms)."""
    state = np.zeros((3, blocks))
    for trace, grad_sq, _, _, block in windows:
        state[:, block] = DECAY * state[:, block] + (1 - DECAY) * np.array(
            [trace, grad_sq, 1.0]
        )
    return state[:2] / state[2]


def _assert_block_averages(model, windows):
    """The model's state holds each block's averages as replayed (1e-9):
    sums over the blocks alone would not see a block's micro-batches
    paired with another block's window norm when every window is alike."""
    state = np.asarray(model._noise_scale_state(), np.float64)
    blocks = (len(state) - 3) // 3
    measured = state[:2 * blocks].reshape(2, blocks) / state[2 * blocks:
                                                              3 * blocks]
    np.testing.assert_allclose(measured, _block_averages(windows, blocks),
                               rtol=helpers.RTOL, atol=1e-300)


def _smoothed(windows, blocks=BLOCKS):
    """The debiased moving averages of `(trace_hat_q, grad_sq_hat_q, B,
    fit batches, q)` per window, per block `q`, summed over the blocks:
    `(noise_scale, trace, grad_sq, batch_normaliser)`, or `None` while a
    block is unmeasured."""
    state = np.zeros((3, blocks))
    batch = np.zeros(2)
    for trace, grad_sq, total, batches, block in windows:
        state[:, block] = DECAY * state[:, block] + (1 - DECAY) * np.array(
            [trace, grad_sq, 1.0]
        )
        batch = DECAY * batch + (1 - DECAY) * np.array([total / batches, 1])
    if not np.all(state[2] > 0):
        return None
    trace = np.sum(state[0] / state[2])
    grad_sq = np.sum(state[1] / state[2])
    return trace / grad_sq, trace, grad_sq, batch[0] / batch[1]


def _assert_estimate(model, expected, rtol=helpers.RTOL):
    """`model.noise_scale_estimate` equals `expected` (a `_smoothed`
    tuple), each field to `rtol` relative."""
    estimate = model.noise_scale_estimate
    assert estimate is not None
    for name, value, reference in zip(
        ("noise_scale", "trace", "grad_sq", "batch_normaliser"),
        estimate, expected,
    ):
        error = abs(value - reference) / abs(reference)
        assert error <= rtol, (
            f"{name}: {value!r} against {reference!r} (relative error "
            f"{error:.3g})"
        )


# --- Per-example gradients from the backend's autodiff -----------------------


def _per_example_gradients(model, loss, x, y, weight):
    """`(examples, parameters)`: the gradient of each example's summed
    weighted loss `sum(weight * loss(y, model(x)))`, one example at a time
    (`stateless_call` under the backend's own autodiff), flattened in the
    order of `model.trainable_variables`.

    Args:
        loss: Unreduced loss function `(y_true, y_pred) -> elements`.
        weight: Per-element weights, shaped as the loss's elements.
    """
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def summed_loss(values, inputs, targets, weights):
        outputs, _ = model.stateless_call(values, non_trainable, inputs)
        return ops.sum(weights * loss(targets, outputs))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def gradient(inputs, targets, weights):
            values = [tf.identity(v) for v in trainable]
            with tf.GradientTape() as tape:
                tape.watch(values)
                value = summed_loss(values, inputs, targets, weights)
            # `Embedding`'s gradient is sparse; its dense form adds
            # repeated tokens.
            return [tf.convert_to_tensor(g)
                    for g in tape.gradient(value, values)]
    elif backend == "jax":
        import jax

        grad = jax.jit(jax.grad(summed_loss))

        def gradient(inputs, targets, weights):
            return grad(trainable, inputs, targets, weights)
    else:
        import torch

        def gradient(inputs, targets, weights):
            values = [v.detach().clone().requires_grad_(True)
                      for v in trainable]
            value = summed_loss(values, inputs, targets, weights)
            return torch.autograd.grad(value, values)

    rows = []
    for j in range(len(x)):
        parts = [ops.convert_to_tensor(a[j:j + 1]) for a in (x, y, weight)]
        rows.append(np.concatenate([
            np.ravel(ops.convert_to_numpy(g)) for g in gradient(*parts)
        ]))
    return np.array(rows)


# --- 1. Closed form ----------------------------------------------------------


def test_linear_regression_matches_its_closed_form():
    """On `y = x.w* + eps`, `x ~ N(0, I_d)`, `eps ~ N(0, sigma^2)`, at
    `w0` with `delta = w0 - w*`, the squared error's per-example gradient
    `2 (x.delta - eps) x` has mean `G = 2 delta` and covariance
    `4 ((|delta|^2 + sigma^2) I + delta delta^T)` (Isserlis), so

        |G|^2 = 4 |delta|^2        tr(S) = 4 ((d+1) |delta|^2 + d sigma^2)
        B_noise = tr(S) / |G|^2 = d + 1 + d sigma^2 / |delta|^2.

    Here d = 64, |delta|^2 = 0.80, sigma = 1: B_noise = 145. Two epochs
    of 64 windows of 32 micro-batches of 32 iid examples (a window reads
    one eighth of the weights, so each block is read by 16): simulated
    over 200 seeds, the smoothed estimate's relative standard deviation is
    2.5% (noise scale), 1.0% (trace), 2.4% (squared norm), so the bounds
    10%, 5% and 10% are four of them or more. The estimate also equals
    the moving averages replayed in NumPy (1e-9), and each epoch's log is
    the estimate at its end."""
    d, batch, window, windows, sigma = 64, 32, 32, 128, 1.0
    rng = np.random.default_rng(7)
    w_star = rng.normal(size=(d, 1)) / np.sqrt(d)
    w0 = np.zeros((d, 1))
    examples = batch * window * windows
    x = rng.normal(size=(examples, d))
    y = x @ w_star + sigma * rng.normal(size=(examples, 1))

    inputs = keras.Input((d,))
    outputs = keras.layers.Dense(1, use_bias=False,
                                 kernel_initializer="zeros")(inputs)
    model = AccumulatingModel(inputs, outputs, accumulate=window,
                              noise_scale=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0),
                  loss="mse")
    assert model.noise_scale_estimate is None  # Before any window.

    def batches():
        # Each epoch its own half of the windows.
        for start in range(0, examples, batch):
            yield x[start:start + batch], y[start:start + batch]

    history = model.fit(batches(), steps_per_epoch=examples // batch // 2,
                        epochs=2, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model.get_weights()[0], w0)
    estimate = model.noise_scale_estimate

    delta2 = float(np.sum((w0 - w_star) ** 2))
    true_grad_sq = 4 * delta2
    true_trace = 4 * ((d + 1) * delta2 + d * sigma**2)
    true_noise_scale = true_trace / true_grad_sq
    errors = {
        "noise_scale": estimate.noise_scale / true_noise_scale - 1,
        "trace": estimate.trace / true_trace - 1,
        "grad_sq": estimate.grad_sq / true_grad_sq - 1,
    }
    assert abs(errors["noise_scale"]) <= 0.10, errors
    assert abs(errors["trace"]) <= 0.05, errors
    assert abs(errors["grad_sq"]) <= 0.10, errors
    assert estimate.batch_normaliser == batch

    # The same windows, replayed: micro-batch gradient `2 x^T (x w0 - y)`
    # summed over its examples.
    residual = x @ w0 - y
    added = 2 * (x * residual).reshape(-1, window, batch, d).sum(axis=2)
    per_window = _block_windows(added, [[batch] * window] * windows, window,
                                _block_ids(model))
    _assert_estimate(model, _smoothed(per_window))
    logs = history.history
    assert logs["noise_scale"][-1] == estimate.noise_scale
    assert logs["noise_scale_trace"][-1] == estimate.trace
    assert logs["noise_scale_grad_sq"][-1] == estimate.grad_sq
    np.testing.assert_allclose(
        [logs["noise_scale"], logs["noise_scale_trace"],
         logs["noise_scale_grad_sq"]],
        np.transpose([_smoothed(per_window[:windows // 2])[:3],
                      _smoothed(per_window)[:3]]),
        rtol=helpers.RTOL,
    )


# --- 2. One window, exactly, from per-example gradients ----------------------

EXAMPLES, FEATURES, LENGTH, VOCABULARY = 44, 5, 4, 7


def _mlp_graph():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(
        8, activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        bias_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=3),
    )(inputs)
    outputs = keras.layers.Dense(
        CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed=2),
    )(hidden)
    return inputs, outputs


def _wide_graph():
    """A hidden layer wide enough that its kernel's blocks are read one
    by one (`5 x 8191` entries: blocks of 5119, the last 5122 with the
    remainder)."""
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(
        8191, activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
    )(inputs)
    outputs = keras.layers.Dense(
        CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed=2),
    )(hidden)
    return inputs, outputs


def _tagger_graph(vocabulary=VOCABULARY):
    """Masked token tagging (a sparse gradient on TensorFlow, with repeated
    tokens), per-token logits. The embedding has `vocabulary x 4` entries:
    with 7 rows its blocks (of 3 entries) cut rows apart, with 17 each
    block is two whole rows and the last three (its remainder)."""
    return helpers.masked_tagger_graph(
        LENGTH, vocabulary, CLASSES, 4,
        (
            keras.initializers.RandomNormal(seed=4),
            keras.initializers.GlorotUniform(seed=1),
            keras.initializers.GlorotUniform(seed=2),
        ),
    )


def _sparse_cce(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True
    )


def _mlp_data(examples=EXAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, FEATURES))
    y = (x[:, :CLASSES] + 0.5 * rng.normal(size=(examples, CLASSES))).argmax(
        axis=1
    )
    return x, y


def _tagger_data(vocabulary=VOCABULARY):
    """Padded sequences of random lengths; the third batch of 8 is all
    padding (no valid token: normaliser 0)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, LENGTH + 1, size=EXAMPLES)
    lengths[16:24] = 0
    lengths[:2] = LENGTH
    tokens = rng.integers(1, vocabulary, size=(EXAMPLES, LENGTH))
    valid = np.arange(LENGTH) < lengths[:, None]
    tokens = np.where(valid, tokens, 0)
    tags = rng.integers(0, CLASSES, size=(EXAMPLES, LENGTH))
    return tokens, tags, valid.astype(np.float64)


def _weights():
    """Sample weights; the third batch of 8 weighs nothing."""
    weights = np.random.default_rng(2).uniform(0.1, 2.0, size=EXAMPLES)
    weights[16:24] = 0.0
    return weights


class _Case:
    """One window of one epoch (lr 0) and its micro-batches.

    Attributes:
        graph: The model's graph function.
        data: `(x, y, sample_weight or None, loss weights)`: the loss
            weights are the per-element weights the loss applies (sample
            weights, the mask's 0/1).
        loss: The compiled loss.
        micro_batches: Index ranges `[start, stop)` of each micro-batch.
        normaliser: `(loss weights of a micro-batch) -> b_i`.
        batches: `fit` batches in the window (its `accumulate`).
        batch_size: The `fit` batch size.
        optimizer: A function returning the optimizer (default: SGD with
            learning rate 0).
        model_kwargs: `AccumulatingModel` arguments.
    """

    def __init__(self, graph, data, loss, micro_batches, normaliser,
                 batches, batch_size=8, optimizer=None, **model_kwargs):
        self.graph = graph
        self.optimizer = optimizer
        self.data = data
        self.loss = loss
        self.micro_batches = micro_batches
        self.normaliser = normaliser
        self.batches = batches
        self.batch_size = batch_size
        self.model_kwargs = {"accumulate": batches, **model_kwargs}


def _ranges(sizes):
    stops = np.cumsum(sizes)
    return list(zip(stops - np.asarray(sizes), stops))


def _count(weights):
    return float(len(weights))


def _make_case(name):
    x, y = _mlp_data()
    ones = np.ones(EXAMPLES)
    ragged = _ranges([8] * 5 + [4])
    cce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if name == "ragged":
        return _Case(_mlp_graph, (x, y, None, ones), cce, ragged, _count, 6)
    if name == "sample-weight":
        # `sum_over_batch_size`: the normaliser counts examples, a batch of
        # zero weights too (a micro-batch with a zero gradient).
        weights = _weights()
        return _Case(_mlp_graph, (x, y, weights, weights), cce, ragged,
                     _count, 6)
    if name == "weight-sum":
        # `mean_with_sample_weight`: the normaliser is the weights' sum; a
        # batch of zero weights is empty (not one of the `n`).
        weights = _weights()
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        )
        return _Case(_mlp_graph, (x, y, weights, weights), loss, ragged,
                     np.sum, 6)
    if name == "micro-batch-size":
        # Batches of 16, 16, 12 split into 6, 6, 4 / 6, 6, 4 / 6, 6.
        return _Case(_mlp_graph, (x, y, None, ones), cce,
                     _ranges([6, 6, 4, 6, 6, 4, 6, 6]), _count, 3,
                     batch_size=16, micro_batch_size=6)
    if name == "clipnorm":
        # The window's gradient is measured before the optimizer clips it.
        return _Case(_mlp_graph, (x, y, None, ones), cce, ragged, _count, 6,
                     optimizer=lambda: keras.optimizers.SGD(
                         learning_rate=0.0, global_clipnorm=1e-3))
    if name == "skipped-non-finite":
        # A micro-batch skipped for its non-finite gradient is none of the
        # `n` (the window still counts its `fit` batch).
        x = x.copy()
        x[10, 0] = np.nan
        return _Case(_mlp_graph, (x, y, None, ones), cce,
                     ragged[:1] + ragged[2:], _count, 6,
                     on_nonfinite="skip")
    if name == "wide-layer":
        return _Case(_wide_graph, (x, y, None, ones), cce, ragged, _count, 6)
    if name in ("masked-tokens", "whole-row-blocks"):
        vocabulary = VOCABULARY if name == "masked-tokens" else 17
        tokens, tags, valid = _tagger_data(vocabulary)
        return _Case(lambda: _tagger_graph(vocabulary),
                     (tokens, tags, None, valid), cce, ragged,
                     _masked_divisor, 6)
    raise ValueError(name)


CASES = ["ragged", "sample-weight", "weight-sum", "micro-batch-size",
         "masked-tokens", "whole-row-blocks", "clipnorm",
         "skipped-non-finite", "wide-layer"]


def _expected_windows(case, model, epochs):
    """The `_smoothed` input of `epochs` epochs of the case's window (the
    same window each epoch, read one block after another), from
    per-example gradients."""
    x, y, _, loss_weights = case.data
    plain = keras.Model(model.inputs, model.outputs)  # Shares the weights.
    # (The examples of a skipped micro-batch are left out below.)
    per_example = _per_example_gradients(plain, _sparse_cce,
                                         np.nan_to_num(x), y, loss_weights)
    added = [per_example[start:stop].sum(axis=0)
             for start, stop in case.micro_batches]
    normalisers = [case.normaliser(loss_weights[start:stop])
                   for start, stop in case.micro_batches]
    return _block_windows([added] * epochs, [normalisers] * epochs,
                          case.batches, _block_ids(model))


def _fit_case(case, strategy=None, epochs=BLOCKS, **overrides):
    """The case's model after `epochs` epochs of `fit` (under `strategy`,
    if any; by default one per block), and the `History`; `overrides`
    replace model and `fit` arguments."""
    x, y, sample_weight, _ = case.data
    kwargs = {**case.model_kwargs, **overrides}
    batch_size = kwargs.pop("batch_size", case.batch_size)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = AccumulatingModel(*case.graph(), noise_scale=True, **kwargs)
        optimizer = (case.optimizer or (
            lambda: keras.optimizers.SGD(learning_rate=0.0)))()
        model.compile(optimizer=optimizer, loss=case.loss)
    history = model.fit(x, y, sample_weight=sample_weight,
                        batch_size=batch_size, epochs=epochs, shuffle=False,
                        verbose=0)
    return model, history


@pytest.mark.slice
@pytest.mark.parametrize("name", CASES)
def test_windows_match_per_example_gradients(name):
    """After eight epochs of one window of micro-batches with unequal
    normalisers (ragged, weighted, zero-weighted, masked, split by
    `micro_batch_size`, one skipped; or the update clipped; or a variable
    large enough to be read by slices on its own; or an embedding whose
    blocks are whole rows), each reading
    the next block, the estimate's trace and squared norm are the moving
    averages of the windows' `trace_hat_q` and `grad_sq_hat_q`, computed in
    NumPy from per-example gradients: equal to round-off (1e-9 relative).
    Before the eighth window some block is unread, and the logs are NaN."""
    case = _make_case(name)
    if name == "weight-sum" and not _plain_keras_stays_finite(case):
        pytest.skip(
            "plain Keras itself gets a NaN gradient from a batch of zero "
            "weights under `mean_with_sample_weight` here (Keras 3.10 on "
            "torch), which `on_nonfinite=\"raise\"` refuses"
        )
    model, history = _fit_case(case)
    windows = _expected_windows(case, model, BLOCKS)
    _assert_estimate(model, _smoothed(windows))
    _assert_block_averages(model, windows)
    logged = history.history["noise_scale"]
    assert np.all(np.isnan(logged[:-1])), logged
    assert logged[-1] == model.noise_scale_estimate.noise_scale


def _plain_keras_stays_finite(case):
    """Whether plain Keras, trained on the case's batches (learning rate
    0), keeps finite weights."""
    x, y, sample_weight, _ = case.data
    model = keras.Model(*case.graph())
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0),
                  loss=case.loss)
    model.fit(x, y, sample_weight=sample_weight, batch_size=case.batch_size,
              epochs=1, shuffle=False, verbose=0)
    return all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("graph", [_mlp_graph, _wide_graph],
                         ids=["small-variables", "wide-layer"])
def test_mirrored_replica_shards_are_micro_batches(graph):
    """Under `MirroredStrategy` over 2 devices, a global batch of 8 with a
    window of 3 measures what one device measures with batches of 4 and a
    window of 6 (each replica's shard is a micro-batch), and both equal
    the per-example reference (1e-9). Sample weights summed by the loss
    make the shards' normalisers unequal, a zero-weight shard included.
    The wide layer's kernel is read block by block as a large variable."""
    import tensorflow as tf

    x, y = _mlp_data(48)
    weights = np.random.default_rng(2).uniform(0.1, 2.0, size=48)
    weights[12:16] = 0.0  # One replica's shard in the first window.
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    case = _Case(graph, (x, y, weights, weights), loss,
                 _ranges([4] * 12), np.sum, 6, batch_size=4)
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    # Two windows an epoch: four epochs read the eight blocks.
    epochs = BLOCKS // 2
    mirrored, _ = _fit_case(case, strategy, epochs=epochs, accumulate=3,
                            batch_size=8)
    helpers.fresh_keras_state()
    single, _ = _fit_case(case, epochs=epochs)

    plain = keras.Model(single.inputs, single.outputs)
    per_example = _per_example_gradients(plain, _sparse_cce, x, y, weights)
    windows = [case.micro_batches[first:first + 6] for first in (0, 6)]
    expected = _smoothed(_block_windows(
        [[per_example[start:stop].sum(axis=0) for start, stop in ranges]
         for ranges in windows] * epochs,
        [[weights[start:stop].sum() for start, stop in ranges]
         for ranges in windows] * epochs,
        6, _block_ids(single),
    ))
    _assert_estimate(single, expected)
    # Three global batches per window on the replicas: a batch normaliser
    # of a global batch.
    _assert_estimate(mirrored, expected[:3] + (2 * expected[3],))


# --- 3. A finite dataset, within sampling error ------------------------------


def _mlp_per_example_gradients(model, x, y):
    """Per-example gradients of `_mlp_graph`'s cross-entropy, by hand
    (backpropagation in NumPy, vectorised over examples), in the order of
    `model.trainable_variables`."""
    w1, b1, w2, b2 = (np.asarray(v) for v in model.get_weights())
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d_logits = p - np.eye(CLASSES)[y]
    d_pre = (d_logits @ w2.T) * (1 - hidden**2)
    parts = [
        x[:, :, None] * d_pre[:, None, :], d_pre,
        hidden[:, :, None] * d_logits[:, None, :], d_logits,
    ]
    return np.concatenate([part.reshape(len(x), -1) for part in parts],
                          axis=1)


def test_finite_dataset_within_sampling_error():
    """On a dataset of N examples whose windows are uniform random subsets
    (a fresh permutation per pass) cut into random micro-batches, the
    estimators' expectations are exact per block (sampling without
    replacement):

        E[trace_hat_q] = tr(S^(q))     E[grad_sq_hat_q] = |G^(q)|^2 - tr(S^(q)) / N

    with `G` the dataset's mean per-example gradient and `S` their
    covariance (`ddof=1`), restricted to block `q`. 64 windows of 16
    micro-batches of 16 (2 fit batches of 128 each, split by
    `micro_batch_size`), each block read by 8: the smoothed estimate must
    lie within 4 standard errors of the truth, the errors those of each
    block's moving average of its windows' estimates (computed in NumPy
    from the same micro-batches, assumed independent: windows of one
    permutation are negatively correlated, so this overstates them),
    added over the blocks."""
    examples, micro, batch, window, passes = 1024, 16, 128, 2, 16
    x, y = _mlp_data(examples, seed=5)
    model = AccumulatingModel(*_mlp_graph(), accumulate=window,
                              micro_batch_size=micro, noise_scale=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    rng = np.random.default_rng(6)
    order = np.concatenate([rng.permutation(examples)
                            for _ in range(passes)])
    model.fit(x[order], y[order], batch_size=batch, epochs=1, shuffle=False,
              verbose=0)
    estimate = model.noise_scale_estimate

    per_example = _mlp_per_example_gradients(model, x, y)
    # The hand-written backpropagation is the backend's autodiff.
    plain = keras.Model(model.inputs, model.outputs)
    autodiff = _per_example_gradients(plain, _sparse_cce, x[:4], y[:4],
                                      np.ones(4))
    np.testing.assert_allclose(per_example[:4], autodiff, rtol=1e-9,
                               atol=1e-12)

    block_ids = _block_ids(model)
    true_grad = per_example.mean(axis=0)
    variances = np.var(per_example, axis=0, ddof=1)
    true_trace = variances.sum()
    true_grad_sq = true_grad @ true_grad - true_trace / examples
    true_noise_scale = true_trace / true_grad_sq

    # Per-window estimates of each window's block, from the same
    # micro-batches; per block, its moving average and standard error.
    micro_batches = order.reshape(-1, window * batch // micro, micro)
    windows = _block_windows(
        [per_example[m].sum(axis=1) for m in micro_batches],
        [[micro] * len(m) for m in micro_batches], window, block_ids,
    )
    trace = grad_sq = 0.0
    variance = {"trace": 0.0, "grad_sq": 0.0, "noise_scale": 0.0}
    for block in range(BLOCKS):
        per_window = np.array([w[:2] for w in windows if w[4] == block])
        weights = DECAY ** np.arange(len(per_window))[::-1]
        weights /= weights.sum()
        block_trace, block_grad_sq = weights @ per_window
        trace += block_trace
        grad_sq += block_grad_sq
        # Linearised ratio: the noise scale's error per window.
        ratio_terms = (per_window[:, 0]
                       - true_noise_scale * per_window[:, 1]) / true_grad_sq
        for name, values in (("trace", per_window[:, 0]),
                             ("grad_sq", per_window[:, 1]),
                             ("noise_scale", ratio_terms)):
            variance[name] += np.var(values, ddof=1) * (weights @ weights)
    for name, value, truth in (
        ("trace", estimate.trace, true_trace),
        ("grad_sq", estimate.grad_sq, true_grad_sq),
        ("noise_scale", estimate.noise_scale, true_noise_scale),
    ):
        error = np.sqrt(variance[name])
        z = (value - truth) / error
        assert abs(z) <= 4, (
            f"{name}: {value:.6g} against the truth {truth:.6g}: "
            f"{z:.2f} standard errors ({error:.3g})"
        )
    # The replayed moving averages are the estimate (1e-9).
    np.testing.assert_allclose([estimate.trace, estimate.grad_sq],
                               [trace, grad_sq], rtol=1e-9)
