"""The logged training loss of windows with several loss terms.

Keras logs `loss` through a `keras.metrics.Mean` fed each batch's loss,
weighted by the batch's examples. One big batch's loss is a sum of terms,
each the term's weighted sum over the batch divided by that batch's
normaliser (examples, valid mask entries or sample-weight sum). With one term
the micro-batches' losses, weighted by their normalisers, average to that
exactly. With several terms whose normalisers are not proportional no single
weight does: the window's loss needs each term's summed numerator and
normaliser, and is only known once the window is complete. `WindowLoss`
keeps them, and folds each finished window into the epoch's mean, weighted
by its examples as Keras weights a big batch.

Backend-neutral: only `keras.ops` and metric variables.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_accum")
class WindowLoss(keras.metrics.Mean):
    """Mean loss of an epoch, with exact windows of several loss terms.

    A `keras.metrics.Mean` (fed by `update_state` as Keras feeds its loss
    tracker: evaluation, single-term and unaccumulated steps) that also
    takes micro-batches term by term through `update_window`. A window's
    loss is `sum_t A_t / D_t`, where `A_t` is term `t`'s weighted sum over
    the window's micro-batches and `D_t` its summed normaliser (a term with
    `D_t == 0`, a summed term or one with no valid entry, counts `A_t`), as
    Keras computes it on the window's examples as one batch. When the next
    window starts, the finished one enters the mean with its number of
    examples as weight, as `fit` weights a big batch; `result()` includes
    the window in progress the same way. In epoch mode (one window) the
    result is the big batch's loss itself.

    Under a `tf.distribute` strategy the variables are summed over replicas
    when read outside the step, so the window in progress is exact; a
    finished window is folded by each replica on its own share, which is
    exact for one replica and an approximation with several (every-N mode).

    Args:
        name: Defaults to `"loss"`.
        dtype: The metric's dtype. Defaults to `keras.backend.floatx()`.

    Example:

    >>> loss = WindowLoss()
    >>> loss.build_window(2)
    >>> # Two micro-batches; term 0 normalised by 1 and 3 examples, term 1
    >>> # (a summed loss) by nothing.
    >>> loss.update_window([2.0, 5.0], [1.0, 0.0], 1, first_in_window=True)
    >>> loss.update_window([4.0, 1.0], [3.0, 0.0], 3, first_in_window=False)
    >>> float(loss.result())  # (2 * 1 + 4 * 3) / 4 + (5 + 1)
    9.5
    """

    def __init__(self, name="loss", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.window_sums = None
        self.window_normalisers = None
        self.window_examples = None

    def build_window(self, terms):
        """Creates the state of a window of `terms` loss terms.

        Call it where variables may be created (eagerly, or on the step's
        first trace); a second call with the same `terms` does nothing.

        Args:
            terms: Int >= 1, the number of entries `update_window` takes.

        Raises:
            ValueError: if the window state exists with another size.
        """
        if self.window_sums is not None:
            if self.window_sums.shape[0] != terms:
                raise ValueError(
                    "`WindowLoss` was built for "
                    f"{self.window_sums.shape[0]} loss terms; compile the "
                    "model again to change them. Received: "
                    f"terms={terms}"
                )
            return
        self.window_sums = self.add_variable(
            shape=(terms,), initializer="zeros", dtype=self.dtype,
            name="window_sums",
        )
        self.window_normalisers = self.add_variable(
            shape=(terms,), initializer="zeros", dtype=self.dtype,
            name="window_normalisers",
        )
        self.window_examples = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype,
            name="window_examples",
        )

    def update_window(self, values, normalisers, examples, first_in_window):
        """Adds one micro-batch, term by term.

        Args:
            values: Vector, each term's loss on the micro-batch as Keras
                reduced it (its weighted sum divided by its normaliser, or
                the sum itself where the normaliser is 0).
            normalisers: Vector, each term's normaliser on the micro-batch;
                0 for a summed term.
            examples: Scalar, the micro-batch's examples (its weight in the
                epoch's mean). 0 leaves the micro-batch out.
            first_in_window: Scalar bool, whether the micro-batch starts a
                window: the previous window, if any, is folded into the mean
                first.
        """
        values = ops.cast(values, self.dtype)
        normalisers = ops.cast(normalisers, self.dtype)
        examples = ops.cast(examples, self.dtype)
        # Fold the finished window with arithmetic, not a branch: its
        # weight is 0 unless a window starts here.
        fold = ops.cast(first_in_window, self.dtype)
        # Values, not variables, in the arithmetic: inside JAX's stateless
        # step a variable stands for its value in the step's state.
        window_sums = ops.convert_to_tensor(self.window_sums)
        window_normalisers = ops.convert_to_tensor(self.window_normalisers)
        window_examples = ops.convert_to_tensor(self.window_examples)
        finished = fold * window_examples
        self.total.assign_add(finished * self._window_loss())
        self.count.assign_add(finished)
        keep = 1.0 - fold
        # `values * normalisers` is the term's weighted sum; a summed term
        # (normaliser 0) adds its value itself.
        sums = ops.where(
            ops.not_equal(normalisers, 0), values * normalisers, values
        )
        self.window_sums.assign(keep * window_sums + sums)
        self.window_normalisers.assign(
            keep * window_normalisers + normalisers
        )
        self.window_examples.assign(keep * window_examples + examples)

    def _window_loss(self):
        sums = ops.convert_to_tensor(self.window_sums)
        normalisers = ops.convert_to_tensor(self.window_normalisers)
        per_term = ops.where(
            ops.not_equal(normalisers, 0),
            ops.divide_no_nan(sums, normalisers),
            sums,
        )
        return ops.sum(per_term)

    def reset_state(self):
        super().reset_state()
        if self.window_sums is not None:
            # `zeros`, not `zeros_like(variable)`: a variable is no array
            # inside JAX's stateless step, and Keras 3.10 on JAX with
            # NumPy >= 2.3 cannot take its (string) dtype.
            for variable in (self.window_sums, self.window_normalisers):
                variable.assign(ops.zeros(variable.shape, variable.dtype))
            self.window_examples.assign(0)

    def result(self):
        if self.window_sums is None:
            return super().result()
        examples = ops.convert_to_tensor(self.window_examples)
        return ops.divide_no_nan(
            ops.convert_to_tensor(self.total) + examples * self._window_loss(),
            ops.convert_to_tensor(self.count) + examples,
        )


def log_micro_batch(tracker, loss, contribution, first_in_window, kept=None):
    """Feeds one micro-batch's loss to the model's loss tracker.

    Args:
        tracker: The model's loss tracker, a `WindowLoss` or a
            `keras.metrics.Mean`.
        loss: Scalar, the micro-batch's total loss (unscaled).
        contribution: Its `objectives.MicroBatchContribution`; terms go to
            `WindowLoss.update_window` when it carries `logged_terms`,
            otherwise `loss` is weighted by its `logging_weight`.
        first_in_window: Scalar bool, whether it starts a window.
        kept: Scalar bool, or `None` for always: under
            `on_nonfinite="skip"`, whether the micro-batch was accumulated
            (a skipped one is left out of the logged loss).
    """
    terms = contribution.logged_terms
    if terms is None or not isinstance(tracker, WindowLoss):
        weight = contribution.logging_weight
        if kept is not None:
            # `where`, not a product: the loss may be NaN or infinite.
            loss = ops.where(kept, loss, ops.zeros_like(loss))
            weight = ops.where(kept, weight, ops.zeros_like(weight))
        tracker.update_state(loss, sample_weight=weight)
        return
    values, normalisers, examples = terms
    if kept is not None:
        values = ops.where(kept, values, ops.zeros_like(values))
        normalisers = ops.where(kept, normalisers, ops.zeros_like(normalisers))
        examples = ops.where(kept, examples, ops.zeros_like(examples))
    tracker.build_window(values.shape[0])  # Done already under a strategy.
    tracker.update_window(values, normalisers, examples, first_in_window)


def build_for(tracker, terms):
    """Creates a `WindowLoss` tracker's window state for `terms` loss terms.

    Under a strategy the step runs in replica context, where creating
    variables is best avoided: the model builds this state eagerly, with
    its accumulators. Nothing to do for one term, which is logged through
    `update_state`.

    Args:
        tracker: The model's loss tracker.
        terms: The number of separately normalised loss terms, or `None`
            while the compiled loss is not built.
    """
    if isinstance(tracker, WindowLoss) and terms is not None and terms > 1:
        # One entry per term, and one for the rest of the loss.
        tracker.build_window(terms + 1)
