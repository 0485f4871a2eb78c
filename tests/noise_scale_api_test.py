"""`noise_scale` and `NoiseScaleSchedule` through the public API.

The refusals, the epoch logs, training left unchanged by the measurement,
saving, cloning and wrapping, the schedule's rule, exact resumption after
`load_model`, and the TensorBoard scalar.
"""

import math
import re

import keras
import numpy as np
import pytest

import keras_accum
from keras_accum import AccumulatingModel
from keras_accum import NoiseScaleEstimate
from keras_accum import NoiseScaleSchedule
from keras_accum._compat import regularisers as compat_regularisers
from tests import helpers

pytestmark = pytest.mark.backends

#: Turning the measurement on must not move a single weight: both runs do
#: the same arithmetic, so only a reordering of sums could differ.
SAME_TRAINING_RTOL = 1e-12

LOG_KEYS = ("noise_scale", "noise_scale_trace", "noise_scale_grad_sq")

# 100 examples in batches of 8: 13 batches, the last one ragged (4).
EXAMPLES, BATCH = 100, 8
# The estimate exists once each of the `BLOCKS` blocks has been measured:
# the w-th measuring window (two micro-batches or more) reads block
# `w mod BLOCKS` (windows of a whole epoch read one block, the whole
# gradient). 340 examples are 43 batches (the last ragged, 4), so one
# epoch holds at least `BLOCKS` measuring windows for every window of up
# to 5 batches: 9 windows of 5 (the last 3), 11 of 4 (the last 3), 15 of
# 3 (the last 1 batch).
BLOCKS = 8
MEASURED_EXAMPLES = 340


def _data(n=EXAMPLES):
    return helpers.regression_data(n)


def _model(**arguments):
    return AccumulatingModel(*helpers.dense_graph(), **arguments)


def _compiled(optimizer="adam", **arguments):
    compile_arguments = {
        key: arguments.pop(key)
        for key in ("jit_compile", "steps_per_execution")
        if key in arguments
    }
    model = _model(**arguments)
    model.compile(optimizer=helpers.make_optimizer(optimizer), loss="mse",
                  **compile_arguments)
    return model


def _fit(model, x, y, epochs=2, batch_size=BATCH, **kwargs):
    kwargs.setdefault("verbose", 0)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                     shuffle=False, **kwargs)


def _expected_window(estimate, schedule):
    """The schedule's rule, written out from its documentation."""
    if estimate.grad_sq <= 0 or not math.isfinite(estimate.noise_scale):
        return schedule.max_window
    batches = estimate.noise_scale / estimate.batch_normaliser
    return min(schedule.max_window, max(2, round(batches)))


