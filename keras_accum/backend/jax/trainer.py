"""The JAX train step: pure and jitted, with the window in the step's state.

Keras' `JAXTrainer.train_step(state, data)` takes and returns the state
`(trainable, non_trainable, optimizer_variables, metrics_variables)`. Here
the accumulators travel in it too, after the optimizer's own variables in
the third entry (`_get_jax_state`, `jax_state_sync` and
`_get_state_sharding_spec` add them; before Keras 3.12, which has no
`_get_state_sharding_spec`, the step constrains Keras' part of the state
as Keras' own step does), so that `fit`'s loop, which unpacks
four entries, carries them from step to step on the device, with no host
round trip per micro-step. They are not optimizer variables, so saving and
loading the optimizer is unchanged.

A full window is applied inside the step under `jax.lax.cond`: on a
micro-step that does not end a window the optimizer update is not computed.
"""

import collections
import functools

import jax
import keras
from jax import numpy as jnp
from keras import ops

from keras_accum import _keras_internals
from keras_accum import custom_steps
from keras_accum import micro_batches
from keras_accum import objectives
from keras_accum import validation
from keras_accum import window_loss
from keras_accum.accumulators import GradientAccumulator
from keras_accum.backend.jax import attribution
from keras_accum.backend.jax import micro_batches as jax_micro_batches
from keras_accum.loss_normalisers import record_loss_normalisers
from keras_accum.window_plan import WindowPlan


class Window(collections.namedtuple(
    "Window",
    ["gradients", "normalisers", "mini_step", "window", "skipped",
     "discarded"],
)):
    """The values of the accumulator variables inside a step (a pytree).

    Attributes:
        gradients: One list of gradient sums per loss term.
        normalisers: Vector, each term's normaliser sum.
        mini_step: Micro-batches in the window.
        window: Micro-batches per window (0: epoch end).
        skipped: Micro-batches skipped for non-finite gradients.
        discarded: Windows discarded for a non-finite sum.
    """

    __slots__ = ()

    @classmethod
    def from_values(cls, values, terms):
        """Unflattens `GradientAccumulator.state_variables()` values."""
        values = list(values)
        per_term = (len(values) - 5) // terms
        gradients = [
            values[t * per_term:(t + 1) * per_term] for t in range(terms)
        ]
        return cls(gradients, *values[terms * per_term:])

    def values(self):
        """Flattens, in the order of `GradientAccumulator.state_variables()`."""
        return [g for term in self.gradients for g in term] + [
            self.normalisers,
            self.mini_step,
            self.window,
            self.skipped,
            self.discarded,
        ]

    def cleared(self, discarded=None):
        """The window after an update (or a discard): sums and count zero."""
        return self._replace(
            gradients=[[jnp.zeros_like(g) for g in term]
                       for term in self.gradients],
            normalisers=jnp.zeros_like(self.normalisers),
            mini_step=jnp.zeros_like(self.mini_step),
            discarded=self.discarded if discarded is None else discarded,
        )

    def is_finite(self):
        """Whether every sum and normaliser is finite (scalar bool).

        Once per window, so it can afford an element-wise check: a sum of
        finite gradients can overflow, which a check of the total alone
        would mistake for a non-finite gradient.
        """
        checks = [jnp.all(jnp.isfinite(g)) for t in self.gradients for g in t]
        checks.append(jnp.all(jnp.isfinite(self.normalisers)))
        return jnp.all(jnp.stack(checks))


class JAXGradientAccumulator(GradientAccumulator):
    """`GradientAccumulator` with eager updates between jitted steps."""

    def _placement(self, variable):
        # Sharded as its weight, as Keras places optimizer slots
        # (`add_variable_from_reference`): under `ModelParallel` a micro-step
        # adds each gradient shard where it already is.
        return {"layout": getattr(variable, "_layout", None)}

    def reset(self):
        """Zeroes the gradient sums, normalisers and the window counter."""
        variables = [v for term in self.gradients for v in term] + [
            self.normalisers, self.mini_step
        ]
        zeros = _zeros_function(
            tuple((tuple(v.shape), v.dtype) for v in variables)
        )
        for variable, zero in zip(variables, zeros()):
            variable.assign(zero)


