"""Property: accumulated training equals big-batch training (issue 8).

Hypothesis draws the data size, batch size, window, optimizer, sample
weights, epochs and the number of replicas (1, or 2 under a
`MirroredStrategy` over two logical CPUs); `fit` with `shuffle=False` in
float64 must end within a relative 1e-9 of a plain single-device
`keras.Model` trained on one big batch per window. The examples are
derandomized, so CI runs the same ones every time.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_accum import AccumulatingModel
from tests import helpers
from tests.helpers import RTOL

MAX_EXAMPLES = 10

# Configurations tried by `test_accumulation_equals_big_batch`, checked when
# the module's tests are done (in the worker process that ran it).
TRIED = []

_STRATEGIES = {}


def _strategy(replicas):
    """One strategy per replica count, shared by the examples."""
    if replicas not in _STRATEGIES:
        if replicas == 1:
            _STRATEGIES[1] = tf.distribute.get_strategy()
        else:
            # ReductionToOneDevice: collective ops' group keys clash between
            # strategies in one process (see distribution_test.py).
            _STRATEGIES[replicas] = tf.distribute.MirroredStrategy(
                [f"/cpu:{i}" for i in range(replicas)],
                cross_device_ops=tf.distribute.ReductionToOneDevice(),
            )
    return _STRATEGIES[replicas]


@pytest.fixture(scope="module", autouse=True)
def _examples_cover_both_replica_counts():
    """After the property test: it ran enough examples, on 1 and 2 replicas
    (`pytest -rP` prints how many)."""
    yield
    if not TRIED:
        return  # Deselected, or run by another worker process.
    replicas = sorted({c["replicas"] for c in TRIED})
    print(f"property_test: {len(TRIED)} hypothesis examples, "
          f"replicas {replicas}")
    assert len(TRIED) >= MAX_EXAMPLES // 2
    assert replicas == [1, 2]


@st.composite
def configurations(draw):
    replicas = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(10, 300))
    if replicas == 1:
        batch_size = draw(st.integers(1, 64))
    else:
        # Plain Keras `fit` under MirroredStrategy fails when the *first*
        # global batch does not split evenly over the replicas (an AddN
        # shape error, see KERAS_NOTES.md); a ragged last batch is fine.
        batch_size = 2 * draw(st.integers(1, 32))
        if n < batch_size and n % 2:
            n += 1
    return {
        "replicas": replicas,
        "n": n,
        "batch_size": batch_size,
        "accumulate": draw(st.one_of(st.integers(1, 8), st.just("epoch"))),
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
        "sample_weight": draw(st.booleans()),
        "epochs": draw(st.integers(1, 2)),
    }


def _train(config):
    x, y = helpers.regression_data(config["n"], seed=config["n"])
    sample_weight = None
    if config["sample_weight"]:
        sample_weight = np.random.default_rng(config["n"]).uniform(
            0.0, 3.0, config["n"]
        )
    with _strategy(config["replicas"]).scope():
        model = AccumulatingModel(*helpers.dense_graph(),
                                  accumulate=config["accumulate"])
        model.compile(optimizer=helpers.make_optimizer(config["optimizer"]),
                      loss="mse")
    if config["replicas"] == 1:
        model.fit(x, y, sample_weight=sample_weight,
                  batch_size=config["batch_size"], epochs=config["epochs"],
                  shuffle=False, verbose=0)
    else:
        parts = (x, y) if sample_weight is None else (x, y, sample_weight)
        data = tf.data.Dataset.from_tensor_slices(parts).batch(
            config["batch_size"]
        )
        model.fit(data, epochs=config["epochs"], shuffle=False, verbose=0)

    expected = helpers.dense_big_batch_weights(
        config["optimizer"], x, y, config["batch_size"],
        config["accumulate"], config["epochs"], sample_weight=sample_weight,
    )
    return model, expected


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=configurations())
def test_accumulation_equals_big_batch(config):
    TRIED.append(config)
    previous = keras.backend.floatx()
    # Not the `float64` fixture: hypothesis reruns the body, not fixtures.
    keras.backend.set_floatx("float64")
    try:
        model, expected = _train(config)
    finally:
        keras.backend.set_floatx(previous)
    error = helpers.relative_error(model.get_weights(), expected)
    assert error <= RTOL, f"relative error {error:.3g} for {config}"
    updates = config["epochs"] * len(
        helpers.windows(config["n"], config["batch_size"], config["accumulate"])
    )
    assert int(model.optimizer.iterations.numpy()) == updates
    assert model.mini_step == 0
