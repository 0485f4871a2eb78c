"""Bad input fails loudly, naming the argument and what is allowed."""

import keras
import pytest

import keras_accum
from keras_accum import AccumulatingModel
from tests import helpers


@pytest.mark.parametrize(
    "accumulate, error",
    [
        (0, ValueError),
        (-2, ValueError),
        (2.5, TypeError),
        ("weekly", ValueError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_accumulate(accumulate, error):
    with pytest.raises(error, match=r"`accumulate` must be \"epoch\" or an int"):
        AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate)


def test_bad_accumulate_echoes_value():
    with pytest.raises(ValueError, match="Received: accumulate='weekly'"):
        AccumulatingModel(*helpers.dense_graph(), accumulate="weekly")


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"`reduction` must be one of .*avg"):
        AccumulatingModel(*helpers.dense_graph(), reduction="avg")


@pytest.mark.parametrize("model", [object(), "model", keras.layers.Dense(2)])
def test_wrap_rejects_non_models(model):
    with pytest.raises(TypeError, match="`model` must be a functional"):
        keras_accum.wrap(model)


def test_wrap_rejects_subclassed_models():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclass `AccumulatingModel`"):
        keras_accum.wrap(Net())


def test_wrap_rejects_accumulating_models():
    model = AccumulatingModel(*helpers.dense_graph())
    with pytest.raises(ValueError, match="already accumulates"):
        keras_accum.wrap(model)


def test_wrap_validates_arguments():
    base = keras.Model(*helpers.dense_graph())
    with pytest.raises(ValueError, match="accumulate"):
        keras_accum.wrap(base, accumulate=0)


def test_optimizer_with_its_own_accumulation():
    model = AccumulatingModel(*helpers.dense_graph())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        model.compile(
            optimizer=keras.optimizers.SGD(gradient_accumulation_steps=4),
            loss="mse",
        )


def test_functional_subclass_must_derive_from_functional_variant():
    class Sub(AccumulatingModel):
        pass

    with pytest.raises(TypeError, match="FunctionalAccumulatingModel"):
        Sub(*helpers.dense_graph())
    # The base class is still usable both ways afterwards.
    AccumulatingModel(*helpers.dense_graph())


def test_apply_before_compile_is_explained():
    model = AccumulatingModel(*helpers.dense_graph())
    with pytest.raises(RuntimeError, match="call `compile\\(\\)` first"):
        model.apply_accumulated_gradients()


def test_non_tensorflow_backend_is_rejected(monkeypatch):
    # Keras' other backends need JAX or PyTorch, which the test environment
    # does not install; the check reads `keras.backend.backend()`, so report
    # another backend name there.
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="requires the TensorFlow backend.*jax"):
        AccumulatingModel(accumulate=2)
