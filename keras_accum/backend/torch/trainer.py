"""The PyTorch train step: eager autograd, accumulation in place.

Keras' `TorchTrainer.train_step(data)` runs eagerly: a forward pass,
`loss.backward()`, then `optimizer.apply` under `torch.no_grad()`. Here
the backward pass is `torch.autograd.grad` of each loss term's weighted
objective (one forward pass), added into the accumulator variables under
`torch.no_grad()`; the optimizer runs only when a window is full, or at
epoch end. `micro_batch_size` slices the batch in Python: each slice's
graph is freed after its backward pass, so one micro-batch's activations
live at a time.
"""

import keras
import torch

from keras_accum._compat import trainer as compat_trainer
from keras_accum.backend.torch import attribution
from keras_accum.backend.torch import loss_scale
from keras_accum.backend.torch.accumulators import TorchGradientAccumulator
from keras_accum.core import custom_steps
from keras_accum.core import validation
from keras_accum.core import window as core_window
from keras_accum.core import window_loss
from keras_accum.core.loss_normalisers import record_loss_normalisers
from keras_accum.core.window_plan import WindowPlan
from keras_accum.core.window_plan import gradient_exists


class TorchAccumulationTrainer:
    """The PyTorch half of `AccumulatingModel` (a mixin before
    `keras.Model`, as Keras mixes `TorchTrainer` into its `Model`)."""

    accumulator_class = TorchGradientAccumulator

    # --- Hooks of the backend-neutral model -------------------------------

    # The core's defaults for `_replicas` (1: Keras on torch trains on one
    # device), `_inside_traced_step` (see `_micro_step`) and the rest.

    def _read_counter(self, variable):
        return int(variable.value)

    def _counter_value(self, variable):
        return int(variable.value)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if self._ready_to_accumulate():
            self._sync_accumulation_state()
        return super().make_train_function(force=force)

    # --- The step ---------------------------------------------------------

    @custom_steps.own_step
    def train_step(self, data):
        if self._trains_as_keras():
            return super().train_step(data)
        custom_steps.count_accumulation(self)
        logs = self._accumulate_batch(data)
        if self._schedule.value != validation.EPOCH and self._window_is_full():
            self._apply_window()
        return logs

    def _accumulate_batch(self, data):
        """Adds one `fit` batch to the window, in micro-batches of
        `micro_batch_size` examples (sliced in Python: the step is eager).
        Returns the logs."""
        size = self._micro_batch_size
        batch = _batch_size(data)
        if size is None or size >= batch:
            logs = self._micro_step(data)
        else:
            # The last slice is the shorter remainder, if any.
            for start in range(0, batch, size):
                logs = self._micro_step(
                    keras.tree.map_structure(
                        lambda t, start=start: _rows(t, start, size), data
                    ),
                    first=start == 0,
                )
        self._accumulator.count_micro_batch()
        return logs

    def _micro_step(self, data, first=True):
        """Forward, backward and accumulation of one micro-batch. Returns
        the logs.

        Args:
            data: The micro-batch.
            first: Whether it is its batch's first micro-batch (only a
                batch's first can start a window).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with record_loss_normalisers(self) as recorded:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            entries = list(self.losses)
            with compat_trainer.losses_override(self, entries):
                loss = compat_trainer.compute_loss(
                    self, x=x, y=y, y_pred=y_pred,
                    sample_weight=sample_weight, training=True,
                )
        self._note_loss_terms(recorded)
        # Plain Keras on torch reads `trainable_weights` at every step, so
        # a layer frozen without `compile()` stops training at once: the
        # accumulators follow at a window's boundary, and a change inside
        # a window (whose gradients were summed for the old set) is
        # refused, as a retrace is on TensorFlow and JAX.
        accumulator = self._accumulator
        self._functions.tracing = accumulator.built and bool(
            int(accumulator.mini_step.value) or not first
        )
        try:
            self._sync_accumulation_state()
        finally:
            self._functions.tracing = False
        accumulator = self._accumulator  # Rebuilt if the weights changed.
        first_in_window = torch.logical_and(
            accumulator.mini_step.value == 0, torch.tensor(first)
        )
        contribution = self._micro_batch_contribution(
            recorded, loss, _batch_size(x), first_in_window,
            attribution.step_probe(self, loss, recorded, entries,
                                   (x, y, sample_weight), y_pred),
        )
        scaling = loss_scale.dynamic_scale(self.optimizer)
        objectives = [
            # Weighting the loss costs one scalar multiply; under dynamic
            # loss scaling the scale multiplies the gradient instead, so
            # the scaled loss stays in the float16 range.
            self.optimizer.scale_loss(
                objective if scaling is not None else objective * scale
            )
            for objective, scale in zip(
                contribution.objectives, contribution.gradient_scales
            )
        ]
        variables = [v.value for v in accumulator.variables]
        term_gradients = [
            _gradients(objective, variables, retain=index + 1 < len(objectives))
            for index, objective in enumerate(objectives)
        ]
        self._window_plan = WindowPlan(
            contribution.divides, gradient_exists(term_gradients)
        )
        logged_loss = loss.detach()
        keep = self._keep(term_gradients, contribution, logged_loss, scaling)
        if scaling is not None:
            factors = [
                scale.detach() / scaling for scale in
                contribution.gradient_scales
            ]
            term_gradients = [
                [None if g is None else g * f.to(g.dtype) for g in gradients]
                for gradients, f in zip(term_gradients, factors)
            ]
        accumulator.add(term_gradients, contribution.normalisers.detach(),
                        keep=keep)
        window_loss.log_micro_batch(
            compat_trainer.loss_tracker(self), logged_loss,
            _detached(contribution), first_in_window, kept=keep,
        )
        y_pred = keras.tree.map_structure(_detach, y_pred)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _keep(self, term_gradients, contribution, loss, scaling):
        """Whether the micro-batch is added (scalar bool tensor), or `None`
        where the window is checked once instead (`on_nonfinite="raise"`
        without loss scaling)."""
        if scaling is None and self._on_nonfinite != "skip":
            return None
        finite = core_window.all_finite(
            [g for gradients in term_gradients for g in gradients]
            + [contribution.normalisers, loss]
        )
        if scaling is not None:
            loss_scale.update_dynamic_scale(self.optimizer, bool(finite))
        else:
            self._accumulator.count_skipped(finite)
        return finite

    def _window_is_full(self):
        accumulator = self._accumulator
        return core_window.is_full(
            self._schedule, int(accumulator.mini_step.value),
            int(accumulator.window.value),
        )

    # --- The window's update ---------------------------------------------

    def _apply_window(self):
        """Applies the window, or discards and counts it when a sum is not
        finite."""
        accumulator = self._accumulator
        if not accumulator.sums_are_finite():
            accumulator.discard()
            return
        gradients = _window_gradient(accumulator, self._window_plan)
        if accumulator.noise_state is not None:
            accumulator.update_noise_scale(gradients)
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        with torch.no_grad():
            optimizer.apply(gradients, accumulator.variables)
        accumulator.reset()

    def _apply_pending_window(self):
        """Applies the window if it holds a mini-batch."""
        if self.mini_step:
            self._apply_window()

    def _reset_window(self):
        """Zeroes the window's sums and count."""
        self._accumulator.reset()

    def _accumulate_from_custom_step(self, gradients, normaliser):
        raise NotImplementedError(
            "`accumulate_gradients` is for custom TensorFlow train steps; "
            "on torch, a custom `train_step(self, data)` accumulates "
            "through `super().train_step(data)`. Received: a call on the "
            "torch backend"
        )


