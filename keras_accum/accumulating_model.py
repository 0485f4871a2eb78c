"""`AccumulatingModel`: exact gradient accumulation inside `model.fit`.

The public class is assembled here, as `keras.Model` assembles its
trainer: the backend's train step (`keras_accum.backend`), the window's
life cycle (`core.lifecycle.WindowLifecycle`) and the loss-term
bookkeeping (`core.loss_terms.LossTerms`), over `keras.Model`. What stays
here is what the user meets: the arguments, `compile`, `fit`, saving and
`wrap`.
"""

import inspect

import keras

from keras_accum._compat import functional as compat_functional
from keras_accum._compat import trainer as compat_trainer
from keras_accum.backend import AccumulationTrainer
from keras_accum.core import custom_steps
from keras_accum.core import micro_batches
from keras_accum.core import objectives
from keras_accum.core import validation
from keras_accum.core import window_loss
from keras_accum.core.lifecycle import WindowLifecycle
from keras_accum.core.loss_terms import LossTerms
from keras_accum.core.noise_scale_estimation import NoiseScaleEstimation
from keras_accum.core.step_functions import StepFunctions
from keras_accum.core.window_plan import WindowPlan
from keras_accum.core.window_schedule import WindowSchedule
from keras_accum.core.window_schedule import accumulate_from_config
from keras_accum.flush_callback import ApplyAccumulatedGradients

# Position of `callbacks` in `keras.Model.fit(x, y, batch_size, epochs,
# verbose, callbacks, ...)`.
_FIT_CALLBACKS_POSITION = 5
_FIT_SIGNATURE = inspect.signature(keras.Model.fit)


