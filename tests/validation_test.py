"""Bad input fails loudly, naming the argument and what is allowed."""

import re

import keras
import pytest

import keras_accum
from keras_accum import AccumulatingModel
from tests import helpers

pytestmark = pytest.mark.backends


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


def test_unsupported_backend_is_rejected():
    # Keras' NumPy backend ships with Keras (no extra install) and has no
    # training: a real backend keras_accum has no step for. Checked in a
    # fresh process, since a process chooses its backend once.
    script = (
        "import keras_accum, sys\n"
        "try:\n"
        "    keras_accum.AccumulatingModel(accumulate=2)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "    sys.exit(0)\n"
        "sys.exit('no error')\n"
    )
    result = helpers.run_python(script, "numpy", timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"supports the TensorFlow, JAX and torch backends.*KERAS_BACKEND.*"
        r"Received: keras\.backend\.backend\(\)='numpy'",
        result.stdout,
    ), result.stdout
