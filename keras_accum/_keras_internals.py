"""Every private Keras API keras_accum relies on, in one guarded place.

keras_accum hooks into Keras below its public API: the reduction every
`Loss` goes through, the compiled-loss container, the functional graph. These
are not stable across Keras releases, so each one is reached only through a
wrapper here. Each wrapper's docstring names the Keras versions it was
checked on (the compatibility matrix, docs/compatibility.md, produced by
`scripts/version_matrix.py`), and `tests/keras_internals_test.py` fails if a
Keras release changes one.

On a Keras that lacks a touchpoint, the wrapper raises
`KerasInternalsError`, naming the installed Keras version and the missing
piece, instead of a deep traceback or a silently wrong answer. Module-level
touchpoints are resolved when `keras_accum` is imported; attribute-level ones
(on a model) when they are first used.

Where the installed Keras' *semantics* differ between supported versions
(activity regularisation, the masked-loss divisor), the branch is taken here
too, so the rest of the library reads one answer.
"""

import contextlib
import inspect
import threading
import weakref

import keras

from keras_accum.version import __version__

# The range proven by the version matrix (docs/compatibility.md); "Keras
# 3.10.0 to 3.15.1" in a docstring below means each of these releases.
CHECKED_KERAS = "3.10.0, 3.11.3, 3.12.4, 3.13.2, 3.14.1 and 3.15.1"


def _parse(version):
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


KERAS_VERSION = _parse(keras.version())


class KerasInternalsError(RuntimeError):
    """The installed Keras lacks a private API keras_accum relies on."""


def _missing(piece, checked=CHECKED_KERAS):
    return KerasInternalsError(
        f"keras_accum {__version__} relies on `{piece}`, a private Keras API "
        f"that the installed Keras {keras.version()} does not have (checked "
        f"on Keras {checked}). Install a Keras version from the supported "
        "range (docs/compatibility.md), e.g. `pip install 'keras>=3.10'`. "
        f"Received: keras.__version__={keras.version()!r}"
    )


def _require(module, name, piece):
    value = getattr(module, name, None)
    if value is None:
        raise _missing(piece)
    return value


def _require_parameters(function, names, piece):
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise _missing(piece) from None
    if not set(names) <= set(parameters):
        raise _missing(f"{piece}({', '.join(names)})")


try:
    from keras.src.losses import loss as _loss_module
    from keras.src.models import functional as _functional_module
    from keras.src.models import model as _model_module
    from keras.src.utils import io_utils as _io_utils
    from keras.src.utils import tracking as _tracking
except ImportError as error:  # pragma: no cover - only on a foreign Keras
    raise _missing(f"keras.src ({error.name})") from None

# --- keras.src.losses.loss -------------------------------------------------

#: The module whose `reduce_weighted_values` `loss_normalisers` hooks.
#: Checked on Keras 3.10.0 to 3.15.1: `Loss.__call__` calls the module-level
#: `reduce_weighted_values(values, sample_weight, mask, reduction, dtype)`
#: through the module global, so replacing the attribute is seen by every
#: loss.
loss_module = _loss_module
_require(_loss_module, "reduce_weighted_values",
         "keras.src.losses.loss.reduce_weighted_values")
_require_parameters(
    _loss_module.reduce_weighted_values,
    ("values", "sample_weight", "mask", "reduction", "dtype"),
    "keras.src.losses.loss.reduce_weighted_values",
)

#: `apply_mask(sample_weight, mask, dtype, reduction)`: folds a prediction
#: mask into the sample weights. Checked on Keras 3.10.0 to 3.15.1 (its
#: divisor changed in 3.13, see `masked_valid_count`).
apply_mask = _require(
    _loss_module, "apply_mask", "keras.src.losses.loss.apply_mask"
)
squeeze_or_expand_to_same_rank = _require(
    _loss_module, "squeeze_or_expand_to_same_rank",
    "keras.src.losses.loss.squeeze_or_expand_to_same_rank",
)
standardize_reduction = _require(
    _loss_module, "standardize_reduction",
    "keras.src.losses.loss.standardize_reduction",
)
_scale_loss = _require(
    _loss_module, "scale_loss_for_distribution",
    "keras.src.losses.loss.scale_loss_for_distribution (Keras >= 3.8)",
)
_unscale_loss = _require(
    _loss_module, "unscale_loss_for_distribution",
    "keras.src.losses.loss.unscale_loss_for_distribution (Keras >= 3.8)",
)

