"""The normalisation rule (issue 25): every part of a step's loss is either
normalised as Keras tells the library, or refused before any update.

Each exact case is compared with plain `keras.Model` (the same custom
`compute_loss`) trained on one big batch per window, in float64; each
refusal must leave the weights as they were. The cases are the silent ones
a review found (issue 25, cases 1, 2, 3, 3b and 6) and the refusals the
rule adds.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_accum import AccumulatingModel
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from keras_accum.core import loss_attribution
from tests import helpers

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("float64")]

EXAMPLES, BATCH, WINDOW = 44, 8, 3  # A ragged last micro-batch of 4.

MSE = keras.losses.MeanSquaredError
MAE = keras.losses.MeanAbsoluteError


class _Penalty(keras.regularizers.Regularizer):
    """`factor * sum(x ** 2)` in the input's dtype (Keras' L2 keeps a
    float32 factor before 3.14)."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return self.factor * ops.sum(ops.square(x))


class _AddsMean(keras.layers.Layer):
    """Adds a data-dependent mean with `add_loss` (case 3b)."""

    def call(self, inputs):
        self.add_loss(0.1 * ops.mean(ops.square(inputs)))
        return inputs


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 5))
    y = rng.normal(size=(EXAMPLES, 1))
    sample_weight = rng.uniform(0.1, 2.0, size=(EXAMPLES,))
    return x, y, sample_weight


def _graph(activity=False, adds_mean=False, weight_penalty=False):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        8, activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        activity_regularizer=_Penalty(0.01) if activity else None,
        kernel_regularizer=_Penalty(0.02) if weight_penalty else None,
    )(inputs)
    if adds_mean:
        hidden = _AddsMean()(hidden)
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
    )(hidden)
    return inputs, outputs


def _with_loss(base, loss_function):
    """`base` with `compute_loss` returning `loss_function(model, y,
    y_pred, sample_weight)`."""
    if loss_function is None:
        return base

    class CustomLoss(base):
        def compute_loss(self, x=None, y=None, y_pred=None,
                         sample_weight=None, training=True):
            return loss_function(self, y, y_pred, sample_weight)

    return CustomLoss


def _train(model, compile_kwargs, sample_weight, epochs=2):
    x, y, _ = _data()
    model.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    model.fit(x, y, sample_weight=sample_weight, batch_size=BATCH,
              epochs=epochs, shuffle=False, verbose=0)
    return model.get_weights()


def _assert_exact(loss_function=None, compile_kwargs=None,
                  use_sample_weight=False, **graph_kwargs):
    compile_kwargs = compile_kwargs or {}
    x, y, sample_weight = _data()
    sample_weight = sample_weight if use_sample_weight else None
    model = _with_loss(FunctionalAccumulatingModel, loss_function)(
        *_graph(**graph_kwargs), accumulate=WINDOW
    )
    weights = _train(model, compile_kwargs, sample_weight)
    helpers.fresh_keras_state()
    reference = _with_loss(keras.Model, loss_function)(*_graph(**graph_kwargs))
    reference.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    expected = helpers.big_batch_reference(
        reference, x, y, BATCH, WINDOW, 2, sample_weight=sample_weight
    )
    helpers.assert_exact(weights, expected)


def _assert_refused(match, loss_function=None, compile_kwargs=None,
                    use_sample_weight=False, **graph_kwargs):
    _, _, sample_weight = _data()
    model = _with_loss(FunctionalAccumulatingModel, loss_function)(
        *_graph(**graph_kwargs), accumulate=WINDOW
    )
    before = model.get_weights()
    with pytest.raises(ValueError, match=match):
        _train(model, compile_kwargs or {},
               sample_weight if use_sample_weight else None, epochs=1)
    for weight, initial in zip(model.get_weights(), before):
        np.testing.assert_array_equal(weight, initial)


def _compiled_plus_summed_mae(model, y, y_pred, sample_weight):
    loss = keras.Model.compute_loss(
        model, y=y, y_pred=y_pred, sample_weight=sample_weight
    )
    return loss + MAE(reduction="sum")(y, y_pred)


def _weighted_mean_plus_mae(model, y, y_pred, sample_weight):
    return (
        MSE(reduction="mean_with_sample_weight")(y, y_pred, sample_weight)
        + MAE()(y, y_pred)
    )


def _linear_mix_with_model_losses(model, y, y_pred, sample_weight):
    return (
        0.5 * MSE(reduction="mean_with_sample_weight")(y, y_pred,
                                                       sample_weight)
        + 2.0 * MAE()(y, y_pred)
        + sum(model.losses)
    )