class _Recorder(keras.callbacks.Callback):
    """Records, per epoch, the window decided at its start, the updates it
    applied and the estimate at its end.

    Runs after `ApplyAccumulatedGradients` (which `fit` puts first), so at
    `on_epoch_begin` the epoch's window is decided and at `on_epoch_end`
    the epoch's last window is applied and the estimate final.
    """

    def __init__(self):
        super().__init__()
        self.windows = {}  # epoch -> model._schedule.window_size(epoch)
        self.currents = {}  # epoch -> the NoiseScaleSchedule's `current`
        self.updates = {}  # epoch -> optimizer updates in the epoch
        self.estimates = {}  # epoch -> noise_scale_estimate at its end
        self.logs = {}  # epoch -> the noise keys of the epoch logs
        self._iterations = 0

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        self.windows[epoch] = model._schedule.window_size(epoch)
        if isinstance(model.accumulate, NoiseScaleSchedule):
            self.currents[epoch] = model.accumulate.current
        self._iterations = int(model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        self.updates[epoch] = (
            int(model.optimizer.iterations.numpy()) - self._iterations
        )
        self.estimates[epoch] = model.noise_scale_estimate
        self.logs[epoch] = {k: logs[k] for k in LOG_KEYS if k in logs}


# --- 1. Refusals ----------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0, 1.0, "auto", [True]])
def test_noise_scale_must_be_a_bool_or_none(value):
    with pytest.raises(TypeError, match=r"`noise_scale` must be True, False "
                       r"or None\. Received: noise_scale="
                       + re.escape(repr(value))):
        _model(accumulate=3, noise_scale=value)


@pytest.mark.parametrize(
    "arguments, pattern",
    [
        ({"accumulate": 3, "reduction": "sum", "noise_scale": True},
         r"noise_scale=True.*Received: reduction='sum'"),
        ({"accumulate": "epoch", "reduction": "sum", "noise_scale": True},
         r"noise_scale=True.*Received: reduction='sum'"),
        ({"accumulate": "auto", "reduction": "sum"},
         r"noise_scale=True.*Received: reduction='sum'"),
        ({"accumulate": 1, "noise_scale": True},
         r"noise_scale=True.*Received: accumulate=1"),
        ({"accumulate": "auto", "noise_scale": False},
         r"accumulate=.*noise_scale=False.*Received: noise_scale=False"),
        ({"accumulate": NoiseScaleSchedule(max_window=8),
              "noise_scale": False},
         (r"accumulate=NoiseScaleSchedule\(max_window=8.*"
          r"Received: noise_scale=False")),
    ],
    ids=["sum-n", "sum-epoch", "sum-auto", "accumulate-1", "auto-off",
         "schedule-off"],
)
@pytest.mark.parametrize("construct", ["model", "wrap"])
def test_unmeasurable_noise_scale_is_refused(arguments, pattern, construct):
    with pytest.raises(ValueError, match=pattern):
        if construct == "model":
            _model(**arguments)
        else:
            keras_accum.wrap(keras.Model(*helpers.dense_graph()),
                             **arguments)


def test_what_the_refusals_allow():
    """The refusals' boundaries: micro-batches make `accumulate=1`
    measurable, and `noise_scale=None` follows `accumulate`."""
    assert _model(accumulate=1, micro_batch_size=3,
                  noise_scale=True).noise_scale is True
    assert _model(accumulate=1, noise_scale=False).noise_scale is False
    assert _model(accumulate=3, reduction="sum").noise_scale is False
    assert _model(accumulate=3).noise_scale is False
    assert _model(accumulate="epoch").noise_scale is False
    assert _model(accumulate={0: 1, 2: 4}).noise_scale is False
    assert _model(accumulate="auto").noise_scale is True
    assert _model(accumulate=NoiseScaleSchedule(),
                  noise_scale=True).noise_scale is True
    assert _model(accumulate=3, noise_scale=True).noise_scale is True


def _two_outputs(**arguments):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        4, activation="tanh",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
    )(inputs)
    outputs = [
        keras.layers.Dense(1, name="a")(hidden),
        keras.layers.Dense(1, name="b")(hidden),
    ]
    model = AccumulatingModel(inputs, outputs, accumulate=2,
                              noise_scale=True, **arguments)
    model.compile(optimizer="sgd", loss=["mse", "mse"])
    x, y = _data(32)
    return model, x, [y, y]


def _activity_penalty(**arguments):
    if not compat_regularisers.ACTIVITY_REGULARISATION_IS_BATCH_MEAN:
        pytest.skip("activity penalties share the loss's set before "
                    "Keras 3.14")
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(
        1, activity_regularizer=keras.regularizers.L2(0.01),
    )(inputs)
    model = AccumulatingModel(inputs, outputs, accumulate=2,
                              noise_scale=True, **arguments)
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(32)
    return model, x, y


def _summed_loss(**arguments):
    model = _model(accumulate=2, noise_scale=True, **arguments)
    model.compile(optimizer="sgd",
                  loss=keras.losses.MeanSquaredError(reduction="sum"))
    x, y = _data(32)
    return model, x, y


