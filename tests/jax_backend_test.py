"""The JAX backend: `keras.distribution`, a train step that stays on the
device, and no TensorFlow (float64, relative 1e-9 against plain Keras).

Run with `KERAS_BACKEND=jax python -m pytest -m backends`; conftest.py gives JAX
two host CPU devices.
"""

import textwrap

import keras
import numpy as np
import pytest

from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers

pytestmark = [
    pytest.mark.backends,
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="tests the JAX backend"
    ),
]

# 44 examples in micro-batches of 8: a ragged last batch of 4, which still
# divides over 2 devices (`DataParallel` needs that).
EXAMPLES, MICRO = 44, 8


def _data():
    return helpers.regression_data(EXAMPLES)


def _accumulated(accumulate, distribution=None, epochs=2):
    x, y = _data()
    if distribution is not None:
        keras.distribution.set_distribution(distribution)
    try:
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate)
        model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
        model.fit(x, y, batch_size=MICRO, epochs=epochs, shuffle=False,
                  verbose=0)
        return model
    finally:
        keras.distribution.set_distribution(None)


def _big_batch(accumulate, epochs=2):
    x, y = _data()
    return helpers.dense_big_batch_weights(
        "adam", x, y, MICRO, accumulate, epochs
    )


@pytest.mark.usefixtures("float64")
# `accumulate=3` is the version matrix's JAX distribution check (`slice`):
# Keras 3.10's `keras.distribution` on JAX needs JAX >= 0.4.29
# (`jax.make_array_from_process_local_data`).
@pytest.mark.parametrize(
    "accumulate", ["epoch", pytest.param(3, marks=pytest.mark.slice)]
)
def test_data_parallel_equals_single_device_big_batch(accumulate):
    import jax

    devices = jax.devices("cpu")
    assert len(devices) == 2, "conftest.py sets two host CPU devices"
    model = _accumulated(
        accumulate, keras.distribution.DataParallel(devices=devices)
    )
    kernel = model.trainable_variables[0].value
    assert len(kernel.sharding.device_set) == 2
    helpers.assert_exact(model.get_weights(), _big_batch(accumulate))


@pytest.mark.usefixtures("float64")
def test_model_parallel_shards_accumulators_as_their_weights():
    import jax

    mesh = keras.distribution.DeviceMesh(
        (2,), ["model"], devices=jax.devices("cpu")
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    # The hidden layer's (5, 8) kernel, split by columns (`clear_session`
    # in conftest.py restarts the layer names at "dense").
    layout_map["^dense/kernel"] = (None, "model")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="model"
    )
    model = _accumulated(3, distribution)
    kernel = model.trainable_variables[0]
    accumulator = model._accumulator.gradients[0][0]
    assert accumulator.value.sharding.is_equivalent_to(
        kernel.value.sharding, kernel.value.ndim
    )
    helpers.assert_exact(model.get_weights(), _big_batch(3))


@pytest.mark.usefixtures("float64")
def test_micro_steps_do_not_compute_the_optimizer_update():
    """The window's `lax.cond` holds the update: its branch that does not
    apply has no optimizer arithmetic, and the step runs it on micro-steps."""
    import jax

    x, y = _data()
    model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(x[:MICRO], y[:MICRO], batch_size=MICRO, epochs=1, verbose=0)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    batch = (x[:MICRO], y[:MICRO])
    text = str(jax.make_jaxpr(model.train_step)(state, batch))
    # One conditional for the window, and Adam's square root only inside it.
    outer = text.split("cond[")[0]
    assert "sqrt" not in outer
    assert "cond[" in text and "sqrt" in text


def test_trains_without_tensorflow(tmp_path):
    """A Colab TPU runtime has no TensorFlow: block its import and train,
    save and load."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None  # `import tensorflow` now fails
        import numpy as np
        import keras
        import keras_accum
        x = np.random.default_rng(0).normal(size=(20, 3)).astype("float32")
        inputs = keras.Input((3,))
        model = keras_accum.AccumulatingModel(
            inputs, keras.layers.Dense(1)(inputs), accumulate=2)
        model.compile(optimizer="adam", loss="mse")
        model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 6
        path = {str(tmp_path / "model.keras")!r}
        model.save(path)
        loaded = keras.saving.load_model(path)
        assert loaded.accumulate == 2
        assert sys.modules["tensorflow"] is None
        print("trained without tensorflow")
        """
    )
    result = helpers.run_python(script, "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained without tensorflow" in result.stdout


@pytest.mark.usefixtures("float64")
def test_mixed_bfloat16_accumulates_in_float32():
    x, y = _data()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = AccumulatingModel(*helpers.dense_graph(), accumulate=3)
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x.astype("float32"), y.astype("float32"), batch_size=MICRO,
                  epochs=1, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(
        keras.backend.standardize_dtype(a.dtype) == "float32"
        for a in model._accumulator.gradients[0]
    )
    assert int(model.optimizer.iterations.numpy()) == 2
    assert np.all(np.isfinite(model.get_weights()[0]))


class _LoggingStep(FunctionalAccumulatingModel):
    """A custom JAX step that accumulates through `super()`."""

    def train_step(self, state, data):
        logs, state = super().train_step(state, data)
        return {**logs, "extra": keras.ops.ones(())}, state


class _OwnUpdates(FunctionalAccumulatingModel):
    """A custom JAX step that applies its own update: plain Keras' step."""

    def train_step(self, state, data):
        return keras.Model.train_step(self, state, data)


@pytest.mark.usefixtures("float64")
def test_custom_step_through_super_is_exact():
    x, y = _data()
    model = _LoggingStep(*helpers.dense_graph(), accumulate=3)
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    history = model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False,
                        verbose=0)
    assert "extra" in history.history
    helpers.assert_exact(model.get_weights(), _big_batch(3))


def test_custom_step_that_does_not_accumulate_is_refused():
    x, y = _data()
    model = _OwnUpdates(*helpers.dense_graph(), accumulate=3)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="accumulated no gradient"):
        model.fit(x, y, batch_size=MICRO, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0
