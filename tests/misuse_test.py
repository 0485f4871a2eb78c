"""Misuse fails loudly; `train_on_batch`, apply and reset outside `fit`.

`test_misuse` is the table of `docs/semantics.md` ("Misuse"): each case
names the call, the exception type and a pattern the message must match,
which names the argument and what is allowed. Cases already covered by
`validation_test.py` are not repeated; where a case is close to one there,
the comment says which.
"""

import dataclasses
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_accum
from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from tests import helpers
from tests.helpers import RTOL

pytestmark = pytest.mark.backends


def _model(accumulate="epoch", **kwargs):
    return AccumulatingModel(*helpers.dense_graph(), accumulate=accumulate,
                             **kwargs)


def _compiled(accumulate="epoch", **kwargs):
    model = _model(accumulate, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _fit(model, *args, **kwargs):
    x, y = helpers.regression_data(64)
    kwargs.setdefault("verbose", 0)
    return model.fit(x, y, *args, batch_size=16, **kwargs)


# On JAX, "auto" needs `memory_limit`; elsewhere it is refused, naming
# what to set instead.
_AUTO_REFUSAL = (
    r"`micro_batch_size=\"auto\"` needs `memory_limit`.*"
    r"Received: memory_limit=None"
    if keras.backend.backend() == "jax"
    else f"on {keras.backend.backend()} set `micro_batch_size` to an int "
    "instead"
)


def _auto_micro_batches():
    return _model(micro_batch_size="auto")


def _custom_step_model(**kwargs):
    """A TensorFlow custom step that computes its own gradients."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("`accumulate_gradients` is for TensorFlow steps")

    class OwnGradients(FunctionalAccumulatingModel):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x))
            gradients = tape.gradient(loss, self.trainable_variables)
            self.accumulate_gradients(gradients, tf.shape(x)[0])
            return {}

    model = OwnGradients(*helpers.dense_graph(), **kwargs)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _frozen_model():
    inputs = keras.Input((5,))
    layer = keras.layers.Dense(1)
    layer.trainable = False
    model = AccumulatingModel(inputs, layer(inputs), accumulate="epoch")
    model.compile(optimizer="sgd", loss="mse")
    return model


def _infinite_dataset():
    x, y = helpers.regression_data(64)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()


class Net(AccumulatingModel):
    """A subclassed model with one `Dense` layer, unbuilt."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        return self.dense(inputs)


def _unbuilt_subclassed_model():
    model = Net(accumulate=2)
    model.compile(optimizer="sgd", loss="mse")
    return model


def _backup(tmp_path, save_freq):
    return keras.callbacks.BackupAndRestore(str(tmp_path / "backup"),
                                            save_freq=save_freq)


def _fit_with_nan_in_batch_1(model):
    x, y = helpers.regression_data(64)
    x = x.copy()
    x[20, 0] = np.nan  # Batch 1 of 16-example batches.
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)


def _other_backend(monkeypatch):
    # As validation_test.py::test_unsupported_backend_is_rejected, which
    # runs a real unsupported backend; here through `wrap()`.
    base = keras.Model(*helpers.dense_graph())
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    keras_accum.wrap(base)


@dataclasses.dataclass
class Misuse:
    """One row of the misuse table."""

    id: str
    call: object  # (tmp_path, monkeypatch) -> None
    error: type
    match: str


ALLOWED_WINDOW = r"must be \"epoch\" or an int >= 1"