@pytest.mark.parametrize(
    "make, arguments",
    [
        (_two_outputs, {}),
        (_two_outputs, {"loss_normalisation": "per_loss"}),
        (_two_outputs, {"loss_normalisation": "auto"}),
        (_activity_penalty, {}),
        (_summed_loss, {}),
    ],
    ids=["two-losses", "two-losses-per-loss", "two-losses-auto",
         "activity-penalty", "summed-loss"],
)
def test_loss_in_several_parts_is_refused_at_the_first_step(make, arguments):
    model, x, y = make(**arguments)
    with pytest.raises(ValueError,
                       match=r"`noise_scale=True` .*Received: accumulator "
                       r"sets with divides="):
        model.fit(x, y, batch_size=8, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_two_losses_with_shared_normalisation_are_measured():
    """The way out the refusal names: one set for both terms. Four epochs
    of two windows: every block measured once."""
    model, x, y = _two_outputs(loss_normalisation="shared")
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    assert model.noise_scale_estimate is None  # 6 windows: not yet.
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    estimate = model.noise_scale_estimate
    assert estimate is not None
    assert np.isfinite(estimate).all(), estimate


@pytest.mark.parametrize(
    "arguments, error, pattern",
    [
        ({"max_window": 1}, ValueError, r"`max_window`.*max_window=1"),
        ({"max_window": 0}, ValueError, r"`max_window`.*max_window=0"),
        ({"max_window": 8.0}, ValueError, r"`max_window`.*max_window=8\.0"),
        ({"max_window": True}, ValueError, r"`max_window`.*max_window=True"),
        ({"max_window": "64"}, ValueError, r"`max_window`.*max_window='64'"),
        ({"every": 0}, ValueError, r"`every`.*every=0"),
        ({"every": -1}, ValueError, r"`every`.*every=-1"),
        ({"every": 1.5}, ValueError, r"`every`.*every=1\.5"),
        ({"initial": 1}, ValueError, r"`initial`.*initial=1"),
        ({"initial": None}, ValueError, r"`initial`.*initial=None"),
        ({"initial": 9, "max_window": 8}, ValueError,
         r"`initial` must be at most `max_window`.*initial=9, max_window=8"),
        ({"current": 0}, ValueError, r"`current`.*current=0"),
        ({"current": "weekly"}, ValueError, r"`current`.*current='weekly'"),
        ({"current": 2.5}, TypeError, r"`current`.*current=2\.5"),
    ],
)
def test_bad_noise_scale_schedule_arguments(arguments, error, pattern):
    with pytest.raises(error, match=pattern):
        NoiseScaleSchedule(**arguments)


# --- 2. Epoch logs ----------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "arguments, validation",
    [
        ({"accumulate": 5, "noise_scale": True}, False),
        ({"accumulate": "epoch", "noise_scale": True}, False),
        ({"accumulate": 5, "noise_scale": True}, True),
        ({"accumulate": "epoch", "noise_scale": True}, True),
        ({"accumulate": 1, "micro_batch_size": 3, "noise_scale": True}, False),
        ({"accumulate": NoiseScaleSchedule(max_window=4)}, True),
    ],
    ids=["n", "epoch", "n-validation", "epoch-validation",
         "micro-batches", "schedule-validation"],
)
def test_history_holds_the_estimate_of_each_epoch(arguments, validation):
    arguments = dict(arguments)
    if isinstance(arguments["accumulate"], NoiseScaleSchedule):
        # A fresh copy: the schedule keeps the window it decides.
        arguments["accumulate"] = NoiseScaleSchedule.from_config(
            arguments["accumulate"].get_config())
    # Enough windows for an estimate from the first epoch on.
    x, y = _data(MEASURED_EXAMPLES)
    model = _compiled(**arguments)
    recorder = _Recorder()
    epochs = 3
    kwargs = {"validation_data": _data(20)} if validation else {}
    history = _fit(model, x, y, epochs=epochs, callbacks=[recorder], **kwargs)
    logged = history.history
    for key in LOG_KEYS:
        assert len(logged[key]) == epochs, key
        assert f"val_{key}" not in logged
    if validation:
        assert len(logged["val_loss"]) == epochs
    for epoch in range(epochs):
        estimate = recorder.estimates[epoch]
        assert isinstance(estimate, NoiseScaleEstimate)
        expected = estimate.logs()
        assert set(expected) == set(LOG_KEYS)
        for key in LOG_KEYS:
            assert logged[key][epoch] == expected[key], (key, epoch)
            assert recorder.logs[epoch][key] == expected[key], (key, epoch)
        assert expected["noise_scale"] == estimate.noise_scale
        assert expected["noise_scale_trace"] == estimate.trace
        assert expected["noise_scale_grad_sq"] == estimate.grad_sq
        assert np.isfinite(estimate).all()
        assert estimate.trace > 0
    assert model.noise_scale_estimate == recorder.estimates[epochs - 1]
    # The estimate moves with training: each epoch logs its own.
    assert len(set(logged["noise_scale"])) == epochs


@pytest.mark.usefixtures("float64")
def test_epochs_before_the_first_measured_window_log_nan():
    """Epoch 0 applies windows of one micro-batch (nothing to measure),
    epoch 1 windows of three; epoch 2 again of one, which keeps the
    estimate. 204 examples are 26 batches: epoch 1 applies 9 windows of
    three (the last two), enough to measure each of the `BLOCKS` blocks."""
    x, y = _data(204)
    model = _compiled(accumulate={0: 1, 1: 3, 2: 1}, noise_scale=True)
    assert model.noise_scale_estimate is None
    recorder = _Recorder()
    history = _fit(model, x, y, epochs=3, callbacks=[recorder]).history
    assert recorder.estimates[0] is None
    for key in LOG_KEYS:
        assert len(history[key]) == 3
        assert math.isnan(history[key][0]), key
        assert math.isnan(recorder.logs[0][key]), key
    measured = recorder.estimates[1]
    assert measured is not None
    for epoch in (1, 2):
        for key in LOG_KEYS:
            assert history[key][epoch] == measured.logs()[key]
    assert recorder.estimates[2] == measured


