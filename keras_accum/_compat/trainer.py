"""`keras.Model` and `Trainer` internals the accumulating step uses.

Serves `AccumulatingModel` and the backends' trainers
(`keras_accum/backend/<name>/`): the loss entry point `_compute_loss`, the
regularisation losses, the `loss` tracker, the compiled loss terms,
`model.losses` inside a step, the symbolic build at the start of `fit`, the
JAX trainer's state passing and private model attributes, and how `fit`
prints its lines. Checked on Keras 3.10.0 to 3.15.1; the JAX state
shardings differ before and from 3.12 (`JAX_STATE_SHARDING_IN_JIT`), the
epoch iterator's items before and from 3.11 (`first_batch`).
"""

import contextlib

import keras

from keras_accum._compat import versions

try:
    from keras.src.utils import io_utils as _io_utils
    from keras.src.utils import tracking as _tracking
except ImportError as error:  # pragma: no cover - only on a foreign Keras
    raise versions.missing(f"keras.src ({error.name})") from None

BACKEND = keras.backend.backend()

#: `print_msg(message)`: how Keras prints its own lines (`fit`'s progress):
#: to stdout, or to absl logging under
#: `keras.config.disable_interactive_logging()`. Checked on Keras 3.10.0 to
#: 3.15.1.
print_msg = versions.require(
    _io_utils, "print_msg", "keras.src.utils.io_utils.print_msg"
)

#: `AccumulatingModel` overrides `keras.Model._maybe_symbolic_build(iterator,
#: data_batch)` on TensorFlow (the shape-learning build at the start of
#: `fit`); checked on Keras 3.10.0 to 3.15.1. Verified at import there.
MAYBE_SYMBOLIC_BUILD = "_maybe_symbolic_build"
if BACKEND == "tensorflow":
    versions.require_parameters(
        versions.require(keras.Model, MAYBE_SYMBOLIC_BUILD,
                         "keras.Model._maybe_symbolic_build"),
        ("iterator", "data_batch"),
        "keras.Model._maybe_symbolic_build",
    )

#: How the JAX trainer keeps the state's shardings from step to step. From
#: Keras 3.12, `JAXTrainer._get_state_sharding_spec()` gives `jax.jit` its
#: `out_shardings`; up to 3.11, `fit` records them
#: (`_record_training_state_sharding_spec`, into `_*_variable_shardings`)
#: and Keras' own steps end in `_enforce_jax_state_sharding(...)`, which the
#: accumulating step does too (measured on 3.10.0 and 3.11.3: no
#: `_get_state_sharding_spec`).
JAX_STATE_SHARDING_IN_JIT = versions.KERAS_VERSION >= (3, 12)

#: The JAX trainer's state passing (`keras/src/backend/jax/trainer.py`),
#: which the JAX step extends with the accumulators: methods of
#: `JAXTrainer` and the parameters `AccumulatingModel` passes or reads.
#: Checked on Keras 3.10.0 to 3.15.1; verified at import on JAX.
JAX_TRAINER_METHODS = {
    "_get_jax_state": (
        "trainable_variables", "non_trainable_variables",
        "optimizer_variables", "metrics_variables", "purge_model_variables",
    ),
    "_purge_model_variables": ("optimizer_variables",),
    "jax_state_sync": (),
    "compute_loss_and_updates": (
        "trainable_variables", "non_trainable_variables",
        "metrics_variables", "x", "y", "sample_weight", "training",
        "optimizer_variables",
    ),
}
if JAX_STATE_SHARDING_IN_JIT:
    JAX_TRAINER_METHODS["_get_state_sharding_spec"] = ()
else:
    JAX_TRAINER_METHODS["_record_training_state_sharding_spec"] = ()
if BACKEND == "jax":
    for _name, _parameters in JAX_TRAINER_METHODS.items():
        versions.require_parameters(
            versions.require(keras.Model, _name, f"JAXTrainer.{_name}"),
            _parameters,
            f"JAXTrainer.{_name}",
        )

versions.require(keras.Model, "_compute_loss", "keras.Model._compute_loss")
versions.require(keras.Model, "_flatten_layers",
                 "keras.Layer._flatten_layers")
versions.require(keras.Model, "_aggregate_additional_loss",
                 "keras.Model._aggregate_additional_loss")
versions.require(keras.Model, "_get_regularization_losses",
                 "keras.Layer._get_regularization_losses")
versions.require(_tracking, "DotNotTrackScope",
                 "keras.src.utils.tracking.DotNotTrackScope")