@torch.no_grad()
def _window_gradient(accumulator, plan):
    """`core.window.window_gradient` of the accumulators, in fused calls.

    The same divisions (a sum divided by its term's normaliser, cast to the
    sum's dtype, as `ops.divide_no_nan`), one `torch._foreach_div` per term
    instead of one op dispatch per weight: on the benchmark's MLP the
    per-weight ops cost 2 ms a window.
    """
    gradient = None
    for term, accumulators in enumerate(accumulator.gradients):
        sums = [v.value for v in accumulators]
        if plan.divides[term]:
            normaliser = float(accumulator.normalisers.value[term])
            # `divide_no_nan`: an empty term (normaliser 0) has zero sums
            # and adds 0.
            sums = torch._foreach_div(sums, normaliser or 1.0)
        gradient = (
            list(sums) if gradient is None
            else torch._foreach_add(gradient, sums)
        )
    exists = plan.gradient_exists or (True,) * len(gradient)
    return [g if e else None for g, e in zip(gradient, exists)]


def _batch_size(data):
    return next(
        t for t in keras.tree.flatten(data) if t is not None
    ).shape[0]


def _rows(value, start, size):
    if value is None or not hasattr(value, "shape"):
        return value
    return value[start:start + size]


def _gradients(objective, variables, retain):
    """`d objective / d variables`, `None` for a variable it does not
    reach (as Keras passes a missing gradient)."""
    if not objective.requires_grad:
        return [None] * len(variables)
    return [
        None if g is None else g.detach()
        for g in torch.autograd.grad(
            objective, variables, retain_graph=retain, allow_unused=True
        )
    ]


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _detached(contribution):
    """`contribution` with its logged values out of the autograd graph."""
    contribution.logging_weight = _detach(contribution.logging_weight)
    if contribution.logged_terms is not None:
        contribution.logged_terms = tuple(
            _detach(v) for v in contribution.logged_terms
        )
    contribution.normalisers = _detach(contribution.normalisers)
    return contribution