@keras.saving.register_keras_serializable(package="keras_accum")
class AccumulatingModel(
    AccumulationTrainer, WindowLifecycle, LossTerms, NoiseScaleEstimation,
    keras.Model,
):
    """A `keras.Model` that accumulates gradients over a window of batches.

    `train_step` adds each mini-batch's gradient into non-trainable
    accumulator variables instead of applying it. The optimizer applies the
    accumulated gradient once per window: at the end of every epoch
    (`accumulate="epoch"`) or every `accumulate` mini-batches. Mini-batches
    left over at the end of an epoch are applied then, so no gradient crosses
    an epoch boundary. `fit` installs the `ApplyAccumulatedGradients` callback
    that does the epoch-end work by itself.

    With `reduction="mean"` the applied gradient is the gradient of the loss
    over every example of the window, exactly as if they had formed one big
    batch: each mini-batch is weighted by its share of the loss's normaliser
    (examples, valid mask entries, or the sum of sample weights), and weight
    regularisation losses count once per update. `optimizer.iterations`
    counts applied updates, so learning-rate schedules, weight decay and
    Adam's bias correction are those of big-batch training.

    Validation and every callback's `on_epoch_end` see the weights after the
    epoch's update. The logged training loss and metrics of an epoch are those
    measured on its mini-batches, i.e. at the weights the window started from;
    in epoch mode that is the full-data loss at the epoch's starting weights.

    The train step is the backend's (`keras_accum/backend/<name>/`):
    TensorFlow (`tf.distribute`), JAX (`keras.distribution`) or PyTorch
    (one device), with the same semantics.

    Use it like `keras.Model`: functionally,
    `AccumulatingModel(inputs, outputs, accumulate=4)`, or as a base class
    whose `__init__` passes `**kwargs` to `super().__init__`.

    Args:
        accumulate: `"epoch"` for one update per epoch, or an int >= 1 for an
            update every `accumulate` mini-batches. `1` trains exactly like
            `keras.Model`. A dict `{first_epoch: window}` or a callable
            `epoch -> window` changes it per epoch; `"auto"` or a
            `NoiseScaleSchedule` sets each epoch's window from the measured
            gradient noise scale. Defaults to `"epoch"`.
        reduction: `"mean"` applies the gradient of the loss over the whole
            window (exact big-batch equivalence). `"sum"` applies the running
            total of the per-mini-batch gradients. Defaults to `"mean"`.
        loss_normalisation: `"auto"` normalises each compiled loss term by
            its own window-wide count when there are several (exact for any
            mix of reductions, masks and sample weights, at one backward
            pass and one gradient buffer per term), and keeps one buffer
            for a single term. `"shared"` keeps one buffer for the whole
            loss, weighted by its first term's normaliser: exact only when
            the terms' normalisers are proportional across mini-batches.
            `"per_loss"` always keeps one per term. Defaults to `"auto"`.
        on_nonfinite: `"raise"` checks each window once and raises
            `FloatingPointError` from `fit` on a non-finite one (not
            applied); `"skip"` leaves non-finite micro-batches out of their
            window. Defaults to `"raise"`.
        micro_batch_size: `None` runs each `fit` batch in one forward and
            backward pass. An int splits each batch, inside the compiled
            step, into micro-batches of that many examples per device
            (replica), whose gradients are accumulated: the update of the
            batch in the memory of a micro-batch, with one host call per
            batch. `accumulate` still counts `fit` batches. A batch that
            does not divide ends with a shorter micro-batch. Statistics of
            `BatchNormalization` are per micro-batch, and each micro-batch
            draws its own dropout masks. `"auto"` (JAX) picks the largest
            size whose compiled step fits `memory_limit`, once per input
            shape (see `chosen_micro_batch_size`). Defaults to `None`.
        memory_limit: With `micro_batch_size="auto"`, the bytes one step
            may use per device, as XLA accounts them (temporaries plus
            arguments). Defaults to `None`.
        noise_scale: `True` measures the gradient noise scale of
            McCandlish et al. 2018 from the micro-batches' and the
            windows' gradients, one eighth of the weights per window
            (`noise_scale_estimate`, once every eighth has been read; the
            epoch logs' `noise_scale`, `noise_scale_trace`,
            `noise_scale_grad_sq`).
            Needs `reduction="mean"` and windows of at least two
            micro-batches. `None` turns it on exactly when `accumulate`
            follows it (`"auto"`). Defaults to `None`.
        **kwargs: Passed to `keras.Model`.

    Raises:
        TypeError: if `accumulate` is neither `"epoch"` nor an int, or for
            a keyword argument that neither `AccumulatingModel` nor
            `keras.Model` takes (functional Keras models ignore those).
        ValueError: if `accumulate` is an int < 1 or another string, if
            `reduction` is not `"mean"` or `"sum"`, for a bad
            `micro_batch_size` or `memory_limit`, or if Keras runs on a
            backend other than TensorFlow, JAX or torch.

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input((3,))
    >>> outputs = keras.layers.Dense(1)(inputs)
    >>> model = AccumulatingModel(inputs, outputs, accumulate="epoch")
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((10, 3)), np.ones((10, 1))
    >>> _ = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    >>> int(model.optimizer.iterations.numpy())
    2
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # An overriding `train_step` must accumulate (see `custom_steps`).
        step = cls.__dict__.get("train_step")
        if step is not None:
            cls.train_step = custom_steps.checked_train_step(step)

    def __new__(cls, *args, **kwargs):
        # `keras.Model.__init__` rewrites the bases of a class used
        # functionally, for good; route functional calls to a dedicated
        # subclass so `AccumulatingModel` stays usable as a base class.
        if cls is AccumulatingModel and (
            compat_functional.functional_init_arguments(args, kwargs)
        ):
            return keras.Model.__new__(
                FunctionalAccumulatingModel, *args, **kwargs
            )
        return super().__new__(cls, *args, **kwargs)

    def __init__(
        self,
        *args,
        accumulate="epoch",
        reduction="mean",
        loss_normalisation="auto",
        on_nonfinite="raise",
        micro_batch_size=None,
        memory_limit=None,
        noise_scale=None,
        **kwargs,
    ):
        validation.require_supported_backend("AccumulatingModel")
        micro_batches.validate(micro_batch_size, memory_limit)
        schedule = WindowSchedule(accumulate)
        validation.validate_reduction(reduction)
        noise_scale = validation.validate_noise_scale(
            noise_scale, schedule, reduction, micro_batch_size
        )
        validation.validate_choice(
            loss_normalisation, "loss_normalisation",
            objectives.LOSS_NORMALISATIONS,
        )
        validation.validate_choice(
            on_nonfinite, "on_nonfinite", validation.NONFINITE_POLICIES
        )
        if compat_functional.functional_init_arguments(
            args, kwargs
        ) and not isinstance(self, compat_functional.Functional):
            # Keras would rewrite this class's bases to `Functional` for good.
            raise TypeError(
                f"`{type(self).__name__}` is a subclass of `AccumulatingModel` "
                "called with `inputs` and `outputs`; a functional subclass "
                "must derive from "
                "`keras_accum.accumulating_model.FunctionalAccumulatingModel`."
            )
        keras_keywords = self._keras_keywords(args, kwargs)
        if keras_keywords is not None:
            # Keras' `Functional` drops unknown keywords silently.
            validation.reject_unknown_arguments(
                kwargs,
                ACCUMULATION_ARGUMENTS + keras_keywords,
                "AccumulatingModel"
                if isinstance(self, compat_functional.Functional)
                else type(self).__name__,
            )
        super().__init__(*args, **kwargs)
        self._schedule = schedule
        self._reduction = reduction
        self._loss_normalisation = loss_normalisation
        self._on_nonfinite = on_nonfinite
        self._micro_batch_size = micro_batch_size
        self._memory_limit = memory_limit
        self._noise_scale = noise_scale
        # The noise scale's moving averages until accumulators hold them
        # (restored by `load_own_variables`; `None`: not measured yet).
        self._noise_state = None
        # Under `"auto"`, the size chosen for the latest input shape.
        self._chosen_micro_batch_size = None
        self._accumulator = self.accumulator_class()
        # The window of the current epoch (`None`: epoch 0's, resolved when
        # needed), kept in Python so that accumulators built later (on a
        # subclassed model's first trace) start with it.
        self._epoch_window = None
        # How the window's sums are turned into the applied gradient;
        # decided when the step is traced.
        self._window_plan = WindowPlan()
        self._functions = StepFunctions()

    def _keras_keywords(self, args, kwargs):
        """The keyword arguments `keras.Model.__init__` takes here.

        `None` where they cannot be known: a base class between
        `AccumulatingModel` and `keras.Model` has its own `__init__`.
        """
        if compat_functional.functional_init_arguments(args, kwargs):
            return compat_functional.FUNCTIONAL_KEYWORDS
        following = super(AccumulatingModel, self).__init__
        if getattr(following, "__func__", None) is not keras.Model.__init__:
            return None
        return compat_functional.layer_keywords()

    @property
    def accumulate(self):
        """The window: `"epoch"`, mini-batches per update, or a schedule."""
        return self._schedule.value

    @property
    def reduction(self):
        """`"mean"` (exact big-batch gradient) or `"sum"` (running total)."""
        return self._reduction

    @property
    def loss_normalisation(self):
        """`"auto"`, `"shared"` (one accumulator set) or `"per_loss"` (one
        per compiled loss term; what `"auto"` picks for several terms)."""
        return self._loss_normalisation

    @property
    def on_nonfinite(self):
        """`"raise"` or `"skip"`: what a non-finite micro-batch gradient does."""
        return self._on_nonfinite

    @property
    def micro_batch_size(self):
        """Examples per micro-batch and device inside a step: an int,
        `"auto"`, or `None` (each `fit` batch in one pass)."""
        return self._micro_batch_size

    @property
    def memory_limit(self):
        """Bytes a step may use per device under
        `micro_batch_size="auto"` (else `None`)."""
        return self._memory_limit

    @property
    def chosen_micro_batch_size(self):
        """The micro-batch size the step uses: `micro_batch_size` itself,
        or under `"auto"` the size chosen for the latest input shape
        (`None` before the first step)."""
        if self._micro_batch_size == micro_batches.AUTO:
            return self._chosen_micro_batch_size
        return self._micro_batch_size

    def _accumulation_arguments(self):
        """The arguments `AccumulatingModel` adds to `keras.Model`'s (one
        per `ACCUMULATION_ARGUMENTS`), as the constructor received them.

        `get_config` saves them and `clone_model` passes them on.
        """
        return {
            "accumulate": self._schedule.value,
            "reduction": self._reduction,
            "loss_normalisation": self._loss_normalisation,
            "on_nonfinite": self._on_nonfinite,
            "micro_batch_size": self._micro_batch_size,
            "memory_limit": self._memory_limit,
            "noise_scale": self._noise_scale,
        }

    def get_config(self):
        config = super().get_config()
        config.update(self._accumulation_arguments())
        config["accumulate"] = self._schedule.get_config()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "accumulate" in config:
            config["accumulate"] = accumulate_from_config(config["accumulate"])
        return super().from_config(config, custom_objects=custom_objects)

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        if optimizer is None:
            raise ValueError(
                "`AccumulatingModel.compile()` needs an `optimizer`: the "
                "accumulated gradient is applied by it. Received: "
                "optimizer=None"
            )
        optimizer = keras.optimizers.get(optimizer)
        validation.validate_optimizer(optimizer)
        super().compile(optimizer, *args, **kwargs)
        # Logs several loss terms exactly; a `Mean` for everything else.
        compat_trainer.set_loss_tracker(self, window_loss.WindowLoss())
        self._functions = StepFunctions()

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile()`; ours only
        # validates, so restore the compiled state as `keras.Model` does.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        arguments = _FIT_SIGNATURE.bind(self, *args, **kwargs).arguments
        callbacks = arguments.get("callbacks")
        validation.validate_fit_arguments(
            self._schedule,
            x=arguments.get("x"),
            steps_per_epoch=arguments.get("steps_per_epoch"),
            callbacks=callbacks,
        )
        callbacks = _with_flush_callback(callbacks)
        if len(args) > _FIT_CALLBACKS_POSITION:
            args = list(args)
            args[_FIT_CALLBACKS_POSITION] = callbacks
        else:
            kwargs["callbacks"] = callbacks
        return super().fit(*args, **kwargs)


#: The keyword arguments `AccumulatingModel` adds to `keras.Model`'s, read
#: from its `__init__`; `get_config` saves each (`_accumulation_arguments`).
ACCUMULATION_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(
        AccumulatingModel.__init__
    ).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


@keras.saving.register_keras_serializable(package="keras_accum")
class FunctionalAccumulatingModel(
    AccumulatingModel, compat_functional.Functional
):
    """The functional form of `AccumulatingModel`.

    `AccumulatingModel(inputs, outputs, ...)` returns an instance of this
    class; use `AccumulatingModel` in user code and `isinstance` checks.
    """

    def __new__(cls, *args, **kwargs):
        return compat_functional.Functional.__new__(cls, *args, **kwargs)

    # `(*args, **kwargs)`, not `(inputs, outputs, name=None, **kwargs)`:
    # before Keras 3.15, `Functional.get_config` saves the graph only when
    # `__init__`'s argument list equals the one `getfullargspec` reports for
    # `Functional.__init__`, which its decorator hides (`()`); with named
    # arguments the model saved without its graph and failed to load.
    def __init__(self, *args, **kwargs):
        source = compat_functional.cloned_model(args, kwargs)
        if isinstance(source, AccumulatingModel):
            # `keras.models.clone_model` passes only inputs, outputs and
            # name; the clone keeps the source's other arguments.
            kwargs = {**source._accumulation_arguments(), **kwargs}
        super().__init__(*args, **kwargs)

    def _run_through_graph(self, *args, **kwargs):
        outputs = super()._run_through_graph(*args, **kwargs)
        # Lets the constructor `clone_model` calls next find this model.
        compat_functional.record_graph_run(self, outputs)
        return outputs


def _with_flush_callback(callbacks):
    """Puts an `ApplyAccumulatedGradients` first in the callbacks of `fit`.

    First, so that every other callback's `on_epoch_end` sees the updated
    weights.
    """
    if isinstance(callbacks, keras.callbacks.CallbackList):
        existing = callbacks.callbacks
    else:
        existing = list(callbacks or [])
    if any(isinstance(c, ApplyAccumulatedGradients) for c in existing):
        return callbacks
    flush = ApplyAccumulatedGradients()
    if isinstance(callbacks, keras.callbacks.CallbackList):
        flush.set_model(callbacks.model)
        callbacks.callbacks.insert(0, flush)
        return callbacks
    return [flush] + existing


def wrap(model, accumulate="epoch", reduction="mean", **kwargs):
    """Returns an `AccumulatingModel` sharing `model`'s layers and weights.

    The new model is built from `model`'s inputs and outputs, so no weight is
    copied: training it trains `model`. Compile the returned model.

    Args:
        model: A functional `keras.Model` or a built `keras.Sequential`.
        accumulate: `"epoch"`, an int >= 1, a schedule or `"auto"`, as in
            `AccumulatingModel`. Defaults to `"epoch"`.
        reduction: `"mean"` or `"sum"`, as in `AccumulatingModel`. Defaults
            to `"mean"`.
        **kwargs: Other `AccumulatingModel` arguments: `loss_normalisation`,
            `on_nonfinite`, `micro_batch_size`, `memory_limit`,
            `noise_scale`.

    Returns:
        An `AccumulatingModel`.

    Raises:
        TypeError: if `model` is not a Keras model, or has no functional graph
            (subclass `AccumulatingModel` instead), or for a keyword argument
            `AccumulatingModel` does not take.
        ValueError: if `model` already accumulates gradients, or for a bad
            `accumulate` or `reduction`.

    Example:

    >>> inputs = keras.Input((3,))
    >>> base = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    >>> model = wrap(base, accumulate=8)
    >>> model.weights[0] is base.weights[0]
    True
    """
    validation.reject_unknown_arguments(
        kwargs, ACCUMULATION_ARGUMENTS, "wrap()"
    )
    if isinstance(model, AccumulatingModel):
        raise ValueError(
            "`model` already accumulates gradients "
            f"(accumulate={model.accumulate!r}); wrap the original model "
            "instead. Received: model of type AccumulatingModel"
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a functional `keras.Model` or a built "
            f"`keras.Sequential`. Received: model of type "
            f"{type(model).__name__}"
        )
    graph = (
        compat_functional.sequential_graph(model)
        if isinstance(model, keras.Sequential)
        else model
    )
    if not isinstance(graph, compat_functional.Functional):
        raise TypeError(
            "`wrap()` needs a functional `keras.Model` or a `keras.Sequential` "
            "built with a known input shape; for a subclassed model, subclass "
            f"`AccumulatingModel` instead. Received: model of type "
            f"{type(model).__name__}"
        )
    inputs, outputs = compat_functional.graph_structure(graph)
    return FunctionalAccumulatingModel(
        inputs,
        outputs,
        name=model.name,
        accumulate=accumulate,
        reduction=reduction,
        **kwargs,
    )