def test_no_estimate_until_every_block_is_measured():
    """Windows of two batches, one `fit` per window: the first `BLOCKS - 1`
    windows measure all blocks but one, so no estimate yet; the next
    window measures the last block and the estimate exists. `fit` calls
    continue the count of windows."""
    x, y = _data(2 * BATCH * BLOCKS)
    model = _compiled(optimizer="sgd", accumulate=2, noise_scale=True)
    window = 2 * BATCH
    for w in range(BLOCKS):
        assert model.noise_scale_estimate is None, w
        history = _fit(model, x[w * window:(w + 1) * window],
                       y[w * window:(w + 1) * window], epochs=1).history
        assert int(model.optimizer.iterations.numpy()) == w + 1
        if w < BLOCKS - 1:
            assert math.isnan(history["noise_scale"][0]), w
    estimate = model.noise_scale_estimate
    assert isinstance(estimate, NoiseScaleEstimate)
    assert np.isfinite(estimate).all(), estimate
    assert history["noise_scale"] == [estimate.noise_scale]


@pytest.mark.usefixtures("float64")
def test_one_batch_epochs_log_nan():
    """Every window is one micro-batch: never an estimate."""
    x, y = _data(8)
    model = _compiled(accumulate="epoch", noise_scale=True)
    history = _fit(model, x, y, epochs=2).history
    for key in LOG_KEYS:
        assert len(history[key]) == 2
        assert all(math.isnan(value) for value in history[key])
    assert model.noise_scale_estimate is None


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arguments", [
    {"accumulate": 5}, {"accumulate": "epoch"},
    {"accumulate": 5, "noise_scale": False},
    {"accumulate": 1, "micro_batch_size": 3},
])
def test_no_noise_logs_or_state_when_off(arguments):
    x, y = _data()
    model = _compiled(**arguments)
    history = _fit(model, x, y, validation_data=_data(20)).history
    assert model.noise_scale is False
    for key in LOG_KEYS:
        assert key not in history and f"val_{key}" not in history
    assert model.noise_scale_estimate is None
    accumulator = model._accumulator
    assert accumulator.noise_sums is None
    assert accumulator.noise_state is None
    assert accumulator.noise_variables() == []


# --- 3. Measuring never changes training -----------------------------------


def _nan_target(x, y):
    y = y.copy()
    y[13] = np.nan  # In the second batch of every epoch.
    return x, y


_TRAINING_CASES = [
    pytest.param({"accumulate": 5}, None, id="n"),
    pytest.param({"accumulate": 5, "optimizer": "sgd"}, None, id="n-sgd"),
    pytest.param({"accumulate": "epoch"}, None, id="epoch"),
    pytest.param({"accumulate": 1, "micro_batch_size": 3}, None,
                 id="micro-batches"),
    pytest.param({"accumulate": 2, "micro_batch_size": 3}, None,
                 id="n-micro-batches"),
    pytest.param({"accumulate": 5, "on_nonfinite": "skip"}, _nan_target,
                 id="skip"),
    pytest.param({"accumulate": 4, "jit_compile": True}, None, id="jit",
                 marks=pytest.mark.tensorflow_only),
    pytest.param({"accumulate": 4, "steps_per_execution": 2}, None,
                 id="steps-per-execution",
                 marks=helpers.SEVERAL_STEPS_PER_EXECUTION),
    pytest.param({"accumulate": 3, "steps_per_execution": 2}, None,
                 id="steps-per-execution-odd",
                 marks=helpers.SEVERAL_STEPS_PER_EXECUTION),
]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arguments, corrupt", _TRAINING_CASES)
def test_measuring_leaves_training_unchanged(arguments, corrupt):
    """Adam: its update divides by the gradient's own scale, so any change
    to the applied gradient shows in the weights."""
    optimizer = "adam"
    x, y = _data(MEASURED_EXAMPLES)
    if corrupt is not None:
        x, y = corrupt(x, y)
    weights, updates = {}, {}
    for noise_scale in (False, True):
        helpers.fresh_keras_state()
        case = dict(arguments)
        model = _compiled(optimizer=case.pop("optimizer", optimizer),
                          noise_scale=noise_scale, **case)
        _fit(model, x, y, epochs=2)
        weights[noise_scale] = model.get_weights()
        if noise_scale:
            estimate = model.noise_scale_estimate
            assert estimate is not None
            assert np.isfinite(estimate).all(), estimate
            assert len(model._accumulator.noise_variables()) == 2
        updates[noise_scale] = int(model.optimizer.iterations.numpy())
        if corrupt is not None:
            # Not vacuous: the corrupted batch was skipped, once an epoch.
            assert int(np.asarray(model._accumulator.skipped)) == 2
    assert updates[True] == updates[False]
    assert all(np.all(np.isfinite(w)) for w in weights[True])
    error = helpers.relative_error(weights[True], weights[False])
    assert error <= SAME_TRAINING_RTOL, f"relative error {error:.3g}"