MISUSES = [
    # Bad `accumulate`; validation_test.py::test_bad_accumulate covers 0,
    # -2, 2.5, "weekly", True and None.
    Misuse("accumulate-float", lambda t, m: _model(4.0), TypeError,
           rf"`accumulate` {ALLOWED_WINDOW}\. Received: accumulate=4\.0 "
           "of type float"),
    Misuse("accumulate-list", lambda t, m: _model([4]), TypeError,
           rf"`accumulate` {ALLOWED_WINDOW}\. Received: accumulate=\[4\]"),
    Misuse("accumulate-capitalised", lambda t, m: _model("Epoch"),
           ValueError,
           rf"`accumulate` {ALLOWED_WINDOW} \(or \"auto\", a dict or a "
           r"callable schedule\)\. Received: accumulate='Epoch'"),
    # Schedules.
    Misuse("schedule-without-epoch-0", lambda t, m: _model({1: 4}),
           ValueError, r"`accumulate` schedule must give the window of "
           r"epoch 0 \(key 0\)\. Received: accumulate=\{1: 4\}"),
    Misuse("schedule-negative-key", lambda t, m: _model({0: 2, -1: 4}),
           ValueError, r"keys of an `accumulate` schedule must be epochs, "
           r"ints >= 0\. .* with key -1"),
    Misuse("schedule-string-key", lambda t, m: _model({"0": 2}),
           ValueError, r"keys of an `accumulate` schedule must be epochs, "
           r"ints >= 0\. .* with key '0'"),
    Misuse("schedule-zero-window", lambda t, m: _model({0: 2, 3: 0}),
           ValueError,
           rf"`accumulate\[3\]` {ALLOWED_WINDOW}\. "
           r"Received: accumulate\[3\]=0"),
    Misuse("schedule-float-window", lambda t, m: _model({0: 2.0}),
           TypeError, rf"`accumulate\[0\]` {ALLOWED_WINDOW}"),
    Misuse("schedule-callable-returns-0",
           lambda t, m: _fit(_compiled(lambda epoch: 0)), ValueError,
           rf"`accumulate\(0\)` {ALLOWED_WINDOW}\. "
           r"Received: accumulate\(0\)=0"),
    # Other constructor arguments.
    Misuse("reduction-capitalised", lambda t, m: _model(reduction="MEAN"),
           ValueError, r"`reduction` must be one of \"mean\" or \"sum\"\. "
           r"Received: reduction='MEAN'"),
    Misuse("on_nonfinite-unknown",
           lambda t, m: _model(on_nonfinite="ignore"), ValueError,
           r"`on_nonfinite` must be \"raise\" or \"skip\"\. "
           r"Received: on_nonfinite='ignore'"),
    # `micro_batch_size` and `memory_limit`.
    Misuse("micro_batch_size-zero", lambda t, m: _model(micro_batch_size=0),
           ValueError, r"`micro_batch_size` must be None, an int >= 1 or "
           r"\"auto\"\. Received: micro_batch_size=0"),
    Misuse("micro_batch_size-float",
           lambda t, m: _model(micro_batch_size=8.0), TypeError,
           r"`micro_batch_size` must be None, an int >= 1 or \"auto\"\. "
           r"Received: micro_batch_size=8\.0 of type float"),
    Misuse("micro_batch_size-unknown-string",
           lambda t, m: _model(micro_batch_size="max"), ValueError,
           r"Received: micro_batch_size='max'"),
    Misuse("memory_limit-without-auto",
           lambda t, m: _model(micro_batch_size=8, memory_limit=2**30),
           ValueError, r"`memory_limit` sizes the micro-batch with "
           r"`micro_batch_size=\"auto\"` only\. Received: "
           r"memory_limit=1073741824 with micro_batch_size=8"),
    Misuse("auto-without-memory_limit", lambda t, m: _auto_micro_batches(),
           ValueError, _AUTO_REFUSAL),
    Misuse("accumulate_gradients-with-micro_batch_size",
           lambda t, m: _fit(_custom_step_model(micro_batch_size=4)),
           ValueError, r"`micro_batch_size` splits the batch inside "
           r"`AccumulatingModel`'s own step.*"
           r"Received: micro_batch_size=4"),
    # `wrap()`; validation_test.py covers object(), a string, a layer, a
    # subclassed model and an `AccumulatingModel` (message start only).
    Misuse("wrap-tf-module", lambda t, m: keras_accum.wrap(tf.Module()),
           TypeError, r"`model` must be a functional `keras\.Model` or a "
           r"built `keras\.Sequential`\. Received: model of type Module"),
    Misuse("wrap-accumulating-model",
           lambda t, m: keras_accum.wrap(_model(4)), ValueError,
           r"already accumulates gradients \(accumulate=4\); wrap the "
           r"original model"),
    Misuse("unsupported-backend", lambda t, m: _other_backend(m),
           ValueError, r"supports the TensorFlow, JAX and torch backends.*"
           r"KERAS_BACKEND.*Received: keras\.backend\.backend\(\)='numpy'"),
    # `compile()`; validation_test.py covers SGD(gradient_accumulation_steps).
    Misuse("compile-without-optimizer",
           lambda t, m: _model().compile(optimizer=None, loss="mse"),
           ValueError, r"needs an `optimizer`.*Received: optimizer=None"),
    Misuse("optimizer-accumulates-inside-loss-scaling",
           lambda t, m: _model().compile(
               optimizer=keras.optimizers.LossScaleOptimizer(
                   keras.optimizers.Adam(gradient_accumulation_steps=2)),
               loss="mse"),
           ValueError, r"`gradient_accumulation_steps` set.*"
           r"gradient_accumulation_steps=None.*"
           r"Received: gradient_accumulation_steps=2"),
    # `fit()`.
    Misuse("no-trainable-weights", lambda t, m: _fit(_frozen_model()),
           ValueError, r"gradients of trainable weights.*"
           r"Received: model with 0 trainable weights"),
    Misuse("epoch-window-infinite-dataset",
           lambda t, m: _compiled("epoch").fit(_infinite_dataset(),
                                               shuffle=False, verbose=0),
           ValueError, r"infinite dataset has no end: pass "
           r"`steps_per_epoch`.*Received: steps_per_epoch=None"),
    Misuse("every-n-with-batch-backup",
           lambda t, m: _fit(_compiled(4), callbacks=[_backup(t, 3)]),
           ValueError, r"`BackupAndRestore` with an integer `save_freq`.*"
           r"Use save_freq=\"epoch\", or accumulate=\"epoch\"\. "
           r"Received: save_freq=3, accumulate=4"),
    Misuse("schedule-with-batch-backup",
           lambda t, m: _fit(_compiled({0: "epoch", 1: 2}),
                             callbacks=[_backup(t, 3)]),
           ValueError, r"`BackupAndRestore` with an integer `save_freq`.*"
           r"Received: save_freq=3, accumulate=\{0: 'epoch', 1: 2\}"),
    Misuse("nonfinite-gradient",
           lambda t, m: _fit_with_nan_in_batch_1(_compiled(4)),
           FloatingPointError,
           r"Non-finite gradient in epoch 0, in the window of batches 0-3.*"
           r"on_nonfinite=\"skip\""),
    # Outside `fit()`; validation_test.py covers apply before compile.
    Misuse("reset-before-compile",
           lambda t, m: _model().reset_accumulated_gradients(), RuntimeError,
           r"`reset_accumulated_gradients\(\)` needs a compiled model: call "
           r"`compile\(\)` first"),
    Misuse("apply-before-build",
           lambda t, m: _unbuilt_subclassed_model()
           .apply_accumulated_gradients(),
           RuntimeError, r"`apply_accumulated_gradients\(\)` needs .*"
           r"`fit\(\)`"),
    Misuse("flush-callback-on-plain-model",
           lambda t, m: keras_accum.ApplyAccumulatedGradients().set_model(
               keras.Model(*helpers.dense_graph())),
           TypeError, r"works with an `keras_accum\.AccumulatingModel`\. "
           r"Received: model of type Functional"),
]


