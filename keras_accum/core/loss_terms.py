"""The loss-term bookkeeping of `AccumulatingModel`, for every backend.

How many accumulator sets a step needs: one set per Keras loss term where
`objectives.term_sets` asks for it (the terms counted from the traced
step, the compiled loss, or a symbolic run before the step is compiled),
and one for the activity penalties; then what each micro-batch adds to
them, by the rule of `objectives`.
"""

import keras

from keras_accum._compat import regularisers as compat_regularisers
from keras_accum._compat import trainer as compat_trainer
from keras_accum.core import loss_attribution
from keras_accum.core import loss_normalisers
from keras_accum.core import objectives


class LossTerms:
    """The Keras loss terms of a step, and each micro-batch's contribution.

    A mixin of `AccumulatingModel`, before `keras.Model`, whose
    `_aggregate_additional_loss` and `_symbolic_build` it extends. It reads
    the model's `_reduction`, `_loss_normalisation`, `_accumulator` and
    `_functions` (a `StepFunctions`).
    """

    def _loss_terms(self):
        """Number of accumulator sets, `None` while unknown: the Keras loss
        terms' sets (see `objectives.term_sets`), and one for the activity
        penalties (see `_activity_set`).

        The Keras loss terms of a step are those the traced step records
        (`StepFunctions.terms`), or, before, the compiled ones when the
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
                compiled = compat_trainer.compiled_losses(self)
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
            compat_regularisers.activity_regularised_layers(self)
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
            data_batch = compat_trainer.first_batch(iterator)
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
                loss = compat_trainer.compute_loss(
                    self, x=x, y=y, y_pred=y_pred,
                    sample_weight=sample_weight, training=True,
                )
            self._note_loss_terms(recorded)
            return loss

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            keras.tree.map_structure(_symbolic, data_batch)
        )
        try:
            compat_trainer.compute_output_spec(
                loss_terms, x, y, sample_weight
            )
        except Exception:  # noqa: BLE001
            # A model that cannot run symbolically: its traced step counts
            # the terms instead (and refuses what it must).
            self._functions.terms = None

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
        contribution = objectives.micro_batch_contribution(
            self, recorded, loss, batch_size, first_in_window, coefficients,
            sets, activity_set,
        )
        if self._noise_scale and contribution.divides != (True,):
            raise ValueError(
                "`noise_scale=True` measures the noise of one mean gradient, "
                "and this step's loss is accumulated in "
                f"{len(contribution.divides)} part(s) normalised apart "
                "(several loss terms, activity penalties, or a summed "
                "loss), whose micro-batches have no single batch size. Use "
                "one loss term with a mean reduction, or "
                "loss_normalisation=\"shared\" for terms with proportional "
                "normalisers. Received: accumulator sets with divides="
                f"{contribution.divides}"
            )
        return contribution


def _symbolic(value):
    """A `keras.KerasTensor` like `value` (`None` stays `None`)."""
    if value is None:
        return None
    return keras.KerasTensor(
        value.shape, keras.backend.standardize_dtype(value.dtype)
    )
