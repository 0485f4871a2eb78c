"""`AccumulatingModel`: exact gradient accumulation inside `model.fit`."""

import collections
import inspect
import warnings

import keras
import tensorflow as tf

from keras_accum import _keras_internals
from keras_accum import custom_steps
from keras_accum import distribute_utils
from keras_accum import loss_scale
from keras_accum import objectives
from keras_accum import validation
from keras_accum import window_loss
from keras_accum._keras_internals import Functional
from keras_accum._keras_internals import functional_init_arguments
from keras_accum.accumulators import GradientAccumulator
from keras_accum.flush_callback import ApplyAccumulatedGradients
from keras_accum.loss_normalisers import record_loss_normalisers
from keras_accum.window_schedule import WindowSchedule
from keras_accum.window_schedule import accumulate_from_config

# Position of `callbacks` in `keras.Model.fit(x, y, batch_size, epochs,
# verbose, callbacks, ...)`.
_FIT_CALLBACKS_POSITION = 5
_FIT_SIGNATURE = inspect.signature(keras.Model.fit)


@keras.saving.register_keras_serializable(package="keras_accum")
class AccumulatingModel(keras.Model):
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
        **kwargs: Passed to `keras.Model`.

    Raises:
        TypeError: if `accumulate` is neither `"epoch"` nor an int.
        ValueError: if `accumulate` is an int < 1 or another string, if
            `reduction` is not `"mean"` or `"sum"`, or if Keras does not use
            the TensorFlow backend.

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
        **kwargs,
    ):
        validation.require_tensorflow_backend("AccumulatingModel")
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
        super().__init__(*args, **kwargs)
        self._schedule = schedule
        self._reduction = reduction
        self._loss_normalisation = loss_normalisation
        self._on_nonfinite = on_nonfinite
        self._accumulator = GradientAccumulator()
        # The window of the current epoch (`None`: epoch 0's, resolved when
        # needed), kept in Python so that accumulators built later (on a
        # subclassed model's first trace) start with it.
        self._epoch_window = None
        # How the window's sums are turned into the applied gradient;
        # decided when the step is traced.
        self._window_plan = WindowPlan()
        self._functions = _StepFunctions()

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
    def mini_step(self):
        """Mini-batches accumulated in the current window (0 before `fit`)."""
        if not self._accumulator.built:
            return 0
        return int(self._accumulator.mini_step.numpy())

    @property
    def skipped_micro_batches(self):
        """Micro-batches whose non-finite gradients were not accumulated.

        Counted under `on_nonfinite="skip"`, since the start of `fit`.
        """
        if not self._accumulator.built:
            return 0
        return int(self._accumulator.skipped.numpy())

    @property
    def discarded_windows(self):
        """Windows not applied because their gradient was not finite.

        Counted since the start of `fit`; under `on_nonfinite="raise"`, `fit`
        raises at the first one.
        """
        if not self._accumulator.built:
            return 0
        return int(self._accumulator.discarded.numpy())

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "accumulate": self._schedule.get_config(),
                "reduction": self._reduction,
                "loss_normalisation": self._loss_normalisation,
                "on_nonfinite": self._on_nonfinite,
            }
        )
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
        _keras_internals.check_activity_regularisation(
            self, self._schedule.value != 1, self._reduction
        )
        callbacks = _with_flush_callback(callbacks)
        if len(args) > _FIT_CALLBACKS_POSITION:
            args = list(args)
            args[_FIT_CALLBACKS_POSITION] = callbacks
        else:
            kwargs["callbacks"] = callbacks
        return super().fit(*args, **kwargs)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        # Under a strategy the model and optimizer are built before the
        # train function is traced; create the accumulators eagerly then.
        if (
            self._accumulates_in_step()
            and getattr(self, "optimizer", None) is not None
            and self._all_layers_built()
        ):
            with self.distribute_strategy.scope():
                self._sync_accumulation_state()
        functions = self._functions
        functions.xla_micro_step = functions.xla_window_update = None
        if not self._compiles_step_and_window_apart():
            return super().make_train_function(force=force)
        # Compiled whole, the step's XLA cluster would hold the `tf.cond`
        # that applies the window, and an XLA conditional passes every
        # variable either branch writes through the cluster: each micro-step
        # would copy the weights, the optimizer slots and the accumulators.
        # Instead the micro-step and the window update are two XLA functions,
        # with the condition between them in the ordinary graph.
        functions.xla_micro_step = tf.function(
            self._micro_step, jit_compile=True, reduce_retracing=True
        )
        functions.xla_window_update = tf.function(
            self._apply_local_sums, jit_compile=True
        )
        jit_compile = self._jit_compile
        self._jit_compile = False
        try:
            return super().make_train_function(force=force)
        finally:
            self._jit_compile = jit_compile

    def _compiles_step_and_window_apart(self):
        """Whether the step runs as two XLA functions (`jit_compile` on one
        device; under a strategy Keras decides as for `keras.Model`)."""
        return (
            bool(self.jit_compile)
            and not self.run_eagerly
            and self._schedule.value != 1
            and not custom_steps.overrides_train_step(self)
            and self._distribute_strategy is None
            and not tf.distribute.has_strategy()
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras learns input shapes by reducing a distributed batch across
        # replicas, which fails under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585); one replica's batch has the same shapes.
        strategy = self._distribute_strategy
        if (
            iterator is not None
            and strategy is not None
            and distribute_utils.is_multi_worker(strategy)
        ):
            for _, _, batches in iterator:
                data_batch = distribute_utils.first_local_batch(
                    strategy, next(batches)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(
            iterator=iterator, data_batch=data_batch
        )

    def _all_layers_built(self):
        return all(
            layer.built for layer in _keras_internals.all_layers(self)
        )

    def _accumulates_in_step(self):
        """Whether the train step accumulates (not plain Keras training)."""
        return self._schedule.value != 1 or custom_steps.overrides_train_step(
            self
        )

    def _loss_terms(self):
        """Number of separately normalised loss terms, `None` until the
        compiled loss is built (see `objectives.loss_terms`)."""
        if getattr(self, "_compile_loss", None) is None:
            return 1
        return objectives.loss_terms(
            self._loss_normalisation, _keras_internals.compiled_losses(self)
        )

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
            and tf.inside_function()
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
        with tf.init_scope():  # Reads the count eagerly, even in a trace.
            pending = self.mini_step
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

    @custom_steps.own_step
    def train_step(self, data):
        if self._schedule.value == 1:
            return super().train_step(data)
        custom_steps.count_accumulation(self)
        if self._functions.xla_micro_step is not None:
            logs = self._functions.xla_micro_step(data)
        else:
            logs = self._micro_step(data)
        if self._schedule.value != validation.EPOCH:
            self._apply_window_when(self._window_is_full, self._window_plan)
        return logs

    def _micro_step(self, data):
        """Forward, backward and accumulation of one mini-batch: the step
        without the window's update. Returns the logs."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(
            next(i for i in tf.nest.flatten(x) if i is not None)
        )[0]
        # Several loss terms take one backward pass each; `None` (loss
        # not built yet) may turn out to be several.
        per_loss = self._loss_terms() != 1

        with tf.GradientTape(persistent=per_loss) as tape:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            with record_loss_normalisers() as terms:
                loss = _keras_internals.compute_loss(
                    self,
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
            # After the forward pass and the loss, which build a subclassed
            # model's layers and the compiled loss on the first trace.
            self._sync_accumulation_state()
            first_in_window = self._accumulator.mini_step.value == 0
            contribution = self._micro_batch_contribution(
                terms, loss, batch_size, first_in_window
            )
            logged_loss = _keras_internals.unscale_loss_for_distribution(loss)
            skip = self._on_nonfinite == "skip"
            if not skip:
                window_loss.log_micro_batch(
                    _keras_internals.loss_tracker(self), logged_loss,
                    contribution, first_in_window,
                )
            dynamic_scaling = loss_scale.is_dynamic(self.optimizer)
            if dynamic_scaling:
                # The normaliser multiplies the gradient, not the loss, so
                # the scaled loss stays in the float16 range.
                objectives_to_differentiate = contribution.objectives
                gradient_scales = contribution.gradient_scales
            else:
                # Weighting the loss costs one scalar multiply; weighting the
                # gradients would cost a pass over every gradient per step.
                objectives_to_differentiate = [
                    objective * scale
                    for objective, scale in zip(
                        contribution.objectives, contribution.gradient_scales
                    )
                ]
                gradient_scales = None
            scaled = [
                self.optimizer.scale_loss(o)
                for o in objectives_to_differentiate
            ]

        term_gradients = [
            tape.gradient(objective, self._accumulator.variables)
            for objective in scaled
        ]
        del tape
        kept = self._accumulate(
            term_gradients,
            contribution,
            weighted=gradient_scales is None,
            loss_is_finite=tf.math.is_finite(logged_loss),
        )
        if skip:
            # A skipped micro-batch is left out of the logged loss too, on
            # every replica.
            window_loss.log_micro_batch(
                _keras_internals.loss_tracker(self), logged_loss,
                contribution, first_in_window, kept=kept,
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if distribute_utils.is_multi_worker(self.distribute_strategy):
            logs = distribute_utils.rank_one_logs(logs)
        return logs

    def _accumulate(self, term_gradients, contribution, weighted,
                    loss_is_finite=True):
        """Adds one micro-batch's gradients to the window.

        Args:
            term_gradients: One list of gradients per loss term, aligned
                with the accumulated variables.
            contribution: The micro-batch's `MicroBatchContribution`.
            weighted: Whether the gradients already carry the
                contribution's `gradient_scales` (the loss was weighted).
            loss_is_finite: Scalar bool, whether the micro-batch's loss is
                finite (checked with its gradients on the per-micro-batch
                path).

        Returns:
            Scalar bool, whether the micro-batch was added (always true on
            the lean path, where the window is checked instead).
        """
        self._window_plan = WindowPlan(
            contribution.divides, gradient_exists(term_gradients)
        )
        scales = None if weighted else contribution.gradient_scales
        if (
            loss_scale.is_dynamic(self.optimizer)
            or self._on_nonfinite == "skip"
        ):
            return self._accumulate_if_finite(
                term_gradients, scales, contribution.normalisers,
                tf.convert_to_tensor(loss_is_finite),
            )
        if scales is not None:
            term_gradients = [
                [_scale_gradient(g, scale, tf.multiply) for g in gradients]
                for gradients, scale in zip(term_gradients, scales)
            ]
        # The lean step: one add per weight. A non-finite gradient reaches
        # the sums, and the window is checked (once) before it is applied.
        self._accumulator.add(term_gradients, contribution.normalisers)
        self._accumulator.count_micro_batch()
        return tf.constant(True)

    def _micro_batch_contribution(self, terms, loss, batch_size, first_in_window):
        """What this micro-batch adds to the window (see `objectives`)."""
        if len(self._accumulator.gradients) > 1:
            contribute = objectives.per_loss_contribution
        else:
            contribute = objectives.shared_contribution
        return contribute(self, terms, loss, batch_size, first_in_window)

    def _window_is_full(self):
        accumulator = self._accumulator
        if self._schedule.is_static:
            return accumulator.mini_step.value >= self._schedule.value
        window = accumulator.window.value
        return tf.logical_and(window > 0, accumulator.mini_step.value >= window)

    def _accumulate_if_finite(self, term_gradients, scales, normalisers,
                              loss_is_finite):
        """Adds the micro-batch, unless one of its gradients is not finite.

        The per-micro-batch check, used under dynamic loss scaling and with
        `on_nonfinite="skip"`. A non-finite micro-batch gets a factor of zero
        through `multiply_no_nan`, which zeroes NaN and infinite entries too,
        so it never reaches the accumulators (cheaper than a `tf.cond`
        around the update on CPU). Under loss scaling the factor also holds
        the term's scale (normaliser and replica count, see `objectives`)
        divided by the loss scale, and a non-finite micro-batch lowers the
        scale, as `LossScaleOptimizer` does for a step; otherwise it is
        counted in `skipped`.

        Under a strategy the micro-batch is the global one: it is skipped on
        every replica when any replica's shard is not finite (one scalar
        all-reduce, on this path only), as on one device.

        Args:
            term_gradients: One list of gradients per loss term.
            scales: One scalar per loss term to multiply its gradients by,
                or `None` when the loss was already weighted.
            normalisers: Vector of each term's normaliser for this batch.
            loss_is_finite: Scalar bool, whether this shard's loss is.

        Returns:
            Scalar bool: whether the micro-batch was added.
        """
        flat = [
            g.values if isinstance(g, tf.IndexedSlices) else g
            for gradients in term_gradients
            for g in gradients
            if g is not None
        ] + [normalisers]
        # A sum is finite iff every element is (barring overflow of the sum).
        total = tf.add_n([tf.cast(tf.reduce_sum(g), tf.float32) for g in flat])
        finite = _on_every_replica(
            tf.logical_and(tf.math.is_finite(total), loss_is_finite)
        )
        keep = tf.cast(finite, normalisers.dtype)
        loss_scale_value = getattr(self.optimizer, "dynamic_scale", None)
        if scales is None:
            scales = [tf.ones((), normalisers.dtype)] * len(term_gradients)

        def factor(scale):
            scale = tf.cast(scale, keep.dtype)
            if loss_scale_value is not None:
                return keep * scale / tf.cast(loss_scale_value, keep.dtype)
            return keep * scale

        accumulator = self._accumulator
        accumulator.add(
            [
                [
                    _scale_gradient(g, term_factor, tf.math.multiply_no_nan)
                    for g in gradients
                ]
                for gradients, term_factor in zip(
                    term_gradients, [factor(scale) for scale in scales]
                )
            ],
            tf.math.multiply_no_nan(normalisers, keep),
        )
        # A skipped micro-batch still takes its place in the window, so
        # windows keep their positions in the epoch.
        accumulator.count_micro_batch()
        if loss_scale.is_dynamic(self.optimizer):
            # Under loss scaling an overflow is expected: the scale drops
            # and training goes on, as with `LossScaleOptimizer`.
            loss_scale.update_dynamic_scale(self.optimizer, finite)
        else:
            accumulator.skipped.value.assign_add(
                1 - tf.cast(finite, tf.int64), read_value=False
            )
        return finite

    def _apply_window_when(self, condition, plan):
        """Applies the window if `condition()` holds (call in replica context).

        Strategies that use merge calls (`MirroredStrategy`) may not merge
        inside a `tf.cond` branch, so the merge call runs unconditionally and
        the condition is checked in cross-replica context, where the window
        is applied through `strategy.run`. Other strategies (multi-worker,
        TPU, the default one) apply directly in replica context.

        A window whose gradient sum is not finite on some replica is
        discarded on every replica instead: when the window is full, the
        first `tf.cond` reduces its totals, and the next two apply or
        discard it.

        Args:
            condition: Callable returning a scalar bool tensor.
            plan: The `WindowPlan` traced with the step.
        """

        def apply_if(strategy):
            full = condition()
            terms = len(self._accumulator.gradients)
            totals = tf.cond(
                full,
                lambda: self._window_totals(strategy),
                lambda: tf.zeros(
                    (terms + 1,), self._accumulator.normalisers.dtype
                ),
            )
            normalisers, finite = totals[:-1], tf.equal(totals[-1], 0)
            tf.cond(
                tf.logical_and(full, finite),
                lambda: self._apply_window(strategy, normalisers, plan),
                lambda: tf.no_op(),
            )
            tf.cond(
                tf.logical_and(full, tf.logical_not(finite)),
                lambda: _run_in_replicas(strategy, self._accumulator.discard),
                lambda: tf.no_op(),
            )

        tf.__internal__.distribute.interim.maybe_merge_call(
            apply_if, tf.distribute.get_strategy()
        )

    def _window_totals(self, strategy):
        """The window's normalisers and count of non-finite replicas.

        One scalar reduction besides the optimizer's all-reduce of the
        gradients: each replica's normaliser sums, with a flag saying
        whether its gradient sums and normalisers are all finite, so every
        replica takes the same decision.

        Returns:
            A vector: each term's global normaliser, then the number of
            replicas whose gradient sums are not finite.
        """

        def local_totals():
            accumulator = self._accumulator
            normalisers = tf.convert_to_tensor(accumulator.normalisers.value)
            # Everything that enters the update: the gradient sums and the
            # normalisers they are divided by.
            nonfinite = tf.logical_not(
                tf.logical_and(
                    accumulator.local_sums_are_finite(),
                    tf.reduce_all(tf.math.is_finite(normalisers)),
                )
            )
            return tf.concat(
                [normalisers, tf.cast(nonfinite, normalisers.dtype)[None]],
                axis=0,
            )

        if tf.distribute.in_cross_replica_context():
            return strategy.reduce(
                tf.distribute.ReduceOp.SUM, strategy.run(local_totals),
                axis=None,
            )
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, local_totals()
        )

    def _apply_window(self, strategy, normalisers, plan):
        """Normalises the window's sums and applies them (see
        `_apply_local_sums`), as one XLA function under `jit_compile`."""
        update = self._functions.xla_window_update
        if update is not None:
            update(normalisers, plan)
            return tf.no_op()
        return _run_in_replicas(
            strategy, self._apply_local_sums, normalisers, plan
        )

    def _apply_local_sums(self, normalisers, plan):
        """Applies this replica's sums; the optimizer all-reduces them.

        Replica context. Each replica passes its local gradient sums divided
        by the global normalisers; the optimizer's `SUM` all-reduce of those
        is the window's gradient: one all-reduce per update. A variable that
        got no gradient in the step is passed with `None`, as plain Keras
        passes it, so the optimizer leaves it alone (no weight decay, no
        momentum).
        """
        accumulator = self._accumulator
        gradients = None
        for term, accumulators in enumerate(accumulator.gradients):
            term_gradients = [tf.convert_to_tensor(a.value) for a in accumulators]
            if plan.divides[term]:
                term_gradients = [
                    tf.math.divide_no_nan(g, tf.cast(normalisers[term], g.dtype))
                    for g in term_gradients
                ]
            gradients = (
                term_gradients
                if gradients is None
                else [a + b for a, b in zip(gradients, term_gradients)]
            )
        exists = plan.gradient_exists or (True,) * len(gradients)
        gradients = [g if e else None for g, e in zip(gradients, exists)]
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        optimizer.apply(gradients, accumulator.variables)
        accumulator.reset()

    def accumulate_gradients(self, gradients, normaliser):
        """Adds one mini-batch's gradients to the window, from a custom step.

        For subclasses that override `train_step`: call it instead of
        `optimizer.apply`. The gradients are added to the accumulators,
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
        custom_steps.count_accumulation(self)
        self._sync_accumulation_state()
        accumulator = self._accumulator
        if len(gradients) != len(accumulator.variables):
            raise ValueError(
                "`gradients` must have one entry per trainable variable "
                f"({len(accumulator.variables)}), in the order of "
                "`model.trainable_variables`. Received: "
                f"{len(gradients)} gradients"
            )
        dtype = accumulator.normalisers.dtype
        normaliser = tf.cast(normaliser, dtype)
        terms = len(accumulator.gradients)
        contribution = objectives.MicroBatchContribution(
            objectives=None,
            gradient_scales=[
                objectives.replica_scale(normaliser)
            ] + [tf.zeros((), dtype)] * (terms - 1),
            normalisers=tf.concat(
                [normaliser[None], tf.zeros((terms - 1,), dtype)], axis=0
            ),
            divides=(True,) + (False,) * (terms - 1),
            logging_weight=normaliser,
        )
        term_gradients = [list(gradients)] + [
            [None] * len(gradients)
        ] * (terms - 1)
        self._accumulate(term_gradients, contribution, weighted=False)
        if self._schedule.value != validation.EPOCH:
            self._apply_window_when(self._window_is_full, self._window_plan)

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
        accumulator = self._accumulator
        if self._functions.apply is None:

            # No AutoGraph: the body is already graph code (explicit
            # `tf.cond`), and converting the closure only logs a warning.
            @tf.function(autograph=False)
            def apply_function(plan):
                self.distribute_strategy.run(
                    self._apply_window_when,
                    args=(lambda: accumulator.mini_step.value > 0, plan),
                )

            self._functions.apply = apply_function
        self._functions.apply(self._window_plan)

    def reset_accumulated_gradients(self):
        """Discards the gradient accumulated in the current window.

        Raises:
            RuntimeError: if the model was not compiled or never trained.
        """
        self._require_accumulators("reset_accumulated_gradients")
        with self.distribute_strategy.scope():
            self._accumulator.reset()

    def _require_accumulators(self, method):
        if getattr(self, "optimizer", None) is None:
            raise RuntimeError(
                f"`{method}()` needs a compiled model: call `compile()` "
                "first."
            )
        if not self._accumulator.built:
            if self._all_layers_built():
                with self.distribute_strategy.scope():
                    self._sync_accumulation_state()
            if not self._accumulator.built:
                raise RuntimeError(
                    f"`{method}()` needs a model that has trained: call "
                    "`fit()` or `train_on_batch()` first."
                )