#: `print_msg(message)`: how Keras prints its own lines (`fit`'s progress):
#: to stdout, or to absl logging under
#: `keras.config.disable_interactive_logging()`. Checked on Keras 3.10.0 to
#: 3.15.1.
print_msg = _require(
    _io_utils, "print_msg", "keras.src.utils.io_utils.print_msg"
)


def reduce_weighted_values():
    """The current `keras.src.losses.loss.reduce_weighted_values`.

    Checked on Keras 3.10.0 to 3.15.1. Returns the module attribute as it is
    now (possibly keras_accum's own recording hook).
    """
    return _loss_module.reduce_weighted_values


def set_reduce_weighted_values(function):
    """Replaces `keras.src.losses.loss.reduce_weighted_values`.

    Checked on Keras 3.10.0 to 3.15.1: `Loss.__call__` looks the function up
    in the module at each call, so the replacement sees every reduction.
    """
    _loss_module.reduce_weighted_values = function


def scale_loss_for_distribution(value):
    """Divides `value` by the replica count, as Keras does for a loss.

    `keras.src.losses.loss.scale_loss_for_distribution`, from Keras 3.8;
    checked on Keras 3.10.0 to 3.15.1.
    """
    return _scale_loss(value)


def unscale_loss_for_distribution(value):
    """Undoes `scale_loss_for_distribution` (for logging the loss).

    `keras.src.losses.loss.unscale_loss_for_distribution`, from Keras 3.8;
    checked on Keras 3.10.0 to 3.15.1.
    """
    return _unscale_loss(value)


#: Keras < 3.13 divides a masked `"sum_over_batch_size"` loss by
#: `valid + backend.epsilon()` (`apply_mask` weights valid entries
#: `total / (valid + 1e-7)`); 3.13 onward by `valid` exactly
#: (`divide_no_nan`). Checked on Keras 3.10.0, 3.12.x and 3.13 to 3.15.1.
MASK_DIVISOR_HAS_EPSILON = KERAS_VERSION < (3, 13)


def masked_valid_count(valid):
    """The count of valid entries Keras divides a masked mean loss by.

    Args:
        valid: Scalar tensor, the number of unmasked loss entries.

    Returns:
        `valid`, plus `keras.backend.epsilon()` on Keras < 3.13, which
        divides by `valid + epsilon` there.
    """
    if MASK_DIVISOR_HAS_EPSILON:
        return valid + keras.backend.epsilon()
    return valid


# --- Activity regularisation ----------------------------------------------

#: From Keras 3.14, `Layer.__call__` divides an activity-regulariser loss by
#: the batch size (a mean over examples); before, it is a sum over the
#: batch. Checked on Keras 3.10.0, 3.13.x (sum) and 3.14, 3.15.1 (mean).
ACTIVITY_REGULARISATION_IS_BATCH_MEAN = KERAS_VERSION >= (3, 14)


def activity_regularised_layers(model):
    """Layers of `model` (itself included) with an activity regulariser.

    Uses `Layer._flatten_layers`, checked on Keras 3.10.0 to 3.15.1.
    """
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:
        raise _missing("keras.Layer._flatten_layers")
    return [
        layer
        for layer in flatten(include_self=True)
        if getattr(layer, "activity_regularizer", None) is not None
    ]


class _RecordingRegulariser:
    """Calls an activity regulariser, telling `on_penalty` of each output
    it regularises first."""

    def __init__(self, layer, regulariser, on_penalty):
        self.layer = layer
        self.regulariser = regulariser
        self.on_penalty = on_penalty

    def __call__(self, output):
        self.on_penalty(self.layer, output)
        return self.regulariser(output)


@contextlib.contextmanager
def record_activity_regularisation(model, on_penalty):
    """Calls `on_penalty(layer, output)` before each activity penalty of
    the forward passes in the block.

    `Layer.__call__` looks up `self.activity_regularizer` after `call`,
    calls it on each output and passes the result to `add_loss` at once
    (Keras 3.10.0 to 3.13.2; from 3.14 divided by the batch size first).
    Each regularised layer's attribute is replaced by a wrapper for the
    block and restored after it, so that the `add_loss` call that follows
    is known to be the penalty.

    Args:
        model: The model whose layers to record, or `None` for none.
        on_penalty: Called with the layer and the regularised output.
    """
    layers = [] if model is None else activity_regularised_layers(model)
    originals = [layer.activity_regularizer for layer in layers]
    try:
        for layer, regulariser in zip(layers, originals):
            layer.activity_regularizer = _RecordingRegulariser(
                layer, regulariser, on_penalty
            )
        yield
    finally:
        for layer, regulariser in zip(layers, originals):
            layer.activity_regularizer = regulariser


