"""`.keras` save/load, resuming after a load, and `model.export`."""

import keras
import numpy as np
import pytest

import keras_accum
from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import ACCUMULATION_ARGUMENTS
from tests import helpers
from tests.helpers import RTOL

pytestmark = [pytest.mark.slice, pytest.mark.backends]


def _fit(model, x, y, epochs, initial_epoch=0):
    model.fit(x, y, batch_size=64, epochs=epochs, initial_epoch=initial_epoch,
              shuffle=False, verbose=0)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("accumulate", ["epoch", 3])
def test_save_load_resume_equals_uninterrupted(tmp_path, accumulate):
    x, y = helpers.regression_data(500)
    model = AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate,
                              reduction="mean")
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse",
                  metrics=["mae"])
    _fit(model, x, y, epochs=2)
    path = tmp_path / "model.keras"
    model.save(path)

    restored = keras.models.load_model(path)
    assert isinstance(restored, AccumulatingModel)
    assert restored.accumulate == accumulate
    assert restored.reduction == "mean"
    assert int(restored.optimizer.iterations.numpy()) == int(
        model.optimizer.iterations.numpy()
    )
    _fit(restored, x, y, epochs=4, initial_epoch=2)

    uninterrupted = AccumulatingModel(*helpers.dense_graph(),
                                      accumulate=accumulate)
    uninterrupted.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    _fit(uninterrupted, x, y, epochs=4)
    error = helpers.relative_error(restored.get_weights(),
                                   uninterrupted.get_weights())
    assert error <= RTOL


def test_subclassed_model_round_trips(tmp_path):
    @keras.saving.register_keras_serializable(package="keras_accum_tests")
    class Net(AccumulatingModel):
        def __init__(self, units=4, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.dense = keras.layers.Dense(units)

        def call(self, inputs):
            return self.dense(inputs)

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    model = Net(units=3, accumulate=5, reduction="sum")
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 2), "float32")
    model.fit(x, np.zeros((8, 3), "float32"), epochs=1, verbose=0)
    model.save(tmp_path / "net.keras")
    restored = keras.models.load_model(tmp_path / "net.keras")
    assert type(restored).__name__ == "Net"
    assert (restored.accumulate, restored.reduction) == (5, "sum")
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               model.predict(x, verbose=0))


def test_wrapped_model_round_trips(tmp_path):
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model = keras_accum.wrap(base, accumulate=2)
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    model.save(tmp_path / "wrapped.keras")
    restored = keras.models.load_model(tmp_path / "wrapped.keras")
    assert isinstance(restored, AccumulatingModel)
    assert restored.accumulate == 2


def test_export_serves_predictions(tmp_path):
    # On JAX, `export` goes through jax2tf: it needs TensorFlow.
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() == "torch":
        # Keras 3.15's SavedModel export through `torch.export` fails for
        # plain functional models on torch 2.13 ("mismatch between the
        # structure of `inputs` and `dynamic_shapes`"): nothing to match.
        plain = keras.Model(*helpers.dense_graph())
        try:
            plain.export(str(tmp_path / "plain"))
        except Exception as error:  # noqa: BLE001
            pytest.skip(f"plain Keras cannot export on torch: {error}")
    model = AccumulatingModel(*helpers.dense_graph(), accumulate=4)
    model.compile(optimizer="adam", loss="mse")
    x, y = helpers.regression_data(128)
    x, y = x.astype("float32"), y.astype("float32")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.export(str(tmp_path / "export"))
    served = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(
        served.serve(tf.constant(x[:5])).numpy(),
        model.predict(x[:5], verbose=0),
        rtol=1e-6,
    )
    names = [v.name for v in served.variables]
    assert not any("accumulator" in name for name in names)


_NON_DEFAULT_ARGUMENTS = {
    "accumulate": 4,
    "reduction": "sum",
    "loss_normalisation": "per_loss",
    "on_nonfinite": "skip",
    "micro_batch_size": 3,
}


# No leading `_`: the default model name would be an invalid scope name.
class SubclassedNet(AccumulatingModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def _functional(**arguments):
    return AccumulatingModel(*helpers.dense_graph(), **arguments)


def _wrapped_sequential(**arguments):
    sequential = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1),
    ])
    return keras_accum.wrap(sequential, **arguments)


def _subclassed(**arguments):
    model = SubclassedNet(**arguments)
    model(np.zeros((1, 5)))
    return model


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "make", [_functional, _wrapped_sequential, _subclassed],
    ids=["functional", "wrapped-sequential", "subclassed"],
)
def test_clone_model_keeps_the_accumulation_arguments(make):
    """Catches `keras.models.clone_model` building the clone with the
    default arguments (issue 25, case 5: Keras constructs a functional
    clone from inputs, outputs and name only, so it trained with
    `accumulate="epoch"`, `reduction="mean"`, `on_nonfinite="raise"`)."""
    model = make(**_NON_DEFAULT_ARGUMENTS)
    clone = keras.models.clone_model(model)
    assert type(clone) is type(model)
    for name in ACCUMULATION_ARGUMENTS:
        assert getattr(clone, name) == getattr(model, name), name
    if not clone.built:
        clone(np.zeros((1, 5)))
    # Copies: on JAX 0.4.29 a NumPy view of a weight can alias the buffer
    # that `model.fit` donates, and the clone would read freed memory.
    clone.set_weights([np.array(w) for w in model.get_weights()])
    x, y = helpers.regression_data(64)
    for m in (model, clone):
        m.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert int(clone.optimizer.iterations.numpy()) == 2
    assert helpers.relative_error(
        clone.get_weights(), model.get_weights()
    ) <= RTOL


def test_clone_model_keeps_an_accumulate_schedule():
    """Catches a functional clone losing an `accumulate` schedule (issue
    25, case 5)."""
    model = _functional(accumulate={0: 2, 3: "epoch"})
    clone = keras.models.clone_model(model)
    assert clone.accumulate == {0: 2, 3: "epoch"}


def test_every_constructor_argument_is_saved_and_cloned():
    """Catches a new `AccumulatingModel` argument missing from
    `_accumulation_arguments`, the one list `get_config` and `clone_model`
    read (issue 25, case 5: the clone would silently take its default)."""
    model = _functional(**_NON_DEFAULT_ARGUMENTS)
    assert set(model._accumulation_arguments()) == set(
        ACCUMULATION_ARGUMENTS)
    assert set(ACCUMULATION_ARGUMENTS) <= set(model.get_config())
    for name in ACCUMULATION_ARGUMENTS:
        assert hasattr(type(model), name), name