# --- 4. Config, saving, cloning, wrapping -----------------------------------


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({"accumulate": 3}, False),
        ({"accumulate": 3, "noise_scale": False}, False),
        ({"accumulate": 3, "noise_scale": True}, True),
        ({"accumulate": "epoch", "noise_scale": True}, True),
        ({"accumulate": "auto"}, True),
        ({"accumulate": NoiseScaleSchedule(max_window=8, every=2)}, True),
    ],
)
def test_config_holds_noise_scale(arguments, expected):
    model = _model(**arguments)
    config = model.get_config()
    assert config["noise_scale"] is expected
    assert model.noise_scale is expected
    rebuilt = type(model).from_config(config)
    assert rebuilt.noise_scale is expected
    if isinstance(model.accumulate, NoiseScaleSchedule):
        assert isinstance(rebuilt.accumulate, NoiseScaleSchedule)
        assert rebuilt.accumulate.get_config() == (
            model.accumulate.get_config())


def test_auto_is_the_default_schedule():
    model = _model(accumulate="auto")
    assert isinstance(model.accumulate, NoiseScaleSchedule)
    assert model.accumulate.get_config() == NoiseScaleSchedule().get_config()
    assert NoiseScaleSchedule().get_config() == {
        "max_window": 64, "every": 1, "initial": 2, "current": 2,
    }
    assert model._schedule.window_size(0) == 2


def test_schedule_serialises_its_current_window():
    schedule = NoiseScaleSchedule(max_window=16, every=3, initial=4,
                                  current=7)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, NoiseScaleSchedule)
    assert restored.get_config() == {
        "max_window": 16, "every": 3, "initial": 4, "current": 7,
    }
    assert restored(0) == 7


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arguments", [
    {"accumulate": 5, "noise_scale": True},
    {"accumulate": NoiseScaleSchedule(max_window=4)},
    {"accumulate": 5},
])
def test_save_and_load_keep_noise_scale_and_estimate(tmp_path, arguments):
    x, y = _data(MEASURED_EXAMPLES)
    model = _compiled(**arguments)
    _fit(model, x, y, epochs=1)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, AccumulatingModel)
    assert restored.noise_scale is model.noise_scale
    assert restored.get_config()["noise_scale"] is model.noise_scale
    assert restored.noise_scale_estimate == model.noise_scale_estimate
    if model.noise_scale:
        assert restored.noise_scale_estimate is not None
        # Still equal once the restored model's accumulators are built.
        restored.predict(x[:4], verbose=0)
        restored.compile(optimizer="sgd", loss="mse")
        assert restored.noise_scale_estimate == model.noise_scale_estimate
    else:
        assert restored.noise_scale_estimate is None


def test_state_of_another_shape_is_refused_on_load(tmp_path):
    """Windows of an epoch keep one block's averages, counted windows
    eight: weights saved by one do not load into the other silently."""
    x, y = _data(MEASURED_EXAMPLES)
    saved = _compiled(accumulate="epoch", noise_scale=True)
    _fit(saved, x, y, epochs=1)
    path = tmp_path / "epoch.weights.h5"
    saved.save_weights(path)
    other = _compiled(accumulate=5, noise_scale=True)
    with pytest.raises(ValueError,
                       match=r"noise-scale state .* shape \(6,\).* shape "
                       r"\(27,\)"):
        other.load_weights(path)