def aggregate_additional_loss(model, loss):
    """`loss` as `model.compute_loss` adds it to the total: a scalar, cast
    to `floatx()` if not a float, scaled by 1/replicas.

    `Trainer._aggregate_additional_loss` (TensorFlow's override scales for
    distribution); checked on Keras 3.10.0 to 3.15.1.
    """
    return model._aggregate_additional_loss(loss)


# --- keras.src.models ------------------------------------------------------

#: `keras.src.models.functional.Functional`, the class of functional models;
#: checked on Keras 3.10.0 to 3.15.1.
Functional = _require(
    _functional_module, "Functional", "keras.src.models.functional.Functional"
)

_functional_init_arguments = _require(
    _model_module, "functional_init_arguments",
    "keras.src.models.model.functional_init_arguments",
)


def functional_init_arguments(args, kwargs):
    """Whether `Model(*args, **kwargs)` is a functional construction.

    `keras.src.models.model.functional_init_arguments`; checked on Keras
    3.10.0 to 3.15.1.
    """
    return _functional_init_arguments(args, kwargs)


def graph_structure(graph):
    """The nested inputs and outputs a functional model was built from.

    Args:
        graph: A `Functional` model.

    Returns:
        `(inputs, outputs)`: `graph._inputs_struct` and
        `graph._outputs_struct`, with the user's nesting (dicts, lists).
        Checked on Keras 3.10.0 to 3.15.1.
    """
    try:
        return graph._inputs_struct, graph._outputs_struct
    except AttributeError:
        raise _missing("Functional._inputs_struct/_outputs_struct") from None


def sequential_graph(model):
    """The functional graph behind a built `keras.Sequential`, or `None`.

    `Sequential._functional`; checked on Keras 3.10.0 to 3.15.1.
    """
    if not hasattr(model, "_functional"):
        raise _missing("keras.Sequential._functional")
    return model._functional


#: The keyword arguments `Functional.__init__(inputs, outputs, name=None,
#: **kwargs)` uses: it pops `trainable` and silently drops every other
#: keyword. Checked on Keras 3.10.0 to 3.15.1.
FUNCTIONAL_KEYWORDS = ("inputs", "outputs", "name", "trainable")

#: Keywords `Layer.__init__` pops from its `**kwargs` (with a deprecation
#: warning) before it rejects the rest; checked on Keras 3.10.0 to 3.15.1.
_LAYER_POPPED_KEYWORDS = ("input_dim", "input_shape")


def layer_keywords():
    """The keyword arguments `keras.Model.__init__` accepts for a
    subclassed model: those of `Layer.__init__` (it raises `ValueError`
    for any other). Read from the installed Keras."""
    parameters = inspect.signature(keras.layers.Layer.__init__).parameters
    return tuple(
        name for name, p in parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ) + _LAYER_POPPED_KEYWORDS


# `keras.models.clone_model` rebuilds a functional model as
# `model.__class__(input_tensors, output_tensors, name=model.name)`, where
# `output_tensors` is what `model._run_through_graph(input_tensors, ...)`
# (over cloned layers) has just returned: `_clone_functional_model` in
# `keras/src/models/cloning.py`, checked on Keras 3.10.0 to 3.15.1. The
# arguments a subclass adds to the constructor are lost on the way; the
# subclass hands them over from the graph run to the constructor.
_graph_runs = threading.local()


def record_graph_run(model, outputs):
    """Remembers that `model._run_through_graph` returned symbolic
    `outputs` (as it does for `clone_model`); see `cloned_model`. Keeps
    weak references only."""
    flat = keras.tree.flatten(outputs)
    if flat and all(isinstance(x, keras.KerasTensor) for x in flat):
        _graph_runs.last = [weakref.ref(model)] + [weakref.ref(x) for x in flat]


