"""`AccumulatingModel`: exact gradient accumulation inside `model.fit`."""

import inspect
import warnings

import keras

from keras_accum import _keras_internals
from keras_accum import custom_steps
from keras_accum import loss_attribution
from keras_accum import loss_normalisers
from keras_accum import micro_batches
from keras_accum import objectives
from keras_accum import validation
from keras_accum import window_loss
from keras_accum._keras_internals import Functional
from keras_accum._keras_internals import functional_init_arguments
from keras_accum.backend import AccumulationTrainer
from keras_accum.flush_callback import ApplyAccumulatedGradients
from keras_accum.window_plan import WindowPlan
from keras_accum.window_schedule import WindowSchedule
from keras_accum.window_schedule import accumulate_from_config

# Position of `callbacks` in `keras.Model.fit(x, y, batch_size, epochs,
# verbose, callbacks, ...)`.
_FIT_CALLBACKS_POSITION = 5
_FIT_SIGNATURE = inspect.signature(keras.Model.fit)


@keras.saving.register_keras_serializable(package="keras_accum")
class AccumulatingModel(AccumulationTrainer, keras.Model):
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
    TensorFlow (`tf.distribute` strategies) or JAX (`keras.distribution`),
    with the same semantics.

    Use it like `keras.Model`: functionally,
    `AccumulatingModel(inputs, outputs, accumulate=4)`, or as a base class
    whose `__init__` passes `**kwargs` to `super().__init__`.

    Args:
        accumulate: `"epoch"` for one update per epoch, or an int >= 1 for an
            update every `accumulate` mini-batches. `1` trains exactly like
            `keras.Model`. Defaults to `"epoch"`.
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
        **kwargs: Passed to `keras.Model`.

    Raises:
        TypeError: if `accumulate` is neither `"epoch"` nor an int, or for
            a keyword argument that neither `AccumulatingModel` nor
            `keras.Model` takes (functional Keras models ignore those).
        ValueError: if `accumulate` is an int < 1 or another string, if
            `reduction` is not `"mean"` or `"sum"`, for a bad
            `micro_batch_size` or `memory_limit`, or if Keras runs on a
            backend other than TensorFlow or JAX.

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
        if cls is AccumulatingModel and functional_init_arguments(args, kwargs):
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
        **kwargs,
    ):
        validation.require_supported_backend("AccumulatingModel")
        micro_batches.validate(micro_batch_size, memory_limit)
        schedule = WindowSchedule(accumulate)
        validation.validate_reduction(reduction)
        validation.validate_choice(
            loss_normalisation, "loss_normalisation",
            objectives.LOSS_NORMALISATIONS,
        )
        validation.validate_choice(
            on_nonfinite, "on_nonfinite", validation.NONFINITE_POLICIES
        )
        if functional_init_arguments(args, kwargs) and not isinstance(
            self, Functional
        ):
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
                "AccumulatingModel" if isinstance(self, Functional)
                else type(self).__name__,
            )
        super().__init__(*args, **kwargs)
        self._schedule = schedule
        self._reduction = reduction
        self._loss_normalisation = loss_normalisation
        self._on_nonfinite = on_nonfinite
        self._micro_batch_size = micro_batch_size
        self._memory_limit = memory_limit
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
        self._functions = _StepFunctions()

    def _keras_keywords(self, args, kwargs):
        """The keyword arguments `keras.Model.__init__` takes here.

        `None` where they cannot be known: a base class between
        `AccumulatingModel` and `keras.Model` has its own `__init__`.
        """
        if functional_init_arguments(args, kwargs):
            return _keras_internals.FUNCTIONAL_KEYWORDS
        following = super(AccumulatingModel, self).__init__
        if getattr(following, "__func__", None) is not keras.Model.__init__:
            return None
        return _keras_internals.layer_keywords()

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

    @property
    def mini_step(self):
        """Mini-batches accumulated in the current window (0 before `fit`)."""
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.mini_step)

    @property
    def skipped_micro_batches(self):
        """Micro-batches whose non-finite gradients were not accumulated.

        Counted under `on_nonfinite="skip"`, since the start of `fit`.
        """
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.skipped)

    @property
    def discarded_windows(self):
        """Windows not applied because their gradient was not finite.

        Counted since the start of `fit`; under `on_nonfinite="raise"`, `fit`
        raises at the first one.
        """
        if not self._accumulator.built:
            return 0
        return self._read_counter(self._accumulator.discarded)

    def _discarded_windows_later(self):
        """`discarded_windows` as a value that `int()` reads later.

        Taking it does not wait for the device (on JAX, a copy of the count
        in the running state, which the next step consumes); reading it
        waits only for the steps run so far.
        """
        if not self._accumulator.built:
            return 0
        return self._counter_value(self._accumulator.discarded)

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
        _keras_internals.set_loss_tracker(self, window_loss.WindowLoss())
        self._functions = _StepFunctions()

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

    def _all_layers_built(self):
        return all(
            layer.built for layer in _keras_internals.all_layers(self)
        )

    def _ready_to_accumulate(self):
        """Whether the accumulators can be built now: the step accumulates,
        and the model and its optimizer exist."""
        return (
            self._accumulates_in_step()
            and getattr(self, "optimizer", None) is not None
            and self._all_layers_built()
        )

    def _accumulates_in_step(self):
        """Whether the train step accumulates (not plain Keras training)."""
        return (
            not self._trains_as_keras()
            or custom_steps.overrides_train_step(self)
        )

    def _trains_as_keras(self):
        """Whether the step is plain `keras.Model`'s: `accumulate=1` on one
        replica. Under a strategy with several replicas plain Keras
        normalises each replica's loss by its own shard (masks, sample
        weights), clips each replica's gradient and keeps float32(1 /
        replicas); a window of one batch is the single-device update."""
        return (
            self._schedule.value == 1
            and self._replicas() == 1
            and self._micro_batch_size is None
        )

    def _loss_terms(self):
        """Number of accumulator sets, `None` while unknown: the Keras loss
        terms' sets (see `objectives.term_sets`), and one for the activity
        penalties (see `_activity_set`).

        The Keras loss terms of a step are those the traced step records
        (`_StepFunctions.terms`), or, before, the compiled ones when the
        model keeps Keras' `compute_loss`; a custom `compute_loss` is known
        once traced (on JAX, symbolically before the step is compiled, see
        `_discover_loss_terms`).
        """
        terms = self._functions.terms
        if terms is None and not loss_attribution.overrides_compute_loss(
            self
        ):
            if getattr(self, "_compile_loss", None) is None:
                terms = 0
            else:
                compiled = _keras_internals.compiled_losses(self)
                terms = None if compiled is None else len(compiled)
        sets = objectives.term_sets(
            self._loss_normalisation, self._reduction, terms
        )
        if sets is None:
            return None
        return sets + int(self._activity_set())

    def _activity_set(self):
        """Whether the activity penalties have an accumulator set of their
        own, normalised as the installed Keras normalises them.

        With `reduction="sum"` the whole loss is summed over the window
        already. (A custom TensorFlow step that calls
        `accumulate_gradients` weights its own gradients and leaves the
        set empty.)
        """
        return self._reduction == "mean" and bool(
            _keras_internals.activity_regularised_layers(self)
        )

    def _aggregate_additional_loss(self, loss):
        # Keras' `compute_loss` adds each `model.losses` entry through this
        # (scaled by 1 / replicas on TensorFlow); a custom one may add them
        # as they are. `loss_attribution` tells the two apart.
        loss_normalisers.note_aggregated(loss)
        return super()._aggregate_additional_loss(loss)

    def _note_loss_terms(self, recorded):
        """Keeps the number of Keras loss terms a traced step computes."""
        self._functions.terms = len(recorded.known_terms)

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds the model on a symbolic batch before the step is
        # compiled; the Keras loss terms are counted on it too, so that a
        # step compiled whole (JAX) finds its accumulators built.
        if (
            data_batch is None
            and iterator is not None
            and self._reduction == "mean"
            and self._functions.terms is None
        ):
            # As Keras takes its batch; `fit` resets the iterator after.
            data_batch = _keras_internals.first_batch(iterator)
            iterator = None
        super()._symbolic_build(iterator=iterator, data_batch=data_batch)
        if data_batch is not None:
            self._discover_loss_terms(data_batch)

    def _discover_loss_terms(self, data_batch):
        """Counts the Keras loss terms of a step symbolically, on a batch
        like `data_batch`, before any step is traced (see `_loss_terms`)."""
        if self._reduction != "mean" or self._functions.terms is not None:
            return
        if getattr(self, "optimizer", None) is None:
            return

        def loss_terms(x, y, sample_weight):
            with loss_normalisers.record_loss_normalisers(self) as recorded:
                y_pred = self(x, training=True)
                loss = _keras_internals.compute_loss(
                    self, x=x, y=y, y_pred=y_pred,
                    sample_weight=sample_weight, training=True,
                )
            self._note_loss_terms(recorded)
            return loss

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            keras.tree.map_structure(_symbolic, data_batch)
        )
        try:
            _keras_internals.compute_output_spec(
                loss_terms, x, y, sample_weight
            )
        except Exception:  # noqa: BLE001
            # A model that cannot run symbolically: its traced step counts
            # the terms instead (and refuses what it must).
            self._functions.terms = None

    def _sync_accumulation_state(self):
        """Makes the accumulators match the current trainable variables.

        Called eagerly by `make_train_function` and again in the traced
        step: without a strategy Keras builds the model and the compiled
        loss on the step's first trace, and the accumulators follow. The
        accumulators are keyed by the identity of the variables they were
        built for; when the trainable set changed (layers frozen or
        unfrozen, then `compile()` again) they are rebuilt, so a gradient
        can never be paired with another variable's accumulator.

        Raises:
            ValueError: if the model has no trainable weights, or if the
                trainable weights changed without a new `compile()` (the
                accumulators cannot be rebuilt inside a traced step).
        """
        trainable_variables = self.trainable_variables
        if not trainable_variables:
            raise ValueError(
                "`AccumulatingModel` accumulates the gradients of trainable "
                "weights, and this model has none (all layers frozen or no "
                "weights). Received: model with 0 trainable weights"
            )
        terms = self._loss_terms()
        if terms is None:
            return  # Built on the first trace, once the loss is built.
        window_loss.build_for(_keras_internals.loss_tracker(self), terms)
        accumulator = self._accumulator
        if accumulator.matches(trainable_variables, terms):
            return
        if (
            accumulator.built
            and self._inside_traced_step()
            and self._functions.accumulations > 1
        ):
            # Variables may be created on a step's first trace only (as
            # Keras builds its optimizer there); a retrace that finds the
            # trainable set changed comes from `trainable` set without a
            # new `compile()`.
            raise ValueError(
                "The model's trainable weights changed since `compile()` "
                f"({len(accumulator.variables)} accumulated, "
                f"{len(trainable_variables)} trainable now). Call "
                "`compile()` again after setting `trainable`, as Keras "
                "requires. Received: a changed set of trainable weights"
            )
        pending = self._pending_mini_batches()
        if pending:
            warnings.warn(
                f"The trainable weights changed with {pending} "
                "mini-batch(es) accumulated and not applied; they were "
                "discarded. Call `apply_accumulated_gradients()` before "
                "changing `trainable` to keep them.",
                stacklevel=3,
            )
        if not self.optimizer.built:
            self.optimizer.build(trainable_variables)
        normaliser_dtype = (
            "float64" if keras.backend.floatx() == "float64" else "float32"
        )
        accumulator.build(
            trainable_variables,
            normaliser_dtype,
            terms=terms,
            window=(
                self._schedule.window_size(0)
                if self._epoch_window is None
                else self._epoch_window
            ),
        )

    def _begin_epoch(self, epoch):
        """Sets the window of `epoch` (called by the flush callback)."""
        self._epoch_window = self._schedule.window_size(epoch)
        if not self._schedule.is_static and self._accumulator.built:
            self._accumulator.window.assign(self._epoch_window)

    def _micro_batch_contribution(self, recorded, loss, batch_size,
                                  first_in_window, probe):
        """What this micro-batch adds to the window, by the rule of
        `objectives` (refusing a loss it cannot normalise).

        Args:
            recorded: The step's `loss_normalisers.StepLosses`.
            loss: The step's loss.
            batch_size: The micro-batch's examples.
            first_in_window: Scalar bool, whether it starts a window.
            probe: The backend's analysis of the loss, for
                `loss_attribution.attribute`.
        """
        objectives.check_step_losses(self, recorded, loss)
        activity_set = self._activity_set()
        sets = len(self._accumulator.gradients) - int(activity_set)
        coefficients = None
        if self._reduction == "mean":
            coefficients = loss_attribution.attribute(self, recorded, probe)
            terms = len(recorded.known_terms)
            if objectives.term_sets(
                self._loss_normalisation, self._reduction, terms
            ) != sets:
                raise ValueError(
                    "The step computes another number of Keras loss terms "
                    f"({terms}) than the accumulators were built for "
                    f"({sets}); call `compile()` again after changing the "
                    "loss. Received: a step with "
                    f"{terms} Keras loss term(s)"
                )
        return objectives.micro_batch_contribution(
            self, recorded, loss, batch_size, first_in_window, coefficients,
            sets, activity_set,
        )

    def accumulate_gradients(self, gradients, normaliser):
        """Adds one mini-batch's gradients to the window, from a custom step.

        For subclasses that override `train_step` on TensorFlow: call it
        instead of `optimizer.apply`. (On JAX, where a step is pure, a
        custom `train_step(self, state, data)` accumulates through
        `super().train_step(state, data)`.) The gradients are added to the accumulators,
        weighted by `normaliser`, and the window is applied as usual (when
        it is full, or at epoch end), divided by the window's summed
        normaliser. The applied gradient is then exactly that of the loss
        over the whole window, as long as each mini-batch's loss is its
        summed loss divided by `normaliser`.

        Args:
            gradients: List of gradients (tensors, `tf.IndexedSlices` or
                `None`), one per variable of `model.trainable_variables`,
                in that order: the gradient of the loss that
                `self.compute_loss` returns for the mini-batch (under a
                strategy, the replica's loss, which Keras scales by
                1/replicas).
            normaliser: Scalar: what the mini-batch's loss was divided by:
                its number of examples, valid (unmasked) entries, or sum of
                sample weights.

        Raises:
            ValueError: if `gradients` does not have one entry per
                trainable variable.
            NotImplementedError: on the JAX backend.

        Example:

        >>> class Custom(AccumulatingModel):
        ...     def train_step(self, data):
        ...         x, y = data
        ...         with tf.GradientTape() as tape:
        ...             y_pred = self(x, training=True)
        ...             loss = self.compute_loss(x, y, y_pred)
        ...         self.accumulate_gradients(
        ...             tape.gradient(loss, self.trainable_variables),
        ...             normaliser=tf.shape(x)[0])
        ...         return self.compute_metrics(x, y, y_pred)
        """
        return self._accumulate_from_custom_step(gradients, normaliser)

    def apply_accumulated_gradients(self):
        """Applies the gradient accumulated so far, if any, and resets.

        `fit` calls this at the end of every epoch through the
        `ApplyAccumulatedGradients` callback; call it yourself when you drive
        training with `train_on_batch`. It does nothing when no mini-batch
        was accumulated since the last update.

        Raises:
            RuntimeError: if the model was not compiled or never trained, so
                there is no accumulated gradient to apply.
        """
        self._require_accumulators("apply_accumulated_gradients")
        self._apply_pending_window()

    def reset_accumulated_gradients(self):
        """Discards the gradient accumulated in the current window.

        Raises:
            RuntimeError: if the model was not compiled or never trained.
        """
        self._require_accumulators("reset_accumulated_gradients")
        self._reset_window()

    def _require_accumulators(self, method):
        if getattr(self, "optimizer", None) is None:
            raise RuntimeError(
                f"`{method}()` needs a compiled model: call `compile()` "
                "first."
            )
        if not self._accumulator.built:
            if self._all_layers_built():
                self._build_accumulators_eagerly()
            if not self._accumulator.built:
                raise RuntimeError(
                    f"`{method}()` needs a model that has trained: call "
                    "`fit()` or `train_on_batch()` first."
                )