@pytest.mark.tensorflow_only
def test_xla_functions_are_compiled_once_for_every_window():
    """Under `jit_compile` TensorFlow runs the micro-step and the window's
    update as two XLA functions. The block a window reads comes from the
    noise scale's state; were it a compile-time constant (the start of a
    `tf.slice` is one), XLA would bake the state into the program and
    compile both again at every window, each compile costing hundreds of
    micro-steps. Their programs must not change as windows pass."""
    import tensorflow as tf

    inputs = keras.Input((256,))
    # 32,768 weights: blocks of 4,096, read as a large variable.
    model = AccumulatingModel(inputs, keras.layers.Dense(128)(inputs),
                              accumulate=2, noise_scale=True)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 256)).astype("float32")
    y = rng.normal(size=(64, 128)).astype("float32")
    functions = model._functions
    batch = (tf.constant(x[:BATCH]), tf.constant(y[:BATCH]))
    window = (tf.constant([8.0]), tf.constant([1.0, 2.0]),
              model._window_plan)

    def programs():
        return (
            functions.xla_batch_step.experimental_get_compiler_ir(batch)(
                stage="hlo"),
            functions.xla_window_update.experimental_get_compiler_ir(
                *window)(stage="hlo"),
        )

    _fit(model, x, y, epochs=1)
    first = programs()
    _fit(model, x, y, epochs=1)  # Four windows on: another block.
    assert model.noise_scale_estimate is not None
    assert programs() == first


@pytest.mark.usefixtures("float64")
def test_loaded_estimate_survives_building_the_accumulators(tmp_path):
    """The loaded state seeds the accumulators' variable exactly: a window
    of one micro-batch measures nothing, so the estimate must not move."""
    x, y = _data(MEASURED_EXAMPLES)
    model = _compiled(accumulate=5, noise_scale=True)
    _fit(model, x, y, epochs=1)
    assert model.noise_scale_estimate is not None
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.noise_scale_estimate == model.noise_scale_estimate
    history = _fit(restored, x[:BATCH], y[:BATCH], epochs=1).history
    assert restored._accumulator.noise_state is not None
    assert restored.noise_scale_estimate == model.noise_scale_estimate
    assert history["noise_scale"] == [model.noise_scale_estimate.noise_scale]


def test_save_before_training_keeps_no_estimate(tmp_path):
    model = _model(accumulate=5, noise_scale=True)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.noise_scale is True
    assert restored.noise_scale_estimate is None


@pytest.mark.parametrize("arguments", [
    {"accumulate": 5, "noise_scale": True},
    {"accumulate": "epoch", "noise_scale": False},
    {"accumulate": NoiseScaleSchedule(max_window=8, every=2)},
])
def test_clone_model_keeps_noise_scale(arguments):
    model = _model(**arguments)
    clone = keras.models.clone_model(model)
    assert isinstance(clone, AccumulatingModel)
    assert clone.noise_scale is model.noise_scale
    assert clone.get_config()["noise_scale"] is model.noise_scale
    if isinstance(model.accumulate, NoiseScaleSchedule):
        assert clone.accumulate.get_config() == model.accumulate.get_config()


@pytest.mark.parametrize("arguments, expected", [
    ({"accumulate": 5, "noise_scale": True}, True),
    ({"accumulate": 5}, False),
    ({"accumulate": "auto"}, True),
])
def test_wrap_keeps_noise_scale(arguments, expected):
    base = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1),
    ])
    model = keras_accum.wrap(base, **arguments)
    assert model.noise_scale is expected
    assert model.get_config()["noise_scale"] is expected
    assert keras.models.clone_model(model).noise_scale is expected


@pytest.mark.usefixtures("float64")
def test_wrapped_model_measures_and_trains_like_the_model():
    x, y = _data(MEASURED_EXAMPLES)
    wrapped = keras_accum.wrap(keras.Model(*helpers.dense_graph()),
                               accumulate=5, noise_scale=True)
    wrapped.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    _fit(wrapped, x, y)
    helpers.fresh_keras_state()
    direct = _compiled(accumulate=5, noise_scale=True)
    _fit(direct, x, y)
    assert helpers.relative_error(
        wrapped.get_weights(), direct.get_weights()) <= SAME_TRAINING_RTOL
    assert direct.noise_scale_estimate is not None
    assert wrapped.noise_scale_estimate is not None
    assert np.allclose(wrapped.noise_scale_estimate,
                       direct.noise_scale_estimate, rtol=1e-12, atol=0)