class TestCustomComputeLoss:
    def test_only_a_user_class_overrides_compute_loss(self):
        """Catches keras_accum's own classes defining `compute_loss`
        (`overrides_compute_loss` would take Keras' own combination for a
        user's and check it), or a user's override going unseen."""
        for cls in FunctionalAccumulatingModel.__mro__:
            if not issubclass(keras.Model, cls):
                assert "compute_loss" not in cls.__dict__, cls
        graph = _graph()
        model = FunctionalAccumulatingModel(*graph)
        assert not loss_attribution.overrides_compute_loss(model)
        custom = _with_loss(FunctionalAccumulatingModel,
                            _weighted_mean_plus_mae)

        class Inherits(custom):
            pass

        assert loss_attribution.overrides_compute_loss(Inherits(*graph))

    def test_compiled_loss_plus_a_summed_keras_loss(self):
        """Case 1: the summed MAE was divided by the compiled term's
        normaliser (relative error 0.55 on TensorFlow, 1.33 on JAX)."""
        _assert_exact(_compiled_plus_summed_mae, {"loss": "mse"})

    def test_two_keras_losses_with_different_normalisers(self):
        """Case 2: both terms got the weighted one's normaliser (the
        sample-weight sum; relative error 1.7e-2)."""
        _assert_exact(_weighted_mean_plus_mae, use_sample_weight=True)

    def test_linear_mix_with_regularisers_and_model_losses(self):
        """Factors read from the loss, not assumed to be 1; weight and
        activity penalties through `model.losses` keep their rules."""
        _assert_exact(
            _linear_mix_with_model_losses, use_sample_weight=True,
            activity=True, weight_penalty=True,
        )

    def test_compiled_function_calling_keras_losses(self):
        """A compiled plain function whose value is two Keras losses: each
        is a term of its own."""
        _assert_exact(compile_kwargs={
            "loss": lambda y, p: MSE()(y, p) + MAE(reduction="sum")(y, p)
        })

    @pytest.mark.parametrize(
        "loss_function",
        [
            lambda m, y, p, sw: ops.mean(ops.abs(y - p)),
            lambda m, y, p, sw: MSE()(y, p) + 0.1 * ops.mean(p),
        ],
        ids=["hand-written-mean", "keras-loss-plus-hand-written-mean"],
    )
    def test_part_without_a_known_normaliser_is_refused(self, loss_function):
        """A hand-written mean was weighted by examples: right for a mean
        over examples, silently wrong for anything else."""
        _assert_refused("hand-written mean", loss_function)

    def test_compiled_function_returning_a_mean_is_refused(self):
        _assert_refused(
            "reduced a scalar",
            compile_kwargs={"loss": lambda y, p: ops.mean(ops.abs(y - p))},
        )

    @pytest.mark.parametrize(
        "loss_function",
        [
            lambda m, y, p, sw: ops.sqrt(MSE()(y, p)),
            lambda m, y, p, sw: MSE()(y, p) * MAE()(y, p),
            lambda m, y, p, sw: MSE()(y, p) * ops.mean(sw),
        ],
        ids=["square-root", "product", "data-dependent-factor"],
    )
    def test_non_linear_combination_is_refused(self, loss_function):
        """The big batch's value of a non-linear combination is not a
        combination of the micro-batches'."""
        _assert_refused("fixed linear combination", loss_function,
                        use_sample_weight=True)


class TestPenalties:
    @pytest.mark.parametrize("reduction", ["mean_with_sample_weight", "sum"])
    def test_activity_penalty_next_to_a_weighted_loss(self, reduction):
        """Case 3: the penalty, a mean over examples from Keras 3.14 (a
        sum before), got the loss's normaliser (the sample-weight sum;
        relative error 5.1e-2); next to a summed loss it was summed.
        (The loss is made here: a `Loss` computes in the float type of its
        construction.)"""
        _assert_exact(compile_kwargs={"loss": MSE(reduction=reduction)},
                      use_sample_weight=True, activity=True,
                      weight_penalty=True)

    def test_data_dependent_add_loss_is_refused(self):
        """Case 3b: `add_loss(ops.mean(...))` has no normaliser Keras
        reports (relative error 4.5e-3 when weighted like the loss)."""
        _assert_refused("add_loss", compile_kwargs={"loss": "mse"},
                        adds_mean=True)

    def test_add_loss_is_allowed_with_summed_windows(self):
        """`reduction="sum"` sums the mini-batches' gradients: nothing to
        normalise, nothing refused."""
        x, y, _ = _data()
        model = AccumulatingModel(*_graph(adds_mean=True), accumulate=WINDOW,
                                  reduction="sum")
        _train(model, {"loss": "mse"}, None, epochs=1)
        assert int(model.optimizer.iterations.numpy()) == 2


def test_unreduced_loss_is_refused():
    """Case 6: `reduction=None` gives a vector per batch; TensorFlow
    trained on its sum without a word, JAX failed inside `jax.vjp`."""
    _assert_refused(
        r"`mean_squared_error` is not reduced.*reduction=None",
        compile_kwargs={"loss": MSE(reduction=None)},
    )