class JAXAccumulationTrainer:
    """The JAX half of `AccumulatingModel` (a mixin before `keras.Model`,
    as Keras mixes `JAXTrainer` into its `Model`)."""

    accumulator_class = JAXGradientAccumulator

    # --- Hooks of the backend-neutral model -------------------------------

    def _build_accumulators_eagerly(self):
        self._sync_accumulation_state()

    def _replicas(self):
        # One global program: Keras normalises the global batch already.
        return 1

    def _inside_traced_step(self):
        return self._functions.tracing

    def _pending_mini_batches(self):
        return self.mini_step

    def _read_counter(self, variable):
        return int(self._current_value(variable))

    def _counter_value(self, variable):
        # A copy, dispatched without waiting: the next step consumes
        # (donates) the state's own array.
        return _copy(self._current_value(variable))

    def _current_value(self, variable):
        """An accumulator variable's value: in the state of a running `fit`
        when it is there, else the variable's own."""
        values = self._unsynced_window_values() or []
        for ref, value in zip(self._accumulator.state_variables(), values):
            if ref is variable:
                return value
        return variable.value

    # --- The accumulators in the JAX trainer's state ----------------------

    def _window_in_state(self):
        return self._accumulator.built and self._accumulates_in_step()

    def _unsynced_window_values(self):
        """The accumulators' values in the state of a running `fit`, or
        `None` when the variables hold them (state synced)."""
        state = getattr(self, "_jax_state", None)
        if not state or self._jax_state_synced or not self._window_in_state():
            return None
        values = state.get("optimizer_variables")
        optimizer_count = len(self.optimizer.variables)
        if values is None or len(values) == optimizer_count:
            return None
        return values[optimizer_count:]

    def _get_jax_state(
        self,
        trainable_variables=False,
        non_trainable_variables=False,
        optimizer_variables=False,
        metrics_variables=False,
        purge_model_variables=False,
    ):
        window = (
            [v.value for v in self._accumulator.state_variables()]
            if optimizer_variables and self._window_in_state()
            else []
        )
        if purge_model_variables:
            self._keep_purged_values(
                trainable_variables, non_trainable_variables,
                optimizer_variables, metrics_variables,
            )
        state = super()._get_jax_state(
            trainable_variables=trainable_variables,
            non_trainable_variables=non_trainable_variables,
            optimizer_variables=optimizer_variables,
            metrics_variables=metrics_variables,
            purge_model_variables=purge_model_variables,
        )
        if not window:
            return state
        state = list(state)
        index = int(trainable_variables) + int(non_trainable_variables)
        state[index] = list(state[index]) + window
        if purge_model_variables:
            # As Keras purges its own variables: one copy, in the state.
            for variable in self._accumulator.state_variables():
                variable._value = None
        return tuple(state)

    def jax_state_sync(self):
        values = self._unsynced_window_values()
        if values is not None:
            for variable, value in zip(
                self._accumulator.state_variables(), values
            ):
                variable.assign(value)
        super().jax_state_sync()
        self._restore_purged_values()

    def _keep_purged_values(self, trainable, non_trainable, optimizer,
                            metrics):
        """Keeps the values `fit` is about to purge from the variables.

        Keras purges the variables when it takes the state and reattaches
        the state a step returns. If the first step fails (e.g. a custom
        `train_step` refused while traced), no state was returned and the
        purged weights would be lost; `_restore_purged_values` puts them
        back.
        """
        groups = [
            (trainable, self.trainable_variables),
            (non_trainable, self.non_trainable_variables),
            (optimizer, self.optimizer.variables if optimizer else []),
            (
                optimizer and self._window_in_state(),
                self._accumulator.state_variables()
                if self._accumulator.built else [],
            ),
            (metrics, self.metrics_variables),
        ]
        self._functions.purged = [
            (variable, variable._value)
            for taken, variables in groups if taken
            for variable in variables
            if variable._value is not None
        ]

    def _restore_purged_values(self):
        for variable, value in self._functions.purged:
            # A value a step consumed (donated) is deleted; the state the
            # step returned was reattached instead.
            if variable._value is None and not value.is_deleted():
                variable._value = value
        self._functions.purged = []

    def _get_state_sharding_spec(self):
        trainable, non_trainable, optimizer, metrics = (
            super()._get_state_sharding_spec()
        )
        if self._window_in_state():
            optimizer = list(optimizer) + [
                v.value.sharding for v in self._accumulator.state_variables()
            ]
        return trainable, non_trainable, optimizer, metrics

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if self._ready_to_accumulate():
            validation.validate_jax_optimizer(self.optimizer)
            # Before Keras jits the step: the state's shardings are read
            # from the variables, which must exist by then.
            self._sync_accumulation_state()
        return super().make_train_function(force=force)

    # --- The step ---------------------------------------------------------

    @custom_steps.own_step
    def train_step(self, state, data):
        if self._trains_as_keras():
            return super().train_step(state, data)
        custom_steps.count_accumulation(self)
        trainable, non_trainable, optimizer_state, metrics = state
        optimizer_count = len(self.optimizer.variables)
        optimizer_values = list(optimizer_state[:optimizer_count])
        self._check_accumulators_in_trace()
        window = Window.from_values(
            optimizer_state[optimizer_count:],
            len(self._accumulator.gradients),
        )
        size = self._micro_batch_size_for(state, data)
        window, non_trainable, metrics, logs = self._accumulate_batch(
            (trainable, non_trainable, metrics, optimizer_values),
            window, data, size,
        )
        if self._schedule.value != validation.EPOCH:
            trainable, optimizer_values, window = self._apply_window_if(
                self._window_is_full(window), trainable, optimizer_values,
                window,
            )
        if not _keras_internals.JAX_STATE_SHARDING_IN_JIT:
            # Keras < 3.12: its own step constrains the state it returns to
            # the shardings `fit` recorded (`_enforce_jax_state_sharding`);
            # so does this one, for Keras' part of the state (the window's
            # values are left to `jit`), where they are recorded.
            trainable, non_trainable, optimizer_values, metrics = (
                _constrain(values, getattr(self, f"_{name}_shardings", None))
                for values, name in (
                    (trainable, "trainable_variable"),
                    (non_trainable, "non_trainable_variable"),
                    (optimizer_values, "optimizer_variable"),
                    (metrics, "metrics_variable"),
                )
            )
        return logs, (
            trainable,
            non_trainable,
            list(optimizer_values) + window.values(),
            metrics,
        )

    def _micro_batch_size_for(self, state, data):
        """The micro-batch size of this step's batch: the argument, or
        under `"auto"` the size chosen once per input shape."""
        override = self._functions.micro_batch_override
        if override is not None:
            return override  # A candidate `"auto"` is compiling.
        if self._micro_batch_size != micro_batches.AUTO:
            return self._micro_batch_size
        shapes = tuple(
            (tuple(leaf.shape), str(leaf.dtype))
            for leaf in jax.tree_util.tree_leaves(data)
        )
        chosen = self._functions.micro_batch_choices
        if shapes not in chosen:
            chosen[shapes] = jax_micro_batches.choose(
                self, state, data, self._memory_limit
            )
        self._chosen_micro_batch_size = chosen[shapes]
        return chosen[shapes]

    def _accumulate_batch(self, state, window, data, micro_batch_size):
        """Adds one `fit` batch to `window`, in micro-batches of
        `micro_batch_size` examples per device (`None`: the whole batch).

        The full micro-batches run under `jax.lax.scan` (one compiled body,
        one micro-batch's activations live at a time), then the shorter
        last one, if any, with its own static shape. Under
        `keras.distribution` each device's shard of the batch is split,
        so every micro-batch stays sharded over the devices as the batch
        was.

        Args:
            state: `(trainable, non_trainable, metrics, optimizer_values)`.
            window: The `Window` before the batch.
            data: The batch.
            micro_batch_size: Int, or `None` for the whole batch.

        Returns:
            `(window, non_trainable, metrics, logs)` after the batch; the
            window counts the batch once.
        """
        trainable, non_trainable, metrics, optimizer_values = state
        first = window.mini_step == 0
        count = window.mini_step + 1

        def micro_batch(carry, micro_data, first_in_window):
            non_trainable, metrics, window = carry
            return self._accumulate_micro_batch(
                (trainable, non_trainable, metrics, optimizer_values),
                window, micro_data, first_in_window,
            )

        carry = (non_trainable, metrics, window)
        batch = jax_micro_batches.batch_size(data)
        devices = jax_micro_batches.data_parallel_devices(batch)
        if micro_batch_size is None or micro_batch_size >= batch // devices:
            carry, logs = micro_batch(carry, data, first)
        else:
            # At least one full micro-batch: the size is below the shard's.
            split = micro_batches.Split.of(batch // devices, micro_batch_size)
            carry, logs = self._scan_micro_batches(
                micro_batch, carry,
                jax_micro_batches.full_micro_batches(data, devices, split),
                first, split.full,
            )
            if split.remainder:
                # After a full one, so it never starts a window.
                carry, logs = micro_batch(
                    carry,
                    jax_micro_batches.last_micro_batch(data, devices, split),
                    jnp.zeros((), bool),
                )
        non_trainable, metrics, window = carry
        return window._replace(mini_step=count), non_trainable, metrics, logs

    def _scan_micro_batches(self, micro_batch, carry, stacked, first, count):
        """`micro_batch` over the `count` stacked micro-batches, under
        `jax.lax.scan`. Returns the carry and the last one's logs."""

        def body(carry, step):
            index, micro_data = step
            return micro_batch(
                carry, micro_data, jnp.logical_and(first, index == 0)
            )

        carry, all_logs = jax.lax.scan(
            body, carry, (jnp.arange(count), stacked)
        )
        return carry, jax.tree_util.tree_map(lambda v: v[-1], all_logs)

    def _accumulate_micro_batch(self, state, window, data, first_in_window):
        """Forward, backward and accumulation of one micro-batch.

        Args:
            state: `(trainable, non_trainable, metrics, optimizer_values)`.
            window: The `Window` before the micro-batch.
            data: The micro-batch.
            first_in_window: Scalar bool, whether it starts the window.

        Returns:
            `((non_trainable, metrics, window), logs)`; `window.mini_step`
            is left to the caller, which counts `fit` batches.
        """
        trainable, non_trainable, metrics, optimizer_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = jax_micro_batches.batch_size(x)
        static = {}

        def weighted_objectives(trainable):
            with record_loss_normalisers(self) as recorded:
                _, (loss, y_pred, new_non_trainable, new_metrics) = (
                    self.compute_loss_and_updates(
                        trainable,
                        non_trainable,
                        metrics,
                        x,
                        y,
                        sample_weight,
                        training=True,
                        optimizer_variables=optimizer_values,
                    )
                )

            def probe(terms, losses, check):
                return attribution.probe(
                    self, (trainable, non_trainable, metrics),
                    (x, y, sample_weight), y_pred, terms, losses, check,
                )

            # Weight regularisation inside the contribution reads the
            # weights: give it this step's values.
            with keras.StatelessScope(
                state_mapping=list(zip(self.trainable_variables, trainable))
            ):
                contribution = self._micro_batch_contribution(
                    recorded, loss, batch_size, first_in_window, probe
                )
            static["divides"] = contribution.divides
            weighted = ops.stack(
                [
                    objective * scale
                    for objective, scale in zip(
                        contribution.objectives, contribution.gradient_scales
                    )
                ]
            )
            return weighted, (
                loss,
                contribution.normalisers,
                (contribution.logging_weight, contribution.logged_terms),
                y_pred,
                new_non_trainable,
                new_metrics,
            )

        weighted, pullback, aux = jax.vjp(
            weighted_objectives, trainable, has_aux=True
        )
        loss, normalisers, logging, y_pred, non_trainable, metrics = aux
        # One backward pass per loss term, from one forward pass.
        basis = jnp.eye(weighted.shape[0], dtype=weighted.dtype)
        term_gradients = [pullback(direction)[0] for direction in basis]
        self._window_plan = WindowPlan(static["divides"])
        window, kept = self._add_micro_batch(
            window, term_gradients, normalisers, loss
        )
        logged = objectives.MicroBatchContribution(
            None, None, normalisers, static["divides"], *logging
        )
        # A skipped micro-batch is left out of the logged loss too.
        logs, metrics = self._update_logs(
            metrics, loss, logged, first_in_window,
            kept > 0 if self._on_nonfinite == "skip" else None,
            x, y, y_pred, sample_weight,
        )
        return (non_trainable, metrics, window), logs

    def _check_accumulators_in_trace(self):
        """The accumulators were built before `jit`, for these variables;
        a trace that finds the trainable set changed raises (see
        `_sync_accumulation_state`)."""
        self._functions.tracing = True
        try:
            self._sync_accumulation_state()
        finally:
            self._functions.tracing = False

    def _add_micro_batch(self, window, term_gradients, normalisers, loss):
        """Adds one micro-batch's weighted gradients to `window`.

        Returns:
            The new `Window` (its count left to the caller), and 1.0 or
            0.0: whether the micro-batch was added (0.0 only for a
            non-finite one under `on_nonfinite="skip"`).
        """
        normalisers = ops.cast(normalisers, window.normalisers.dtype)
        kept = jnp.ones((), loss.dtype)
        skipped = window.skipped
        if self._on_nonfinite == "skip":
            finite = jnp.all(
                jnp.stack(
                    [jnp.isfinite(jnp.sum(g)) for t in term_gradients
                     for g in t]
                    + [jnp.all(jnp.isfinite(normalisers)),
                       jnp.isfinite(loss)]
                )
            )
            # `where`, not a product: 0 * inf is NaN.
            term_gradients = [
                [jnp.where(finite, g, jnp.zeros_like(g)) for g in t]
                for t in term_gradients
            ]
            normalisers = jnp.where(
                finite, normalisers, jnp.zeros_like(normalisers)
            )
            kept = finite.astype(loss.dtype)
            skipped = skipped + 1 - finite.astype(skipped.dtype)
        sums = [
            [s + g.astype(s.dtype) for s, g in zip(term_sums, gradients)]
            for term_sums, gradients in zip(window.gradients, term_gradients)
        ]
        window = window._replace(
            gradients=sums,
            normalisers=window.normalisers + normalisers,
            skipped=skipped,
        )
        return window, kept

    def _update_logs(self, metrics, loss, contribution, first_in_window,
                     kept, x, y, y_pred, sample_weight):
        """Keras' `_update_metrics_variables`, with the micro-batch's loss
        logged by its share of the window (see `window_loss`)."""
        with keras.StatelessScope(
            state_mapping=list(zip(self.metrics_variables, metrics))
        ) as scope:
            window_loss.log_micro_batch(
                _keras_internals.loss_tracker(self), loss, contribution,
                first_in_window, kept=kept,
            )
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        metrics = [
            _current(scope, v) for v in self.metrics_variables
        ]
        return logs, metrics

    def _window_is_full(self, window):
        if self._schedule.is_static:
            return window.mini_step >= self._schedule.value
        return jnp.logical_and(
            window.window > 0, window.mini_step >= window.window
        )

    def _apply_window_if(self, condition, trainable, optimizer_values,
                         window):
        """Applies `window` when `condition` holds, under `lax.cond`.

        Neither the optimizer update nor the window's finiteness check runs
        on a step whose condition is false. A full window whose sums are
        not finite is discarded and counted instead.

        Returns:
            The new `(trainable, optimizer_values, window)`.
        """
        plan = self._window_plan

        def update(operands):
            trainable, optimizer_values, window = operands
            gradients = _window_gradient(window, plan)
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, gradients, trainable
            )
            return list(trainable), list(optimizer_values), window.cleared()

        def discard(operands):
            trainable, optimizer_values, window = operands
            return trainable, optimizer_values, window.cleared(
                discarded=window.discarded + 1
            )

        def apply(operands):
            return jax.lax.cond(
                operands[2].is_finite(), update, discard, operands
            )

        return jax.lax.cond(
            condition,
            apply,
            lambda operands: operands,
            (list(trainable), list(optimizer_values), window),
        )

    # --- Outside the step -------------------------------------------------

    def _apply_pending_window(self):
        """Applies the window if it holds a mini-batch (eager call)."""
        if not self.mini_step:
            # Nothing to apply (the function's `cond` would return every
            # value unchanged): spares a call over the whole state.
            return
        accumulator = self._accumulator
        if self._functions.apply is None:

            def apply_function(trainable, optimizer_values, values):
                window = Window.from_values(
                    values, len(accumulator.gradients)
                )
                trainable, optimizer_values, window = self._apply_window_if(
                    window.mini_step > 0, trainable, optimizer_values, window
                )
                return trainable, optimizer_values, window.values()

            self._functions.apply = (
                apply_function if self.run_eagerly
                else jax.jit(apply_function)
            )
        targets = (
            accumulator.variables,
            self.optimizer.variables,
            accumulator.state_variables(),
        )
        results = self._functions.apply(
            *[[v.value for v in variables] for variables in targets]
        )
        for variables, values in zip(targets, results):
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _reset_window(self):
        """Zeroes the window's sums and count (eager call)."""
        self._accumulator.reset()

    def _accumulate_from_custom_step(self, gradients, normaliser):
        raise NotImplementedError(
            "`accumulate_gradients` is for custom TensorFlow train steps; "
            "on JAX, a custom `train_step(self, state, data)` accumulates "
            "through `super().train_step(state, data)`. Received: a call "
            "on the JAX backend"
        )