#: Private attributes of `keras.Model` that `AccumulatingModel` reads (and,
#: for `_jit_compile`, sets around its own traced functions); checked on
#: Keras 3.10.0 to 3.15.1, and by `tests/compat_test.py`.
MODEL_ATTRIBUTES = (
    "_call_has_training_arg",
    "_jit_compile",
) + (("_distribute_strategy",) if BACKEND == "tensorflow" else ())


def compute_loss(model, **kwargs):
    """`model._compute_loss(x, y, y_pred, sample_weight, training)`.

    The entry point `keras.Model.train_step` uses: it calls the user's
    `compute_loss` override, with or without the `training` argument.
    Checked on Keras 3.10.0 to 3.15.1.
    """
    return model._compute_loss(**kwargs)


def aggregate_additional_loss(model, loss):
    """`loss` as `model.compute_loss` adds it to the total: a scalar, cast
    to `floatx()` if not a float, scaled by 1/replicas.

    `Trainer._aggregate_additional_loss` (TensorFlow's override scales for
    distribution); checked on Keras 3.10.0 to 3.15.1.
    """
    return model._aggregate_additional_loss(loss)


def regularization_losses(model):
    """The weight-regularisation losses of `model`'s trainable weights.

    `Layer._get_regularization_losses()`; checked on Keras 3.10.0 to 3.15.1.
    """
    return model._get_regularization_losses()


def all_layers(model):
    """`model` and every layer nested in it.

    `Layer._flatten_layers()`; checked on Keras 3.10.0 to 3.15.1.
    """
    return list(model._flatten_layers())


def loss_tracker(model):
    """The `keras.metrics.Mean` that logs `loss` in `fit`.

    `Trainer._loss_tracker`; checked on Keras 3.10.0 to 3.15.1.
    """
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:
        raise versions.missing("keras.Model._loss_tracker")
    return tracker


def set_loss_tracker(model, tracker):
    """Replaces `Trainer._loss_tracker`, untracked like Keras' own.

    `Trainer.compile` sets it under `no_automatic_dependency_tracking`
    (`keras.src.utils.tracking.DotNotTrackScope`); set plainly, the layer's
    tracker would also add it to `model._metrics`, and `model.metrics` would
    list `loss` twice. Checked on Keras 3.10.0 to 3.15.1.
    """
    with _tracking.DotNotTrackScope():
        model._loss_tracker = tracker


def compiled_losses(model):
    """The compiled loss terms, one per output loss, in flat order.

    `model._compile_loss._flat_losses` (named `flat_losses` before Keras
    3.7), each with a `loss_weights` attribute; checked on Keras 3.10.0 to
    3.15.1.

    Returns:
        A list, or `None` while the compiled loss is not built yet.
    """
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None or not compile_loss.built:
        return None
    for name in ("_flat_losses", "flat_losses"):
        flat = getattr(compile_loss, name, None)
        if flat is not None:
            return list(flat)
    raise versions.missing("CompileLoss._flat_losses")


@contextlib.contextmanager
def losses_override(model, losses):
    """`model.losses` returns `losses` inside the block.

    `Layer._losses_override`, which `Layer.losses` returns when it is not
    empty (Keras' JAX trainer sets it for `compute_loss`); checked on Keras
    3.10.0 to 3.15.1. With no `losses`, `model.losses` is unchanged.
    """
    if not losses:
        yield
        return
    if not hasattr(model, "_losses_override"):
        raise versions.missing("keras.Layer._losses_override")
    previous = list(model._losses_override)
    model._losses_override = list(losses)
    try:
        yield
    finally:
        model._losses_override = previous


def compute_output_spec(function, *args):
    """`keras.src.backend.compute_output_spec`: runs `function` on
    `keras.KerasTensor`s symbolically; checked on Keras 3.10.0 to 3.15.1."""
    from keras.src import backend

    return backend.compute_output_spec(function, *args)


def first_batch(iterator):
    """The first data batch of a `fit` epoch iterator, as
    `Trainer._symbolic_build` takes it (the caller resets the iterator).

    The iterator yields `(step, data_or_iterator)` up to Keras 3.10 and
    `(step, index, data_or_iterator)` from 3.11 (checked on 3.10.0 and
    3.15.1); `data_or_iterator` is a list of batches or an iterator of them.
    """
    for item in iterator:
        batches = item[-1]
        if isinstance(batches, (list, tuple)):
            return batches[0]
        return next(batches)
    return None
