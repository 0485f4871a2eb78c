"""Functional models, `Sequential`'s graph and `clone_model`.

Serves `AccumulatingModel`'s functional form (`FunctionalAccumulatingModel`,
`wrap`): telling a functional construction apart, reading the nested inputs
and outputs of a graph, the constructor keywords, and handing a subclass'
own arguments over through `keras.models.clone_model`. Checked on Keras
3.10.0 to 3.15.1.
"""

import inspect
import threading
import weakref

import keras

from keras_accum._compat import versions

try:
    from keras.src.models import functional as _functional_module
    from keras.src.models import model as _model_module
except ImportError as error:  # pragma: no cover - only on a foreign Keras
    raise versions.missing(f"keras.src ({error.name})") from None

#: `keras.src.models.functional.Functional`, the class of functional models;
#: checked on Keras 3.10.0 to 3.15.1.
Functional = versions.require(
    _functional_module, "Functional", "keras.src.models.functional.Functional"
)

_functional_init_arguments = versions.require(
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
        raise versions.missing(
            "Functional._inputs_struct/_outputs_struct"
        ) from None


def sequential_graph(model):
    """The functional graph behind a built `keras.Sequential`, or `None`.

    `Sequential._functional`; checked on Keras 3.10.0 to 3.15.1.
    """
    if not hasattr(model, "_functional"):
        raise versions.missing("keras.Sequential._functional")
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