# --- 5. NoiseScaleSchedule --------------------------------------------------


@pytest.mark.parametrize(
    "estimate, window",
    [
        (NoiseScaleEstimate(40.0, 4.0, 0.1, 4.0), 10),
        (NoiseScaleEstimate(41.9, 4.0, 0.1, 4.0), 10),
        (NoiseScaleEstimate(42.1, 4.0, 0.1, 4.0), 11),
        (NoiseScaleEstimate(1.0, 4.0, 0.1, 4.0), 2),
        (NoiseScaleEstimate(0.0, 0.0, 0.1, 4.0), 2),
        (NoiseScaleEstimate(1e6, 4.0, 0.1, 4.0), 16),
        (NoiseScaleEstimate(-40.0, 4.0, -0.1, 4.0), 16),
        (NoiseScaleEstimate(float("inf"), 4.0, 0.0, 4.0), 16),
        (NoiseScaleEstimate(24.0, 4.0, 0.1, 1.5), 16),
        (NoiseScaleEstimate(12.0, 4.0, 0.1, 1.5), 8),
    ],
)
def test_schedule_rule(estimate, window):
    schedule = NoiseScaleSchedule(max_window=16)
    assert schedule.window_for(estimate) == window
    assert _expected_window(estimate, schedule) == window
    assert schedule.begin_epoch(0, estimate) == window
    assert schedule.current == window
    assert schedule(0) == window
    # Without an estimate the window stays.
    assert schedule.begin_epoch(1, None) == window


def test_schedule_every_decides_only_on_its_epochs():
    schedule = NoiseScaleSchedule(max_window=16, every=3)
    estimate = NoiseScaleEstimate(40.0, 4.0, 0.1, 4.0)
    assert [schedule.begin_epoch(e, estimate) for e in (1, 2)] == [2, 2]
    assert schedule.begin_epoch(3, estimate) == 10
    later = NoiseScaleEstimate(20.0, 4.0, 0.2, 4.0)
    assert [schedule.begin_epoch(e, later) for e in (4, 5, 6)] == [10, 10, 5]


def _schedule_run(schedule, epochs, batch_size=4, optimizer="sgd"):
    x, y = _data(96)
    model = _compiled(optimizer=optimizer, accumulate=schedule)
    recorder = _Recorder()
    history = _fit(model, x, y, epochs=epochs, batch_size=batch_size,
                   callbacks=[recorder]).history
    return model, recorder, history, math.ceil(len(x) / batch_size)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "arguments, batch_size",
    [
        ({"max_window": 6}, 4),
        ({"max_window": 3}, 4),  # The rule's window is clipped.
        ({"max_window": 6, "initial": 5}, 2),
        ({"max_window": 6, "every": 2}, 4),
        ({"max_window": 64, "every": 3}, 4),
    ],
    ids=["every-1", "clipped", "initial", "every-2", "every-3"],
)
def test_schedule_follows_the_estimate_at_epoch_boundaries(arguments,
                                                           batch_size):
    schedule = NoiseScaleSchedule(**arguments)
    epochs = 5
    model, recorder, history, batches = _schedule_run(
        schedule, epochs, batch_size)
    assert model.noise_scale is True
    assert model.accumulate is schedule
    windows = [recorder.windows[e] for e in range(epochs)]
    assert [recorder.currents[e] for e in range(epochs)] == windows
    assert windows[0] == schedule.initial
    for epoch in range(1, epochs):
        previous = recorder.estimates[epoch - 1]
        assert previous is not None
        if epoch % schedule.every == 0:
            expected = _expected_window(previous, schedule)
        else:
            expected = windows[epoch - 1]
        assert windows[epoch] == expected, (epoch, windows)
        assert 2 <= windows[epoch] <= schedule.max_window
    # The window changed only at epoch boundaries: each epoch applied
    # exactly one update per window of its own size (the last one ragged).
    for epoch in range(epochs):
        assert recorder.updates[epoch] == math.ceil(
            batches / windows[epoch]), (epoch, windows, recorder.updates)
    assert schedule.current == windows[-1]
    assert len(history["noise_scale"]) == epochs
    if schedule.every == 1:
        # Not a trivial run: the rule moved the window.
        assert len(set(windows)) > 1, windows