#: The keyword arguments `AccumulatingModel` adds to `keras.Model`'s, read
#: from its `__init__`; `get_config` saves each (`_accumulation_arguments`).
ACCUMULATION_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(
        AccumulatingModel.__init__
    ).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


class _StepFunctions:
    """The model's own compiled functions, kept off the model so that
    neither Keras nor SavedModel export tracks them.

    Attributes:
        apply: The compiled epoch-end apply (`apply_accumulated_gradients`).
        xla_batch_step: Under `jit_compile` on one device, the XLA-compiled
            accumulation of a batch (see `make_train_function`), else
            `None`.
        xla_window_update: Likewise, the XLA-compiled window update.
        accumulations: Mini-batches accumulated by traced steps (a Python
            count, incremented at trace time; see `custom_steps`).
        terms: The number of Keras loss terms a step computes, once a
            step was traced or counted (`None` before).
        tracing: Whether a JAX step is being traced (accumulators may not
            be created then).
        purged: On JAX, `(variable, value)` pairs `fit` purged, kept until
            the state is synced back (see the JAX trainer).
        micro_batch_override: On JAX, the micro-batch size a candidate
            step of `micro_batch_size="auto"` is compiled with, else `None`.
        micro_batch_choices: Under `"auto"`, the size chosen per input
            shape.
    """

    def __init__(self):
        self.apply = None
        self.xla_batch_step = None
        self.xla_window_update = None
        self.accumulations = 0
        self.tracing = False
        self.purged = []
        self.terms = None
        self.micro_batch_override = None
        self.micro_batch_choices = {}