# Jitted: JAX's eager `jnp.copy` costs ~10x the dispatch of a jitted one.
_copy = jax.jit(jnp.copy)


@functools.lru_cache(maxsize=None)
def _zeros_function(specs):
    """A jitted function of no argument returning zeros of `specs`
    (`(shape, dtype)` pairs): one dispatch for all the accumulators, where
    eager `zeros` pays one per variable (~4 ms a `fit` on the benchmark's
    transformer)."""
    return jax.jit(lambda: [jnp.zeros(shape, dtype) for shape, dtype in specs])


def _constrain(values, shardings):
    """`values` under `shardings` (Keras < 3.12's recorded spec), or as they
    are where none is recorded for them."""
    values = list(values)
    if shardings is None or len(shardings) != len(values):
        return values
    return [
        jax.lax.with_sharding_constraint(value, sharding)
        for value, sharding in zip(values, shardings)
    ]


def _current(scope, variable):
    """`variable`'s value in a `StatelessScope`, or its own if untouched."""
    value = scope.get_current_value(variable)
    return variable.value if value is None else value


def _window_gradient(window, plan):
    """The gradient a window applies: each term's sum, divided by its
    window-wide normaliser where the term is averaged, summed over terms."""
    gradient = None
    for term, sums in enumerate(window.gradients):
        if plan.divides[term]:
            normaliser = window.normalisers[term]
            # An empty term (normaliser 0) adds 0, as Keras' `divide_no_nan`.
            sums = [
                ops.divide_no_nan(s, ops.cast(normaliser, s.dtype))
                for s in sums
            ]
        gradient = (
            sums if gradient is None
            else [a + b for a, b in zip(gradient, sums)]
        )
    return gradient
