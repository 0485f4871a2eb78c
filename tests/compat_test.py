"""Every private Keras touchpoint still behaves as keras_accum relies on.

`keras_accum/_compat/` is the only package reaching below Keras' public
API. A new Keras release that renames, moves or changes one of those
pieces fails here, by name, rather than deep inside a training step.
"""

import inspect

import keras
import numpy as np
import pytest

from keras_accum._compat import functional as compat_functional
from keras_accum._compat import losses as compat_losses
from keras_accum._compat import regularisers as compat_regularisers
from keras_accum._compat import trainer as compat_trainer
from keras_accum._compat import variables as compat_variables
from keras_accum._compat import versions as compat_versions
from keras_accum.accumulating_model import FunctionalAccumulatingModel
from keras_accum.core import loss_normalisers
from tests import helpers

pytestmark = [pytest.mark.slice, pytest.mark.backends]


def _compiled_model():
    model = FunctionalAccumulatingModel(*helpers.dense_graph(), accumulate=2)
    model.compile(optimizer="sgd", loss="mse", loss_weights=0.5)
    x, y = helpers.regression_data(16)
    model.fit(x.astype("float32"), y.astype("float32"), batch_size=8,
              verbose=0)
    return model


def test_loss_reduction_hook_sees_every_keras_loss():
    """Catches Keras no longer routing `Loss.__call__` through the module's
    `reduce_weighted_values` (the normalisers would go unrecorded)."""
    hook = compat_losses.reduce_weighted_values()
    assert getattr(hook, "_keras_accum_hook", False)
    with loss_normalisers.record_loss_normalisers() as recorded:
        keras.losses.MeanSquaredError()(np.ones((4, 1)), np.zeros((4, 1)))
    assert [t.reduction for t in recorded.terms] == ["sum_over_batch_size"]
    assert float(recorded.terms[0].normaliser) == 4.0