@keras.saving.register_keras_serializable(package="keras_accum")
class FunctionalAccumulatingModel(AccumulatingModel, Functional):
    """The functional form of `AccumulatingModel`.

    `AccumulatingModel(inputs, outputs, ...)` returns an instance of this
    class; use `AccumulatingModel` in user code and `isinstance` checks.
    """

    def __new__(cls, *args, **kwargs):
        return Functional.__new__(cls, *args, **kwargs)

    # `(*args, **kwargs)`, not `(inputs, outputs, name=None, **kwargs)`:
    # before Keras 3.15, `Functional.get_config` saves the graph only when
    # `__init__`'s argument list equals the one `getfullargspec` reports for
    # `Functional.__init__`, which its decorator hides (`()`); with named
    # arguments the model saved without its graph and failed to load.
    def __init__(self, *args, **kwargs):
        source = _keras_internals.cloned_model(args, kwargs)
        if isinstance(source, AccumulatingModel):
            # `keras.models.clone_model` passes only inputs, outputs and
            # name; the clone keeps the source's other arguments.
            kwargs = {**source._accumulation_arguments(), **kwargs}
        super().__init__(*args, **kwargs)

    def _run_through_graph(self, *args, **kwargs):
        outputs = super()._run_through_graph(*args, **kwargs)
        # Lets the constructor `clone_model` calls next find this model.
        _keras_internals.record_graph_run(self, outputs)
        return outputs