@pytest.mark.parametrize("case", MISUSES, ids=[c.id for c in MISUSES])
def test_misuse(case, tmp_path, monkeypatch):
    with pytest.raises(case.error, match=case.match):
        case.call(tmp_path, monkeypatch)


class TestAllowedNeighbours:
    """The legal neighbours of the misuses above still work."""

    @pytest.mark.usefixtures("float64")
    def test_epoch_window_with_batch_backup(self, tmp_path):
        """Catches an update applied (or a window cut) at a batch-level
        backup, or the combination refused: training must equal one big
        batch per epoch."""
        # No update is applied mid-epoch, so Keras' restart of the epoch
        # from batch 0 is exact (see interruption_test.py). Mini-batches of
        # 24, 24 and 16: weighting them equally would be visible.
        x, y = helpers.regression_data(64)
        model = _compiled("epoch")
        model.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0,
                  callbacks=[_backup(tmp_path, 1)])
        assert int(model.optimizer.iterations.numpy()) == 2
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        expected = helpers.big_batch_reference(reference, x, y, 24, "epoch", 2)
        error = helpers.relative_error(model.get_weights(), expected)
        assert error <= RTOL, f"relative error {error:.3g}"

    def test_epoch_window_infinite_dataset_with_steps(self):
        model = _compiled("epoch")
        model.fit(_infinite_dataset(), steps_per_epoch=3, epochs=2,
                  shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 2

    def test_schedule_callable_checked_per_epoch(self):
        # A callable schedule is only called at fit time; each epoch's
        # window is checked when the epoch begins.
        model = _compiled(lambda epoch: 2 if epoch == 0 else "weekly")
        with pytest.raises(ValueError, match=r"`accumulate\(1\)` must be"):
            _fit(model, epochs=2)
        assert int(model.optimizer.iterations.numpy()) == 2  # Epoch 0.

    @pytest.mark.usefixtures("float64")
    def test_wrap_accepts_a_schedule(self):
        """Catches `wrap()` dropping or misreading an `accumulate` schedule
        (e.g. a wrong epoch-to-window lookup): the wrapped model must train
        with each epoch's window."""
        x, y = helpers.regression_data(64)
        base = keras.Model(*helpers.dense_graph())
        model = keras_accum.wrap(base, accumulate={0: 2, 1: "epoch"})
        assert model.accumulate == {0: 2, 1: "epoch"}
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        # Epoch 0: windows of 2 of its 4 mini-batches; epoch 1: one window.
        assert int(model.optimizer.iterations.numpy()) == 3
        reference = keras.Model(*helpers.dense_graph())
        reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        helpers.big_batch_reference(reference, x, y, 16, 2, 1)
        expected = helpers.big_batch_reference(reference, x, y, 16, "epoch", 1)
        error = helpers.relative_error(base.get_weights(), expected)
        assert error <= RTOL, f"relative error {error:.3g}"


def _batches(sizes, seed=0):
    """Consecutive mini-batches of the given (ragged) sizes."""
    x, y = helpers.regression_data(sum(sizes), seed=seed)
    bounds = np.cumsum([0] + list(sizes))
    return x, y, [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]


def _big_batch(x, y, steps=1):
    reference = keras.Model(*helpers.dense_graph())
    reference.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    for _ in range(steps):
        reference.train_on_batch(x, y)
    return reference.get_weights()


def _adam_model(accumulate):
    model = _model(accumulate)
    model.compile(optimizer=helpers.make_optimizer("adam"), loss="mse")
    return model


def _assert_weights_equal(weights, expected):
    for a, b in zip(weights, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("float64")
class TestOutsideFit:
    """`train_on_batch` accumulates; apply and reset work outside `fit`."""

    def test_train_on_batch_applies_when_window_is_full(self):
        x, y, batches = _batches([20, 7, 13])
        model = _adam_model(3)
        start = model.get_weights()
        for count, (xb, yb) in enumerate(batches[:2], start=1):
            model.train_on_batch(xb, yb)
            assert model.mini_step == count
            _assert_weights_equal(model.get_weights(), start)
        model.train_on_batch(*batches[2])
        assert model.mini_step == 0
        assert int(model.optimizer.iterations.numpy()) == 1
        error = helpers.relative_error(model.get_weights(), _big_batch(x, y))
        assert error <= RTOL, f"relative error {error:.3g}"

    def test_apply_outside_fit_applies_the_partial_window(self):
        x, y, batches = _batches([20, 7])
        model = _adam_model(3)
        for batch in batches:
            model.train_on_batch(*batch)
        model.apply_accumulated_gradients()
        assert model.mini_step == 0
        assert int(model.optimizer.iterations.numpy()) == 1
        error = helpers.relative_error(model.get_weights(), _big_batch(x, y))
        assert error <= RTOL, f"relative error {error:.3g}"
        # Nothing accumulated since: applying again changes nothing.
        applied = model.get_weights()
        model.apply_accumulated_gradients()
        assert int(model.optimizer.iterations.numpy()) == 1
        _assert_weights_equal(model.get_weights(), applied)

    def test_reset_outside_fit_starts_a_new_window(self):
        _, _, discarded = _batches([20, 7], seed=1)
        x, y, batches = _batches([20, 7, 13])
        model = _adam_model(3)
        for batch in discarded:
            model.train_on_batch(*batch)
        model.reset_accumulated_gradients()
        assert model.mini_step == 0
        for batch in batches:
            model.train_on_batch(*batch)
        assert int(model.optimizer.iterations.numpy()) == 1
        error = helpers.relative_error(model.get_weights(), _big_batch(x, y))
        assert error <= RTOL, f"relative error {error:.3g}"

    def test_fit_discards_a_window_left_by_train_on_batch(self):
        _, _, leftover = _batches([20, 7], seed=1)
        model = _adam_model(3)
        for batch in leftover:
            model.train_on_batch(*batch)
        assert model.mini_step == 2
        x, y = helpers.regression_data(96)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        # One window of 3 batches: exactly the big batch of the fit's data.
        error = helpers.relative_error(model.get_weights(), _big_batch(x, y))
        assert error <= RTOL, f"relative error {error:.3g}"


class TestUnknownKeywordArguments:
    """A misspelt keyword is refused, naming the closest valid one."""

    def test_functional_form_refuses_a_misspelt_keyword(self):
        """Catches the functional `__init__` forwarding unknown keywords to
        Keras' `Functional`, which drops them (issue 25, case 4):
        `AccumulatingModel(i, o, accumulte=4)` trained with
        `accumulate="epoch"`."""
        with pytest.raises(
            TypeError,
            match=r"not recognized by `AccumulatingModel`: `accumulte`\. "
                  r"Did you mean `accumulate`\?.* Received: accumulte=4$",
        ):
            AccumulatingModel(*helpers.dense_graph(), accumulte=4)

    def test_functional_form_suggests_keras_keywords(self):
        """Catches the functional form accepting a misspelt Keras keyword
        (issue 25, case 4), and suggestions limited to keras_accum's own."""
        with pytest.raises(TypeError, match=r"Did you mean `trainable`\?"):
            AccumulatingModel(*helpers.dense_graph(), trainabel=False)

    @pytest.mark.parametrize("sequential", [False, True],
                             ids=["functional", "sequential"])
    def test_wrap_refuses_a_misspelt_keyword(self, sequential):
        """Catches `wrap` forwarding unknown keywords to Keras' `Functional`
        (issue 25, case 4): `wrap(model, accumulte=4)` trained with
        `accumulate="epoch"`."""
        if sequential:
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
        else:
            model = keras.Model(*helpers.dense_graph())
        with pytest.raises(
            TypeError,
            match=r"not recognized by `wrap\(\)`: `on_nonfinte`\. Did you "
                  r"mean `on_nonfinite`\?.* Received: on_nonfinte='skip'$",
        ):
            keras_accum.wrap(model, accumulate=4, on_nonfinte="skip")

    def test_subclassed_form_refuses_a_misspelt_keyword(self):
        """Catches the subclassed form answering a misspelt keyword
        differently from the functional form (issue 25, case 4; Keras
        raises a `ValueError` without a suggestion there)."""

        with pytest.raises(
            TypeError,
            match=r"not recognized by `Net`: `reductoin`\. Did you mean "
                  r"`reduction`\?.* Received: reductoin='sum'$",
        ):
            Net(accumulate=2, reductoin="sum")
        model = Net(accumulate=2, reduction="sum", name="net",
                    dtype="float32", trainable=True)
        assert (model.accumulate, model.reduction, model.name) == (
            2, "sum", "net")

    def test_valid_keywords_are_still_accepted(self):
        """Catches the check refusing a keyword `keras.Model` or
        `AccumulatingModel` takes (issue 25, case 4)."""
        inputs, outputs = helpers.dense_graph()
        model = AccumulatingModel(
            inputs=inputs, outputs=outputs, name="m", trainable=True,
            accumulate=3, reduction="sum", loss_normalisation="per_loss",
            on_nonfinite="skip",
        )
        assert (model.name, model.accumulate, model.on_nonfinite) == (
            "m", 3, "skip")
        wrapped = keras_accum.wrap(keras.Model(*helpers.dense_graph()),
                                   loss_normalisation="shared",
                                   on_nonfinite="skip")
        assert wrapped.loss_normalisation == "shared"