class WindowPlan(collections.namedtuple(
    "WindowPlan", ["divides", "gradient_exists"], defaults=[(True,), None]
)):
    """How a window's sums become the applied gradient; static per trace.

    A namedtuple of Python bools, so a `tf.function` taking it retraces
    only when it changes.

    Attributes:
        divides: Per loss term, whether its window sum is divided by its
            summed normaliser.
        gradient_exists: Per accumulated variable, whether the step gives
            it a gradient (`None`: all do). Those without one are passed to
            the optimizer as `None`, as plain Keras does.
    """

    __slots__ = ()


def gradient_exists(term_gradients):
    """Per variable, whether some loss term gave it a gradient."""
    return tuple(
        any(gradients[i] is not None for gradients in term_gradients)
        for i in range(len(term_gradients[0]))
    )


def _scale_gradient(gradient, factor, multiply):
    """`multiply(gradient, factor)` for dense and sparse gradients."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            multiply(gradient.values, tf.cast(factor, gradient.values.dtype)),
            gradient.indices,
            gradient.dense_shape,
        )
    return multiply(gradient, tf.cast(factor, gradient.dtype))


def _on_every_replica(finite):
    """Whether `finite` holds on every replica (replica context).

    One scalar all-reduce under a strategy with several replicas; none on
    one device.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    failures = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.cast(tf.logical_not(finite), tf.float32),
    )
    return tf.equal(failures, 0.0)