def _symbolic(value):
    """A `keras.KerasTensor` like `value` (`None` stays `None`)."""
    if value is None:
        return None
    return keras.KerasTensor(
        value.shape, keras.backend.standardize_dtype(value.dtype)
    )


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
        accumulate: `"epoch"` or an int >= 1, as in `AccumulatingModel`.
            Defaults to `"epoch"`.
        reduction: `"mean"` or `"sum"`, as in `AccumulatingModel`. Defaults
            to `"mean"`.
        **kwargs: Other `AccumulatingModel` arguments: `loss_normalisation`,
            `on_nonfinite`, `micro_batch_size`, `memory_limit`.

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
        _keras_internals.sequential_graph(model)
        if isinstance(model, keras.Sequential)
        else model
    )
    if not isinstance(graph, Functional):
        raise TypeError(
            "`wrap()` needs a functional `keras.Model` or a `keras.Sequential` "
            "built with a known input shape; for a subclassed model, subclass "
            f"`AccumulatingModel` instead. Received: model of type "
            f"{type(model).__name__}"
        )
    inputs, outputs = _keras_internals.graph_structure(graph)
    return FunctionalAccumulatingModel(
        inputs,
        outputs,
        name=model.name,
        accumulate=accumulate,
        reduction=reduction,
        **kwargs,
    )