def test_add_loss_hook_tells_penalties_from_other_losses():
    """Catches Keras no longer calling `Layer.add_loss` for an activity
    penalty right after the regulariser (issue 25: a penalty would be
    taken for a data-dependent `add_loss` and refused, or the reverse)."""
    assert getattr(keras.layers.Layer.add_loss, "_keras_accum_hook", False)

    class AddsLoss(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(keras.ops.mean(inputs))
            return inputs

    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(
        2, activity_regularizer=keras.regularizers.L1(0.1)
    )(inputs)
    model = keras.Model(inputs, AddsLoss()(hidden))
    with loss_normalisers.record_loss_normalisers(model) as recorded:
        model(np.ones((4, 3)))
    assert len(recorded.penalties) == 1 and len(recorded.added) == 1
    examples = recorded.penalties[0].examples
    if compat_regularisers.ACTIVITY_REGULARISATION_IS_BATCH_MEAN:
        assert int(examples) == 4
    else:
        assert examples is None


def test_loss_module_functions_keep_their_signatures():
    """Catches a renamed or re-signed helper of `keras.src.losses.loss`."""
    expected = {
        "apply_mask": ["sample_weight", "mask", "dtype", "reduction"],
        "squeeze_or_expand_to_same_rank": ["x1", "x2", "expand_rank_1"],
        "scale_loss_for_distribution": ["value"],
        "unscale_loss_for_distribution": ["value"],
    }
    module = compat_losses.loss_module
    for name, parameters in expected.items():
        signature = inspect.signature(getattr(module, name))
        assert list(signature.parameters) == parameters, name


def test_masked_divisor_matches_keras():
    """Catches a change in how Keras divides a masked mean loss (valid
    entries, plus epsilon before 3.13), which `masked_valid_count` mirrors."""
    values = np.arange(1.0, 7.0).reshape(2, 3)
    mask = np.array([[1, 1, 0], [1, 0, 0]], "float64")
    weights = compat_losses.apply_mask(
        None, mask, dtype="float64", reduction="sum_over_batch_size"
    )
    keras_loss = float(np.sum(values * np.asarray(weights)) / values.size)
    valid = compat_losses.masked_valid_count(np.float64(mask.sum()))
    divisor = float(values.size * valid / mask.size)
    ours = float(np.sum(values * mask)) / divisor
    # The epsilon before 3.13 is 1e-8 relative here: compare far tighter.
    assert ours == pytest.approx(keras_loss, rel=1e-12)


def test_functional_pieces():
    """Catches a moved `Functional` class, a changed
    `functional_init_arguments`, or renamed graph structures."""
    inputs, outputs = helpers.dense_graph()
    graph = keras.Model(inputs, outputs)
    assert isinstance(graph, compat_functional.Functional)
    assert compat_functional.functional_init_arguments((inputs, outputs), {})
    assert not compat_functional.functional_init_arguments((), {})
    structure = compat_functional.graph_structure(graph)
    assert structure[0] is inputs and structure[1] is outputs
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert isinstance(
        compat_functional.sequential_graph(sequential),
        compat_functional.Functional,
    )


def test_functional_model_config_carries_its_graph():
    """Catches a functional `AccumulatingModel` saving without its graph
    (Keras < 3.15 with a named-argument `__init__`)."""
    config = FunctionalAccumulatingModel(*helpers.dense_graph()).get_config()
    for key in ("layers", "input_layers", "output_layers", "accumulate"):
        assert key in config, key


def test_model_internals():
    """Catches renamed trainer internals: the compiled-loss terms and their
    `loss_weights`, the loss tracker, `_compute_loss`, regularisation
    losses, `_maybe_symbolic_build(iterator, data_batch)` and attributes."""
    model = _compiled_model()
    terms = compat_trainer.compiled_losses(model)
    assert len(terms) == 1 and terms[0].loss_weights == 0.5
    assert isinstance(compat_trainer.loss_tracker(model),
                      keras.metrics.Mean)
    assert compat_trainer.regularization_losses(model) == []
    x, y = helpers.regression_data(4)
    loss = compat_trainer.compute_loss(
        model, x=x, y=y, y_pred=model(x), sample_weight=None, training=True
    )
    assert loss.shape == ()
    if keras.backend.backend() == "tensorflow":
        parameters = inspect.signature(
            getattr(keras.Model, compat_trainer.MAYBE_SYMBOLIC_BUILD)
        ).parameters
        assert {"iterator", "data_batch"} <= set(parameters)
    elif keras.backend.backend() == "jax":
        for name, expected in compat_trainer.JAX_TRAINER_METHODS.items():
            parameters = inspect.signature(getattr(keras.Model, name))
            assert set(expected) <= set(parameters.parameters), name
    for name in compat_trainer.MODEL_ATTRIBUTES:
        assert hasattr(model, name), name
    assert model in compat_trainer.all_layers(model)


def test_replica_local_variable_arguments():
    """Catches a `keras.Variable` that no longer takes the
    `synchronization` and `aggregation` of the accumulators."""
    variable = keras.Variable(
        np.zeros((2,), "float32"), trainable=False,
        **compat_variables.REPLICA_LOCAL_SUM,
    )
    assert variable.synchronization == "on_read"
    assert variable.aggregation == "sum"


def test_activity_regularisation_semantics_match_the_version_flag():
    """Catches a Keras that changes how it reduces activity regularisation
    over the batch without the version flag following."""
    layer = keras.layers.Dense(
        1, kernel_initializer="ones", use_bias=False,
        activity_regularizer=keras.regularizers.L1(1.0),
    )
    layer(np.ones((4, 1), "float32"))
    penalty = float(sum(layer.losses))
    batch_mean = compat_regularisers.ACTIVITY_REGULARISATION_IS_BATCH_MEAN
    expected = 1.0 if batch_mean else 4.0
    assert penalty == pytest.approx(expected)


def test_missing_touchpoint_names_keras_version_and_piece():
    """Catches a deep traceback (or silence) where a touchpoint is missing."""
    error = compat_versions.missing("keras.src.example.piece")
    assert keras.version() in str(error)
    assert "keras.src.example.piece" in str(error)

    class Bare:
        pass

    with pytest.raises(compat_versions.KerasInternalsError,
                       match="_loss_tracker"):
        compat_trainer.loss_tracker(Bare())
