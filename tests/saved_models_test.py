"""Reload tests for the committed artifacts in `saved_models/`.

They were written by `python examples/train_digits.py --save-models` at its
default settings, on JAX (see `saved_models/README.md`): the `accumulate=8`
convnet on scikit-learn's digits, as a `.keras` file and as a serving
SavedModel. These tests load them on TensorFlow: a file saved on one
backend loads on the other.
"""

import importlib
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_accum

REPO = pathlib.Path(__file__).resolve().parents[1]
SAVED_MODELS = REPO / "saved_models"
KERAS_FILE = SAVED_MODELS / "digits_accum.keras"
EXPORT_DIR = SAVED_MODELS / "digits_accum_export"
NUM_IMAGES = 50


@pytest.fixture(scope="module")
def test_digits():
    """The first test images and labels, split as the example splits them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "examples"))
        train_digits = importlib.import_module("train_digits")
        _, x_test, _, y_test = train_digits.load_data()
    return x_test[:NUM_IMAGES], y_test[:NUM_IMAGES]


@pytest.fixture
def loaded_model():
    return keras.models.load_model(KERAS_FILE)


def test_artifacts_are_small():
    files = [KERAS_FILE] + [p for p in EXPORT_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2 * 2**20


def test_keras_file_loads_as_accumulating_model(loaded_model):
    assert isinstance(loaded_model, keras_accum.AccumulatingModel)
    assert loaded_model.accumulate == 8
    assert loaded_model.reduction == "mean"
    assert loaded_model.get_config()["accumulate"] == 8
    # 20 epochs of 5 windows: the optimizer state is saved with the model.
    assert int(loaded_model.optimizer.iterations.numpy()) == 100


def test_keras_file_classifies_test_digits(loaded_model, test_digits):
    images, labels = test_digits

    probabilities = loaded_model.predict(images, verbose=0)

    assert np.mean(np.argmax(probabilities, axis=-1) == labels) > 0.8


def test_keras_file_resumes_accumulating(loaded_model, test_digits):
    images, labels = test_digits

    # 50 images in micro-batches of 32: one partial window of 2, applied at
    # the end of the epoch.
    loaded_model.fit(images, labels, batch_size=32, epochs=1, verbose=0)

    assert int(loaded_model.optimizer.iterations.numpy()) == 101
    assert loaded_model.mini_step == 0


def test_export_serves_the_same_predictions(loaded_model, test_digits):
    images, _ = test_digits
    expected = loaded_model.predict(images, verbose=0)

    # Keep the loaded object alive: its functions do not own its variables.
    exported = tf.saved_model.load(str(EXPORT_DIR))
    served = exported.serve(tf.constant(images))

    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)


def test_export_loads_as_tfsm_layer(loaded_model, test_digits):
    images, _ = test_digits
    expected = loaded_model.predict(images, verbose=0)

    layer = keras.layers.TFSMLayer(str(EXPORT_DIR), call_endpoint="serve")

    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(images)), expected, atol=1e-5
    )