def cloned_model(args, kwargs):
    """The model `clone_model` is cloning with the constructor call
    `cls(*args, **kwargs)`, or `None`.

    It is the model whose last symbolic graph run (`record_graph_run`)
    returned the very output tensors passed here, under its own `name`:
    what `_clone_functional_model` passes.
    """
    last = getattr(_graph_runs, "last", None)
    if last is None:
        return None
    model, *recorded = (ref() for ref in last)
    outputs = args[1] if len(args) > 1 else kwargs.get("outputs")
    name = args[2] if len(args) > 2 else kwargs.get("name")
    flat = keras.tree.flatten(outputs)
    if (
        model is None
        or name != model.name
        or len(flat) != len(recorded)
        or any(x is not r for x, r in zip(flat, recorded))
    ):
        return None
    del _graph_runs.last
    return model


# --- keras.Model / Trainer --------------------------------------------------

BACKEND = keras.backend.backend()

#: `AccumulatingModel` overrides `keras.Model._maybe_symbolic_build(iterator,
#: data_batch)` on TensorFlow (the shape-learning build at the start of
#: `fit`); checked on Keras 3.10.0 to 3.15.1. Verified at import there.
MAYBE_SYMBOLIC_BUILD = "_maybe_symbolic_build"
if BACKEND == "tensorflow":
    _require_parameters(
        _require(keras.Model, MAYBE_SYMBOLIC_BUILD,
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
JAX_STATE_SHARDING_IN_JIT = KERAS_VERSION >= (3, 12)

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
        _require_parameters(
            _require(keras.Model, _name, f"JAXTrainer.{_name}"),
            _parameters,
            f"JAXTrainer.{_name}",
        )

_require(keras.Model, "_compute_loss", "keras.Model._compute_loss")
_require(keras.Model, "_flatten_layers", "keras.Layer._flatten_layers")
_require(keras.Model, "_aggregate_additional_loss",
         "keras.Model._aggregate_additional_loss")
_require(keras.Model, "_get_regularization_losses",
         "keras.Layer._get_regularization_losses")


def compute_loss(model, **kwargs):
    """`model._compute_loss(x, y, y_pred, sample_weight, training)`.

    The entry point `keras.Model.train_step` uses: it calls the user's
    `compute_loss` override, with or without the `training` argument.
    Checked on Keras 3.10.0 to 3.15.1.
    """
    return model._compute_loss(**kwargs)


def regularization_losses(model):
    """The weight-regularisation losses of `model`'s trainable weights.

    `Layer._get_regularization_losses()`; checked on Keras 3.10.0 to 3.15.1.
    """
    return model._get_regularization_losses()


def loss_tracker(model):
    """The `keras.metrics.Mean` that logs `loss` in `fit`.

    `Trainer._loss_tracker`; checked on Keras 3.10.0 to 3.15.1.
    """
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:
        raise _missing("keras.Model._loss_tracker")
    return tracker


_require(_tracking, "DotNotTrackScope",
         "keras.src.utils.tracking.DotNotTrackScope")


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
    raise _missing("CompileLoss._flat_losses")


# --- keras.Variable ---------------------------------------------------------

def _variable_init():
    """The first `__init__` up `keras.Variable`'s MRO that names its
    parameters: up to Keras 3.11, the JAX backend's `Variable.__init__(self,
    *args, layout=None, **kwargs)` passes them on to `KerasVariable`'s."""
    for cls in keras.Variable.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if not {inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD} <= kinds:
            return init
    return keras.Variable.__init__


_require_parameters(
    _variable_init(), ("synchronization", "aggregation"),
    "keras.Variable (Keras >= 3.10)",
)


def all_layers(model):
    """`model` and every layer nested in it.

    `Layer._flatten_layers()`; checked on Keras 3.10.0 to 3.15.1.
    """
    return list(model._flatten_layers())


#: Private attributes of `keras.Model` that `AccumulatingModel` reads (and,
#: for `_jit_compile`, sets around its own traced functions); checked on
#: Keras 3.10.0 to 3.15.1, and by `tests/keras_internals_test.py`.
MODEL_ATTRIBUTES = (
    "_call_has_training_arg",
    "_jit_compile",
) + (("_distribute_strategy",) if BACKEND == "tensorflow" else ())


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
        raise _missing("keras.Layer._losses_override")
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
