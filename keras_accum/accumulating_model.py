"""`AccumulatingModel`: exact gradient accumulation inside `model.fit`."""

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

from keras_accum import distribute_utils
from keras_accum import validation
from keras_accum.accumulators import GradientAccumulator
from keras_accum.flush_callback import ApplyAccumulatedGradients
from keras_accum.loss_normalisers import SUM
from keras_accum.loss_normalisers import record_loss_normalisers

# Position of `callbacks` in `keras.Model.fit(x, y, batch_size, epochs,
# verbose, callbacks, ...)`.
_FIT_CALLBACKS_POSITION = 5


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

    def __new__(cls, *args, **kwargs):
        # `keras.Model.__init__` rewrites the bases of a class used
        # functionally, for good; route functional calls to a dedicated
        # subclass so `AccumulatingModel` stays usable as a base class.
        if cls is AccumulatingModel and functional_init_arguments(args, kwargs):
            return keras.Model.__new__(
                FunctionalAccumulatingModel, *args, **kwargs
            )
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, accumulate="epoch", reduction="mean", **kwargs):
        validation.require_tensorflow_backend("AccumulatingModel")
        validation.validate_window(accumulate)
        validation.validate_reduction(reduction)
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
        self._accumulate = accumulate
        self._reduction = reduction
        self._accumulator = GradientAccumulator()
        # Whether the window's sum is divided by the normaliser sum; decided
        # when the step is traced, from the reductions of the loss terms.
        self._window_divides = True

    @property
    def accumulate(self):
        """The window: `"epoch"` or the number of mini-batches per update."""
        return self._accumulate

    @property
    def reduction(self):
        """`"mean"` (exact big-batch gradient) or `"sum"` (running total)."""
        return self._reduction

    @property
    def mini_step(self):
        """Mini-batches accumulated in the current window (0 before `fit`)."""
        if not self._accumulator.built:
            return 0
        return int(self._accumulator.mini_step.numpy())

    def get_config(self):
        config = super().get_config()
        config.update({"accumulate": self._accumulate, "reduction": self._reduction})
        return config

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        optimizer = keras.optimizers.get(optimizer)
        validation.validate_optimizer(optimizer)
        super().compile(optimizer, *args, **kwargs)
        self._accumulator.apply_function = None

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile()`; ours only
        # validates, so restore the compiled state as `keras.Model` does.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        if len(args) > _FIT_CALLBACKS_POSITION:
            args = list(args)
            args[_FIT_CALLBACKS_POSITION] = _with_flush_callback(
                args[_FIT_CALLBACKS_POSITION]
            )
        else:
            kwargs["callbacks"] = _with_flush_callback(kwargs.get("callbacks"))
        return super().fit(*args, **kwargs)

    def make_train_function(self, force=False):
        # Under a strategy the model and optimizer are built before the
        # train function is traced; create the accumulators eagerly then.
        if (
            self._accumulate != 1
            and self.optimizer is not None
            and self._all_layers_built()
        ):
            with self.distribute_strategy.scope():
                self._build_accumulation_state()
        return super().make_train_function(force=force)

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
        return all(layer.built for layer in self._flatten_layers())

    def _build_accumulation_state(self):
        if self._accumulator.built:
            return
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        normaliser_dtype = (
            "float64" if keras.backend.floatx() == "float64" else "float32"
        )
        self._accumulator.build(self.trainable_variables, normaliser_dtype)

    def train_step(self, data):
        if self._accumulate == 1:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(
            next(i for i in tf.nest.flatten(x) if i is not None)
        )[0]

        with tf.GradientTape() as tape:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            # After the forward pass, which builds a subclassed model's
            # layers on the first trace.
            self._build_accumulation_state()
            with record_loss_normalisers() as terms:
                loss = self._compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
            weight, divides = self._micro_batch_weight(terms, batch_size, loss)
            self._loss_tracker.update_state(
                keras_loss_module.unscale_loss_for_distribution(loss),
                sample_weight=weight if divides else batch_size,
            )
            objective = self._micro_batch_objective(loss, weight, divides)
            objective = self.optimizer.scale_loss(objective)

        trainable_variables = self.trainable_variables
        gradients = tape.gradient(objective, trainable_variables)
        gradients = self._unscale_gradients(gradients)
        self._window_divides = divides
        self._accumulator.add(
            gradients, weight if divides else tf.zeros((), loss.dtype)
        )
        if self._accumulate != validation.EPOCH:
            self._apply_window_when(
                lambda: self._accumulator.mini_step.value >= self._accumulate,
                divides,
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if distribute_utils.is_multi_worker(self.distribute_strategy):
            logs = distribute_utils.rank_one_logs(logs)
        return logs

    def _micro_batch_weight(self, terms, batch_size, loss):
        """The micro-batch's share of the window's loss normaliser.

        Returns:
            `(weight, divides)`: the scalar the micro-batch's loss is
            multiplied by before its gradient is added, and whether the
            window's gradient sum is divided by the sum of those weights.
            A loss reduced with `"sum"` has no normaliser, and neither has
            `reduction="sum"`: both add the plain gradients.
        """
        if self._reduction == "sum":
            return tf.ones((), loss.dtype), False
        normalisers = [t.normaliser for t in terms if t.normaliser is not None]
        if normalisers:
            # One normaliser per micro-batch: exact for a single loss term,
            # and for several terms whose normalisers are proportional.
            return tf.stop_gradient(tf.cast(normalisers[0], loss.dtype)), True
        if terms and all(t.reduction == SUM for t in terms):
            return tf.ones((), loss.dtype), False
        # No Keras loss reported a normaliser (e.g. a custom `compute_loss`
        # returning a mean): weight by examples.
        return tf.cast(batch_size, loss.dtype), True

    def _micro_batch_objective(self, loss, weight, divides):
        """Loss whose gradient is the micro-batch's term of the window sum."""
        if self._reduction == "sum":
            return loss
        if divides:
            # Keras divides each replica's mean loss by the replica count;
            # undo it so the weighted replica losses add up to the window's
            # sum. Regularisation losses in `loss` get the same weight, so
            # after division by the window's normaliser they count once.
            replicas = self.distribute_strategy.num_replicas_in_sync
            return loss * weight * tf.cast(replicas, loss.dtype)
        # Summed losses have no normaliser to divide regularisation by:
        # keep it in the window's first micro-batch only.
        regularisation = self._weight_regularisation_loss(loss.dtype)
        if regularisation is None:
            return loss
        later = tf.cast(self._accumulator.mini_step.value > 0, loss.dtype)
        return loss - later * keras_loss_module.scale_loss_for_distribution(
            regularisation
        )

    def _weight_regularisation_loss(self, dtype):
        losses = self._get_regularization_losses()
        if not losses:
            return None
        return tf.add_n([tf.cast(value, dtype) for value in losses])

    def _unscale_gradients(self, gradients):
        scale = getattr(self.optimizer, "dynamic_scale", None)
        if scale is None:
            return gradients
        return [
            None if g is None else g / tf.cast(scale, g.dtype) for g in gradients
        ]

    def _apply_window_when(self, condition, divides):
        """Applies the window if `condition()` holds (call in replica context).

        Strategies that use merge calls (`MirroredStrategy`) may not merge
        inside a `tf.cond` branch, so the merge call runs unconditionally and
        the condition is checked in cross-replica context, where the window
        is applied through `strategy.run`. Other strategies (multi-worker,
        TPU, the default one) apply directly in replica context.
        """

        def apply_if(strategy):
            tf.cond(
                condition(),
                lambda: self._apply_window(strategy, divides),
                lambda: tf.no_op(),
            )

        tf.__internal__.distribute.interim.maybe_merge_call(
            apply_if, tf.distribute.get_strategy()
        )

    def _apply_window(self, strategy, divides):
        """Divides by the window's normaliser, then applies the gradient."""
        normaliser = None
        if divides:
            # The only reduction besides the optimizer's own all-reduce of
            # the gradients: one scalar, the window's normaliser.
            normaliser = distribute_utils.sum_across_replicas(
                strategy, self._accumulator.normaliser
            )
        if tf.distribute.in_cross_replica_context():
            strategy.run(self._apply_local_sums, args=(normaliser,))
        else:
            self._apply_local_sums(normaliser)
        return tf.no_op()

    def _apply_local_sums(self, normaliser):
        """Applies this replica's sums; the optimizer all-reduces them.

        Replica context. Each replica passes its local gradient sum divided
        by the global normaliser; the optimizer's `SUM` all-reduce of those
        is the window's gradient, one all-reduce per update.
        """
        accumulator = self._accumulator
        gradients = [tf.convert_to_tensor(a.value) for a in accumulator.gradients]
        if normaliser is not None:
            gradients = [
                tf.math.divide_no_nan(g, tf.cast(normaliser, g.dtype))
                for g in gradients
            ]
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        optimizer.apply(gradients, self.trainable_variables)
        accumulator.reset()

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
        if accumulator.apply_function is None:

            @tf.function
            def apply_function(divides):
                self.distribute_strategy.run(
                    self._apply_window_when,
                    args=(lambda: accumulator.mini_step.value > 0, divides),
                )

            accumulator.apply_function = apply_function
        accumulator.apply_function(self._window_divides)

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
                    self._build_accumulation_state()
            else:
                raise RuntimeError(
                    f"`{method}()` needs a built model: call `fit()`, "
                    "`train_on_batch()` or `build()` first."
                )


@keras.saving.register_keras_serializable(package="keras_accum")
class FunctionalAccumulatingModel(AccumulatingModel, Functional):
    """The functional form of `AccumulatingModel`.

    `AccumulatingModel(inputs, outputs, ...)` returns an instance of this
    class; use `AccumulatingModel` in user code and `isinstance` checks.
    """

    def __new__(cls, *args, **kwargs):
        return Functional.__new__(cls, *args, **kwargs)

    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs, outputs, name=name, **kwargs)


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


def wrap(model, accumulate="epoch", reduction="mean"):
    """Returns an `AccumulatingModel` sharing `model`'s layers and weights.

    The new model is built from `model`'s inputs and outputs, so no weight is
    copied: training it trains `model`. Compile the returned model.

    Args:
        model: A functional `keras.Model` or a built `keras.Sequential`.
        accumulate: `"epoch"` or an int >= 1, as in `AccumulatingModel`.
            Defaults to `"epoch"`.
        reduction: `"mean"` or `"sum"`, as in `AccumulatingModel`. Defaults
            to `"mean"`.

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
    graph = model._functional if isinstance(model, keras.Sequential) else model
    if not isinstance(graph, Functional):
        raise TypeError(
            "`wrap()` needs a functional `keras.Model` or a `keras.Sequential` "
            "built with a known input shape; for a subclassed model, subclass "
            f"`AccumulatingModel` instead. Received: model of type "
            f"{type(model).__name__}"
        )
    validation.validate_window(accumulate)
    validation.validate_reduction(reduction)
    return FunctionalAccumulatingModel(
        graph._inputs_struct,
        graph._outputs_struct,
        name=model.name,
        accumulate=accumulate,
        reduction=reduction,
    )