def _run_in_replicas(strategy, function, *args):
    """Runs `function` in every replica, from either context."""
    if tf.distribute.in_cross_replica_context():
        strategy.run(function, args=args)
    else:
        function(*args)
    return tf.no_op()


class _StepFunctions:
    """The model's own `tf.function`s, kept off the model so that neither
    Keras nor SavedModel export tracks them.

    Attributes:
        apply: The traced epoch-end apply (`apply_accumulated_gradients`).
        xla_micro_step: Under `jit_compile` on one device, the XLA-compiled
            micro-step (see `make_train_function`), else `None`.
        xla_window_update: Likewise, the XLA-compiled window update.
        accumulations: Mini-batches accumulated by traced steps (a Python
            count, incremented at trace time; see `custom_steps`).
    """

    def __init__(self):
        self.apply = None
        self.xla_micro_step = None
        self.xla_window_update = None
        self.accumulations = 0


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
        super().__init__(*args, **kwargs)


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
            `on_nonfinite`.

    Returns:
        An `AccumulatingModel`.

    Raises:
        TypeError: if `model` is not a Keras model, or has no functional graph
            (subclass `AccumulatingModel` instead).
        ValueError: if `model` already accumulates gradients, or for a bad
            `accumulate` or `reduction`.

    Example:

    >>> inputs = keras.Input((3,))
    >>> base = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    >>> model = wrap(base, accumulate=8)
    >>> model.weights[0] is base.weights[0]
    True
    """
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
