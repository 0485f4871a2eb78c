"""The PyTorch backend: what torch users do beyond the shared tests
(float64, relative 1e-9 against plain Keras on torch with the big batch).

Run with `KERAS_BACKEND=torch python -m pytest -m backends` (the `jax` marker
selects the tests every backend runs).
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
        keras.backend.backend() != "torch", reason="tests the torch backend"
    ),
]

# 44 examples in batches of 8: a ragged last batch of 4.
EXAMPLES, BATCH = 44, 8


def _data():
    return helpers.regression_data(EXAMPLES)


def _big_batch(accumulate, epochs=2):
    x, y = _data()
    return helpers.dense_big_batch_weights(
        "adam", x, y, BATCH, accumulate, epochs
    )


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("accumulate", ["epoch", 3])
def test_data_loader_input_is_exact(accumulate):
    """A `torch.utils.data.DataLoader` of (x, y) batches, as torch users
    feed `fit`."""
    import torch

    x, y = _data()
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    model = AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate)
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    model.fit(loader, epochs=2, verbose=0)
    helpers.assert_exact(model.get_weights(), _big_batch(accumulate))


class _SuperStep(FunctionalAccumulatingModel):
    """A custom torch step that accumulates through `super()`."""

    def train_step(self, data):
        logs = super().train_step(data)
        return {**logs, "extra": keras.ops.ones(())}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_custom_step_through_super_is_exact(micro_batch_size):
    x, y = _data()
    model = _SuperStep(*helpers.dense_graph(), accumulate=3,
                       micro_batch_size=micro_batch_size)
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False,
                        verbose=0)
    assert history.history["extra"] == [1.0, 1.0]
    helpers.assert_exact(model.get_weights(), _big_batch(3))


class _OwnUpdate(FunctionalAccumulatingModel):
    train_step = helpers.own_torch_update


def test_refused_custom_step_leaves_weights_as_they_were():
    """torch runs the step before it can be refused (TensorFlow and JAX
    refuse while tracing): the update it applied is undone."""
    x, y = _data()
    model = _OwnUpdate(*helpers.dense_graph(), accumulate=3)
    model.compile(optimizer="sgd", loss="mse")
    start = model.get_weights()
    with pytest.raises(TypeError, match="accumulated no gradient"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for now, before in zip(model.get_weights(), start):
        np.testing.assert_array_equal(now, before)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_trains_without_tensorflow_or_jax(tmp_path):
    """keras_accum on torch imports neither TensorFlow nor JAX: block both
    and train, save and load."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None  # `import tensorflow` now fails
        sys.modules["jax"] = None
        import numpy as np
        import keras
        import keras_accum
        x = np.random.default_rng(0).normal(size=(20, 3)).astype("float32")
        inputs = keras.Input((3,))
        model = keras_accum.AccumulatingModel(
            inputs, keras.layers.Dense(1)(inputs), accumulate=2,
            micro_batch_size=3)
        model.compile(optimizer="adam", loss="mse")
        model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 6
        path = {str(tmp_path / "model.keras")!r}
        model.save(path)
        loaded = keras.saving.load_model(path)
        assert loaded.accumulate == 2
        print("trained without tensorflow or jax")
        """
    )
    result = helpers.run_python(script, "torch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained without tensorflow or jax" in result.stdout


def test_freezing_inside_a_window_is_refused_before_any_update():
    """Plain Keras on torch trains a layer frozen without `compile()` no
    more, at once; inside a window the summed gradients belong to the old
    set, so the step refuses instead of applying them to the new one."""
    x, y = _data()
    inputs = keras.Input((x.shape[1],))
    hidden = keras.layers.Dense(4)
    outputs = keras.layers.Dense(1)(hidden(inputs))
    model = AccumulatingModel(inputs, outputs, accumulate=4)
    model.compile(optimizer="sgd", loss="mse")

    class FreezeAfterTwoBatches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                hidden.trainable = False

    start = model.get_weights()
    with pytest.raises(ValueError, match="changed since `compile\\(\\)`"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                  callbacks=[FreezeAfterTwoBatches()])
    for now, before in zip(model.get_weights(), start):
        np.testing.assert_array_equal(now, before)
    assert int(model.optimizer.iterations.numpy()) == 0