# --- 6. Resuming exactly after `load_model` --------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "arguments, split, epochs, optimizer",
    [
        pytest.param(
            {"max_window": 6, "initial": 5}, 2, 4, "sgd",
            marks=pytest.mark.slice,
        ),
        # Epoch 3 keeps the window decided at epoch 2: from the config
        # (`initial` is another window).
        ({"max_window": 6, "initial": 5, "every": 2}, 3, 5, "adam"),
    ],
    ids=["every-1-sgd", "every-2-adam"],
)
def test_resume_after_load_equals_uninterrupted(tmp_path, arguments, split,
                                                epochs, optimizer):
    """Weights, windows and estimates as without the interruption."""
    continuous, whole, _, _ = _schedule_run(
        NoiseScaleSchedule(**arguments), epochs, optimizer=optimizer)

    helpers.fresh_keras_state()
    first, before, _, _ = _schedule_run(
        NoiseScaleSchedule(**arguments), split, optimizer=optimizer)
    path = tmp_path / "model.keras"
    first.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.accumulate, NoiseScaleSchedule)
    assert restored.accumulate.get_config() == first.accumulate.get_config()
    assert restored.noise_scale_estimate == first.noise_scale_estimate
    after = _Recorder()
    x, y = _data(96)
    _fit(restored, x, y, epochs=epochs, batch_size=4, initial_epoch=split,
         callbacks=[after])

    windows = [whole.windows[e] for e in range(epochs)]
    resumed = [before.windows[e] for e in range(split)] + [
        after.windows[e] for e in range(split, epochs)]
    assert resumed == windows
    assert len(set(windows)) > 1, windows
    assert [before.updates[e] for e in range(split)] + [
        after.updates[e] for e in range(split, epochs)
    ] == [whole.updates[e] for e in range(epochs)]
    assert int(restored.optimizer.iterations.numpy()) == int(
        continuous.optimizer.iterations.numpy())
    error = helpers.relative_error(restored.get_weights(),
                                   continuous.get_weights())
    assert error <= SAME_TRAINING_RTOL, f"relative error {error:.3g}"
    np.testing.assert_allclose(restored.noise_scale_estimate,
                               continuous.noise_scale_estimate,
                               rtol=SAME_TRAINING_RTOL, atol=0)
    for epoch in range(split, epochs):
        np.testing.assert_allclose(after.estimates[epoch],
                                   whole.estimates[epoch],
                                   rtol=SAME_TRAINING_RTOL, atol=0)


# --- 7. TensorBoard ---------------------------------------------------------


@pytest.mark.tensorflow_only
def test_update_tensorboard_writes_the_noise_scale(tmp_path):
    tf = pytest.importorskip("tensorflow")
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    x, y = _data(MEASURED_EXAMPLES)
    model = _compiled(optimizer="sgd", accumulate=5, noise_scale=True)
    history = _fit(model, x, y, epochs=2, callbacks=[
        keras_accum.UpdateTensorBoard(str(tmp_path))]).history
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "train"), size_guidance={"tensors": 0})
    events.Reload()
    for key in LOG_KEYS:
        points = [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                  for e in events.Tensors(f"epoch_{key}")]
        assert [step for step, _ in points] == [0, 1], key
        assert np.all(np.isfinite(history[key])), (key, history[key])
        np.testing.assert_allclose([value for _, value in points],
                                   history[key], rtol=1e-6)


def test_a_new_trainable_set_starts_a_new_estimate():
    """Freezing a layer and compiling again rebuilds the accumulators for
    the weights still trained; the noise scale is that of their gradient,
    so the estimate restarts: after the second `fit` it equals that of a
    model that trains only those weights from the same state (and the
    rebuild, traced inside the step on TensorFlow, reads no tensor).
    Each `fit` applies 15 windows of three (the last one), enough to
    measure every block."""
    x, y = _data(MEASURED_EXAMPLES)
    model = _compiled(optimizer="sgd", accumulate=3, noise_scale=True)
    _fit(model, x, y, epochs=1)
    before = model.noise_scale_estimate
    model.layers[1].trainable = False
    model.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
    weights = model.get_weights()
    _fit(model, x, y, epochs=1)

    fresh = _model(accumulate=3, noise_scale=True)
    fresh.set_weights(weights)
    fresh.layers[1].trainable = False
    fresh.compile(optimizer=helpers.make_optimizer("sgd"), loss="mse")
    _fit(fresh, x, y, epochs=1)
    assert before is not None
    assert model.noise_scale_estimate is not None
    assert fresh.noise_scale_estimate is not None
    np.testing.assert_allclose(
        model.noise_scale_estimate, fresh.noise_scale_estimate, rtol=1e-12
    )
