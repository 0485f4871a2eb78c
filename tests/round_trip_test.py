"""Every model form saves to `.keras` and loads in a fresh process.

The loading process imports only `keras_accum` (and Keras): a checkpoint must
load wherever the library is installed, without the test code that defined
the model. Run on every Keras in the version matrix (`scripts/`).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_accum
from keras_accum import AccumulatingModel

pytestmark = [pytest.mark.slice, pytest.mark.backends]

_X = np.linspace(-1.0, 1.0, 24, dtype="float32").reshape(8, 3)
_Y = np.linspace(0.0, 1.0, 16, dtype="float32").reshape(8, 2)


@keras.saving.register_keras_serializable(package="keras_accum_tests")
class TwoLayerNet(AccumulatingModel):
    """A subclassed model: its class must be imported to load it, so the
    loading process imports this module just before loading it (last)."""

    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(units)

    def call(self, inputs):
        return self.out(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _graph():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    return inputs, keras.layers.Dense(2)(hidden)


def _forms():
    inputs, outputs = _graph()
    sequential = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    return {
        "functional": AccumulatingModel(*_graph(), accumulate=3),
        "wrapped_sequential": keras_accum.wrap(sequential, accumulate=2),
        "wrapped_functional": keras_accum.wrap(
            keras.Model(inputs, outputs), accumulate="epoch"
        ),
        "schedule": AccumulatingModel(
            *_graph(), accumulate={0: 1, 1: 2, 2: "epoch"}
        ),
        # Last: loading it imports the test module that defines the class.
        "subclassed": TwoLayerNet(accumulate=2, reduction="sum"),
    }


_LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_accum

    x = np.linspace(-1.0, 1.0, 24, dtype="float32").reshape(8, 3)
    y = np.linspace(0.0, 1.0, 16, dtype="float32").reshape(8, 2)
    result = {}
    for name, path in json.loads(sys.argv[1]).items():
        if name == "subclassed":
            # Appended, so an installed keras_accum is not shadowed.
            sys.path.append(sys.argv[2])
            import tests.round_trip_test  # noqa: F401  (defines the class)
        model = keras.saving.load_model(path)
        assert isinstance(model, keras_accum.AccumulatingModel), type(model)
        # A direct call, not `predict`: no traced function per model.
        prediction = keras.ops.convert_to_numpy(model(x))
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        result[name] = {
            "class": type(model).__name__,
            "accumulate": model.accumulate,
            "reduction": model.reduction,
            "prediction": prediction.tolist(),
        }
    print("RESULT" + json.dumps(result))
    """
)


def test_every_model_form_loads_in_a_process_with_only_keras_accum(tmp_path):
    """Catches a model that saves but cannot be loaded (before Keras 3.15 a
    functional `AccumulatingModel` saved without its graph), or loads only
    where the defining code was imported."""
    paths, expected = {}, {}
    for name, model in _forms().items():
        model.compile(optimizer="adam", loss="mse")
        model.fit(_X, _Y, batch_size=4, epochs=1, verbose=0)
        paths[name] = str(tmp_path / f"{name}.keras")
        model.save(paths[name])
        expected[name] = (model, keras.ops.convert_to_numpy(model(_X)))

    environment = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(paths), root],
        capture_output=True, text=True, env=environment, timeout=300,
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    line = next(
        row for row in process.stdout.splitlines() if row.startswith("RESULT")
    )
    loaded = json.loads(line[len("RESULT"):])
    for name, (model, prediction) in expected.items():
        assert loaded[name]["class"] == type(model).__name__, name
        assert loaded[name]["reduction"] == model.reduction, name
        accumulate = model.accumulate
        if isinstance(accumulate, dict):
            accumulate = {str(k): v for k, v in accumulate.items()}
        assert loaded[name]["accumulate"] == accumulate, name
        np.testing.assert_allclose(
            loaded[name]["prediction"], prediction, rtol=1e-6, atol=1e-7,
            err_msg=name,
        )
