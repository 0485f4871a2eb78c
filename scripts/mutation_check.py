"""Mutation check: every named bug must make the tests that name it fail.

Each mutant is one `(file, old_text, new_text)` replacement in a temporary
copy of the repository (`keras_accum/`, `tests/`, `examples/` and
`pyproject.toml`), paired with the pytest node ids that should catch it. The
script applies each mutant to a fresh copy, runs its node ids there and
reports the mutant as

- `caught`: every listed node id had a failing test (each one is a real
  check of that bug, not just the first);
- `survived`: some listed node id passed with the bug in place;
- `error`: pytest could not run (collection error, no test selected), or the
  mutant's search text was not found exactly once: fix the list.

Not run in CI (several minutes); `tests/mutation_check_test.py` checks that
the list still applies to the source. Keep the list growing: every fixed
bug gets a mutant here and a test that catches it.

Usage, from the repository root:

    python scripts/mutation_check.py                 # all mutants
    python scripts/mutation_check.py --list          # names only
    python scripts/mutation_check.py --only no-replica-scaling --jobs 2
    python scripts/mutation_check.py --first-failure # `-x`: any failure
    python scripts/mutation_check.py --baseline      # unmutated: all pass

A test that fails without any mutant would count as catching every bug:
run `--baseline` once after changing the list.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a mutant's tests need: the package, the tests, the example scripts
# (`examples_test.py`) and the pytest configuration.
COPIED = ("keras_accum", "tests", "examples", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One named bug.

    Attributes:
        name: Short unique name.
        path: File to mutate, relative to the repository root.
        old: Text that must occur exactly once in `path`.
        new: Its replacement: the bug.
        tests: Pytest node ids (a function without its parameters selects
            every parametrisation); each must have a failing test.
        backend: The Keras backend the tests run on (`-m backends` off
            TensorFlow). Defaults to `"tensorflow"`.
    """

    name: str
    path: str
    old: str
    new: str
    tests: tuple
    backend: str = "tensorflow"


T_EXACT = "tests/accumulating_model_test.py::TestExactness"
T_NUMERICS = "tests/numerics_test.py"
T_NONFINITE = "tests/numerics_test.py::TestNonFiniteGradients"

T_WORKFLOW = "tests/workflows_test.py::test_workflow"
T_DROPIN = "tests/distributed_dropin_test.py"
T_NORMALISATION = "tests/normalisation_test.py"
T_RULE = "tests/loss_rule_test.py"
T_MICRO = "tests/micro_batch_test.py"
T_NOISE = "tests/noise_scale_test.py"
T_ONE_WINDOW = f"{T_NOISE}::test_windows_match_per_example_gradients"
# The estimator's three checks: the closed form, windows against
# per-example gradients, a finite dataset within sampling error.
NOISE_ESTIMATOR_TESTS = (
    f"{T_NOISE}::test_linear_regression_matches_its_closed_form",
    f"{T_ONE_WINDOW}[ragged]",
    f"{T_NOISE}::test_finite_dataset_within_sampling_error",
)

MUTANTS = (
    # Issue 16: distributed drop-in.
    Mutant(
        "empty-masked-shard-nan-normaliser",
        "keras_accum/core/loss_normalisers.py",
        "    return ops.where(\n"
        "        ops.equal(elements, total),\n"
        "        valid,\n"
        "        ops.divide_no_nan(elements * valid, total),\n",
        "    return (\n"
        "        ops.divide(elements * valid, total),\n",
        (
            f"{T_DROPIN}::TestEmptyReplicaShards::"
            "test_normaliser_of_an_empty_masked_batch_is_zero",
        ),
    ),
    Mutant(
        "replica-count-not-cancelled-exactly",
        "keras_accum/core/objectives.py",
        "    return ops.stop_gradient(normaliser) / applied\n",
        "    return ops.stop_gradient(normaliser) * ops.cast(\n"
        "        __import__(\"tensorflow\").distribute.get_strategy()\n"
        "        .num_replicas_in_sync,\n"
        "        normaliser.dtype,\n"
        "    )\n",
        (
            f"{T_DROPIN}::TestAnyReplicaCount::"
            "test_mlp_on_three_replicas_matches_big_batch",
        ),
    ),
    Mutant(
        "skip-per-replica-shard",
        "keras_accum/backend/tensorflow/accumulation.py",
        "    if context is None or context.num_replicas_in_sync == 1:\n"
        "        return finite\n",
        "    if True:\n"
        "        return finite\n",
        (f"{T_DROPIN}::TestSkipUnderStrategy::test_skips_the_global_micro_batch",),
    ),
    # Issue 13: drop-in for Keras workflows.
    Mutant(
        "accumulators-not-rebuilt",
        "keras_accum/core/lifecycle.py",
        "        if accumulator.matches(trainable_variables, terms):\n",
        "        if accumulator.built:\n",
        (
            "tests/accumulating_model_test.py::TestTrainableSetChanges::"
            "test_accumulators_pair_with_the_current_trainable_weights",
            f"{T_WORKFLOW}[fine-tuning-equal-shapes]",
        ),
    ),
    Mutant(
        "zero-gradient-for-weights-without-one",
        "keras_accum/core/window.py",
        "    exists = plan.gradient_exists or (True,) * len(gradient)\n",
        "    exists = (True,) * len(gradient)\n",
        (f"{T_WORKFLOW}[head-without-loss-adamw]",),
    ),
    Mutant(
        "schedule-window-of-epoch-0-on-first-trace",
        "keras_accum/core/lifecycle.py",
        "                self._schedule.window_size(0)\n"
        "                if self._epoch_window is None\n"
        "                else self._epoch_window\n",
        "                self._schedule.window_size(0)\n",
        (f"{T_WORKFLOW}[schedule-dict-subclass-initial-epoch-1]",),
    ),
    Mutant(
        "custom-train-step-unchecked",
        "keras_accum/accumulating_model.py",
        "            cls.train_step = custom_steps.checked_train_step(step)\n",
        "            pass\n",
        (
            "tests/custom_steps_test.py::"
            "test_step_that_applies_its_own_update_is_refused",
        ),
    ),
    Mutant(
        "several-loss-terms-share-a-normaliser",
        "keras_accum/core/objectives.py",
        "    return max(1, terms)\n",
        "    return 1\n",
        (
            "tests/normalisation_test.py::TestMultiOutput::"
            "test_sum_next_to_mean_is_exact_by_default",
        ),
    ),
    # The 16 mutants of issue 17.
    Mutant(
        "equal-weighting",
        "keras_accum/core/objectives.py",
        "        return objective, replica_scale(normaliser), normaliser, True\n",
        "        return objective, ops.ones((), dtype), ops.ones((), dtype), True\n",
        (
            f"{T_EXACT}::test_epoch_mode_with_ragged_last_batch",
            f"{T_NUMERICS}::test_mixed_precision_close_to_float32_big_batch",
            "tests/misuse_test.py::TestAllowedNeighbours::"
            "test_epoch_window_with_batch_backup",
            "tests/examples_test.py::"
            "test_train_digits_writes_table_plot_models_and_logs",
        ),
    ),
    Mutant(
        "dropped-leftover-window",
        "keras_accum/flush_callback.py",
        "        self.model.apply_accumulated_gradients()\n"
        "        if self._checks_windows:",
        "        self.model.reset_accumulated_gradients()\n"
        "        if self._checks_windows:",
        (f"{T_EXACT}::test_every_n_with_leftover_flush[6-sgd]",),
    ),
    Mutant(
        "update-after-validation",
        "keras_accum/flush_callback.py",
        "        # Validation inside `fit` runs before `on_epoch_end`.\n"
        "        self._apply_pending()",
        "        pass",
        (
            "tests/accumulating_model_test.py::TestFitIntegration::"
            "test_validation_and_callbacks_see_updated_weights",
        ),
    ),
    Mutant(
        "iterations-per-micro-step",
        "keras_accum/backend/tensorflow/micro_step.py",
        "        self._accumulator.count_micro_batch()\n"
        "        return logs\n",
        "        self._accumulator.count_micro_batch()\n"
        "        self.optimizer.iterations.assign_add(1)\n"
        "        return logs\n",
        (
            f"{T_NUMERICS}::"
            "test_sgd_learning_rate_schedule_is_keyed_on_updates",
        ),
    ),
    Mutant(
        "no-reset-after-update",
        "keras_accum/backend/tensorflow/window_update.py",
        "        optimizer.apply(gradients, accumulator.variables)\n"
        "        accumulator.reset()\n",
        "        optimizer.apply(gradients, accumulator.variables)\n",
        (f"{T_EXACT}::test_every_n_with_leftover_flush[4-sgd]",),
    ),
    Mutant(
        "regularisation-per-micro-batch",
        "keras_accum/core/objectives.py",
        "        later = 1.0 - ops.cast(first_in_window, regularisation.dtype)",
        "        later = 0.0 * ops.cast(first_in_window, regularisation.dtype)",
        (
            "tests/normalisation_test.py::"
            "test_every_reduction_with_sample_weights[epoch-sum]",
        ),
    ),
    Mutant(
        "no-replica-scaling",
        "keras_accum/core/objectives.py",
        "    return ops.stop_gradient(normaliser) / applied\n",
        "    return ops.stop_gradient(normaliser)\n",
        (
            "tests/distribution_test.py::TestMirroredStrategy::"
            "test_sgd_update_matches_single_device_big_batch",
        ),
    ),
    Mutant(
        "nonfinite-window-applied",
        "keras_accum/backend/tensorflow/window_update.py",
        "finite = tf.equal(totals[terms], 0)",
        "finite = tf.constant(True)",
        (
            f"{T_NONFINITE}::"
            "test_raise_names_epoch_and_window_and_keeps_weights",
        ),
    ),
    Mutant(
        "window-check-read-too-late",
        "keras_accum/flush_callback.py",
        "                batch + steps_per_execution,",
        "                batch + 2 * steps_per_execution,",
        (
            "tests/interruption_test.py::TestNonFiniteGradients::"
            "test_raise_comes_before_the_next_window_is_applied",
        ),
    ),
    Mutant(
        "window-check-deferred-past-the-next-window",
        "keras_accum/flush_callback.py",
        "        if self._window >= 2 * steps_per_execution:",
        "        if self._window >= steps_per_execution + 1:",
        (
            "tests/interruption_test.py::TestNonFiniteGradients::"
            "test_raise_comes_before_the_next_window_is_applied",
        ),
    ),
    Mutant(
        "window-check-waits-for-the-device",
        "keras_accum/flush_callback.py",
        "        if self._window >= 2 * steps_per_execution:",
        "        if False:",
        (
            "tests/interruption_test.py::TestNonFiniteGradients::"
            "test_window_checks_do_not_wait_for_the_step_just_run",
        ),
    ),
    Mutant(
        "not-zeroed-at-train-begin",
        "keras_accum/flush_callback.py",
        "            self.model.reset_accumulated_gradients()\n"
        "            self._accumulator.skipped.assign(0)",
        "            self._accumulator.skipped.assign(0)",
        (
            "tests/interruption_test.py::TestExceptionMidWindow::"
            "test_next_fit_discards_the_partial_window",
        ),
    ),
    Mutant(
        "mean-with-sample-weight-normaliser",
        "keras_accum/core/loss_normalisers.py",
        "        return ops.sum(weights)",
        "        return ops.cast(ops.size(values), values.dtype)",
        (
            "tests/normalisation_test.py::"
            "test_every_reduction_with_sample_weights[epoch-"
            "mean_with_sample_weight]",
        ),
    ),
    Mutant(
        "schedule-key-lookup",
        "keras_accum/core/window_schedule.py",
        "            start = max(s for s in self._starts if s <= epoch)",
        "            start = min(s for s in self._starts if s <= epoch)",
        (
            "tests/numerics_test.py::TestAccumulationSchedules::"
            "test_dict_schedule_grows_the_window",
            "tests/misuse_test.py::TestAllowedNeighbours::"
            "test_wrap_accepts_a_schedule",
        ),
    ),
    Mutant(
        "accumulate-missing-from-get-config",
        "keras_accum/accumulating_model.py",
        '        config["accumulate"] = self._schedule.get_config()\n',
        # `_accumulation_arguments` also writes the window (as a value): the
        # bug drops it altogether.
        '        config.pop("accumulate")\n',
        (
            "tests/saving_test.py::test_save_load_resume_equals_uninterrupted"
            "[3]",
            "tests/numerics_test.py::TestAccumulationSchedules::"
            "test_dict_schedule_round_trips",
        ),
    ),
    Mutant(
        "wrap-copies-weights",
        "keras_accum/accumulating_model.py",
        "    inputs, outputs = compat_functional.graph_structure(graph)",
        "    graph = keras.models.clone_model(graph)\n"
        "    inputs, outputs = compat_functional.graph_structure(graph)",
        (f"{T_EXACT}::test_wrap_shares_weights_and_is_exact",),
    ),
    Mutant(
        "accumulate-zero-accepted",
        "keras_accum/core/validation.py",
        "    if value < 1:\n",
        "    if value < 0:\n",
        ("tests/validation_test.py::test_bad_accumulate",),
    ),
    Mutant(
        "counters-not-reset-between-fits",
        "keras_accum/flush_callback.py",
        "            self._accumulator.skipped.assign(0)\n"
        "            self._accumulator.discarded.assign(0)\n",
        "",
        (
            f"{T_NONFINITE}::"
            "test_raise_then_clean_fit_counts_no_discarded_window",
            f"{T_NONFINITE}::test_skip_counts_restart_at_each_fit",
        ),
    ),
    Mutant(
        "loss-scale-not-lowered",
        "keras_accum/backend/tensorflow/loss_scale.py",
        "optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)",
        "optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 1.0)",
        (f"{T_NUMERICS}::test_loss_scale_overflow_is_skipped_not_accumulated",),
    ),
    # Finer mutants for the weak tests of issue 17.
    Mutant(
        "discarded-windows-not-reset",
        "keras_accum/flush_callback.py",
        "            self._accumulator.discarded.assign(0)\n",
        "",
        (
            f"{T_NONFINITE}::"
            "test_raise_then_clean_fit_counts_no_discarded_window",
        ),
    ),
    Mutant(
        "skipped-micro-batches-not-reset",
        "keras_accum/flush_callback.py",
        "            self._accumulator.skipped.assign(0)\n",
        "",
        (f"{T_NONFINITE}::test_skip_counts_restart_at_each_fit",),
    ),
    Mutant(
        "update-after-other-callbacks",
        "keras_accum/accumulating_model.py",
        "    return [flush] + existing",
        "    return existing + [flush]",
        (
            f"{T_NUMERICS}::"
            "test_reduce_lr_on_plateau_reduced_rate_drives_the_next_update",
        ),
    ),
    Mutant(
        "overflowed-micro-batch-normaliser-counted",
        "keras_accum/backend/tensorflow/accumulation.py",
        "            tf.math.multiply_no_nan(normalisers, keep),\n",
        "            normalisers,\n",
        (
            f"{T_NUMERICS}::"
            "test_loss_scale_overflow_is_skipped_not_accumulated",
            f"{T_NONFINITE}::test_skip_leaves_out_the_micro_batch_exactly",
        ),
    ),
    # Issue 15 (and 25): activity penalties in a set of their own. The
    # first drops the set; the second is an equivalent mutant on Keras
    # >= 3.14 (where penalties are averaged, not summed): run it with the
    # Python of a Keras 3.10-3.13 environment (scripts/version_matrix.py).
    Mutant(
        "activity-penalty-divided-by-window",
        "keras_accum/core/loss_terms.py",
        "        return self._reduction == \"mean\" and bool(\n",
        "        return False and bool(\n",
        (
            f"{T_NORMALISATION}::"
            "test_activity_and_weight_regularisers_count_once",
            f"{T_NORMALISATION}::"
            "test_activity_regulariser_with_several_loss_terms",
        ),
    ),
    Mutant(
        "activity-penalty-replica-scale-kept",
        "keras_accum/core/objectives.py",
        "        summed_scale = replica_scale(ops.ones((), dtype))\n",
        "        summed_scale = ops.ones((), dtype)\n",
        (
            f"{T_NORMALISATION}::"
            "test_activity_regulariser_under_two_replicas",
        ),
    ),
    # issue 25: the normalisation rule (keras_accum/core/objectives.py,
    # keras_accum/core/loss_attribution.py).
    Mutant(
        "custom-loss-factors-ignored",
        "keras_accum/core/objectives.py",
        "        ops.stop_gradient(ops.cast(c, dtype)) * ops.cast(t.value, dtype)\n",
        "        ops.cast(t.value, dtype)\n",
        (
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_linear_mix_with_regularisers_and_model_losses",
        ),
    ),
    Mutant(
        "unattributed-loss-accepted",
        "keras_accum/core/loss_attribution.py",
        "    if not found.attributed:\n",
        "    if False:\n",
        (
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_part_without_a_known_normaliser_is_refused",
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_compiled_function_returning_a_mean_is_refused",
        ),
    ),
    Mutant(
        "non-linear-loss-accepted",
        "keras_accum/core/loss_attribution.py",
        "    if not found.constant:\n",
        "    if False:\n",
        (
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_non_linear_combination_is_refused",
        ),
    ),
    Mutant(
        "custom-loss-terms-share-one-set",
        "keras_accum/core/loss_terms.py",
        "        self._functions.terms = len(recorded.known_terms)\n",
        "        self._functions.terms = min(1, len(recorded.known_terms))\n",
        (
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_compiled_loss_plus_a_summed_keras_loss",
            f"{T_RULE}::TestCustomComputeLoss::"
            "test_two_keras_losses_with_different_normalisers",
        ),
    ),
    Mutant(
        "add-loss-accepted",
        "keras_accum/core/objectives.py",
        "    if model.reduction == SUM or not recorded.added:\n",
        "    if True:\n",
        (f"{T_RULE}::TestPenalties::test_data_dependent_add_loss_is_refused",),
    ),
    Mutant(
        "activity-penalty-summed-on-keras-3-14",
        "keras_accum/core/objectives.py",
        "    mean_normaliser = ops.cast(examples[0], dtype)\n",
        "    mean_normaliser = ops.cast(examples[0], dtype)\n"
        "    return value, replica_scale(ops.ones((), dtype)), "
        "ops.zeros((), dtype), False\n",
        (
            f"{T_RULE}::TestPenalties::"
            "test_activity_penalty_next_to_a_weighted_loss",
        ),
    ),
    Mutant(
        "unreduced-loss-accepted",
        "keras_accum/core/objectives.py",
        "        if term.reduction == NONE:\n",
        "        if False:\n",
        (f"{T_RULE}::test_unreduced_loss_is_refused",),
    ),
    Mutant(
        "window-of-one-batch-is-plain-keras-under-a-strategy",
        "keras_accum/core/lifecycle.py",
        "            and self._replicas() == 1\n",
        "",
        (
            f"{T_DROPIN}::TestWindowOfOneBatch::"
            "test_masked_loss_matches_the_single_device_batch",
        ),
    ),
    # issue 25: arguments, clone_model, window checks
    Mutant(
        "window-check-counter-kept-across-epochs",
        "keras_accum/flush_callback.py",
        "        self._windows_checked = 0\n"
        "        self._deferred_check = None\n",
        "        self._deferred_check = None\n",
        (
            f"{T_NUMERICS}::"
            "test_raise_checks_the_windows_of_a_later_epoch_from_its_start",
        ),
    ),
    Mutant(
        "skip-ignores-nonfinite-loss",
        "keras_accum/backend/tensorflow/micro_step.py",
        "loss_is_finite=tf.math.is_finite(logged_loss),",
        "loss_is_finite=True,",
        (
            f"{T_NUMERICS}::"
            "test_skip_leaves_out_a_micro_batch_whose_loss_alone_is_not_finite",
        ),
    ),
    Mutant(
        "model-accepts-unknown-keywords",
        "keras_accum/accumulating_model.py",
        "        keras_keywords = self._keras_keywords(args, kwargs)\n",
        "        keras_keywords = None\n",
        (
            "tests/misuse_test.py::TestUnknownKeywordArguments::"
            "test_functional_form_refuses_a_misspelt_keyword",
            "tests/misuse_test.py::TestUnknownKeywordArguments::"
            "test_functional_form_suggests_keras_keywords",
            "tests/misuse_test.py::TestUnknownKeywordArguments::"
            "test_subclassed_form_refuses_a_misspelt_keyword",
        ),
    ),
    Mutant(
        "wrap-accepts-unknown-keywords",
        "keras_accum/accumulating_model.py",
        "        kwargs, ACCUMULATION_ARGUMENTS, \"wrap()\"\n",
        "        {}, ACCUMULATION_ARGUMENTS, \"wrap()\"\n",
        (
            "tests/misuse_test.py::TestUnknownKeywordArguments::"
            "test_wrap_refuses_a_misspelt_keyword",
        ),
    ),
    Mutant(
        "clone-takes-default-arguments",
        "keras_accum/accumulating_model.py",
        "        if isinstance(source, AccumulatingModel):\n",
        "        if False:\n",
        (
            "tests/saving_test.py::"
            "test_clone_model_keeps_the_accumulation_arguments[functional]",
            "tests/saving_test.py::test_clone_model_keeps_the_accumulation_"
            "arguments[wrapped-sequential]",
            "tests/saving_test.py::"
            "test_clone_model_keeps_an_accumulate_schedule",
        ),
    ),
    # issue 25: clipping under a strategy
    Mutant(
        "clip-replica-share-not-window",
        "keras_accum/backend/tensorflow/clipping.py",
        "        context.all_reduce(\n"
        "            tf.distribute.ReduceOp.SUM, "
        "[g for g in gradients if g is not None]\n"
        "        )\n",
        "        [g for g in gradients if g is not None]\n",
        (
            "tests/distribution_test.py::TestClippingUnderStrategy::"
            "test_every_n_window_is_clipped_as_one_big_batch",
            "tests/distribution_test.py::TestClippingUnderStrategy::"
            "test_epoch_window_is_clipped_as_one_big_batch",
        ),
    ),
    # issue 26: micro-batches inside the step
    Mutant(
        "micro-batch-regularisation-per-micro-batch",
        "keras_accum/backend/tensorflow/micro_step.py",
        "            first_in_window = tf.logical_and(\n"
        "                self._accumulator.mini_step.value == 0, first\n"
        "            )\n",
        "            first_in_window = self._accumulator.mini_step.value == 0\n",
        (
            f"{T_MICRO}::TestExactness::"
            "test_sample_weights_and_weight_regularisation",
        ),
    ),
    Mutant(
        "micro-batch-remainder-dropped",
        "keras_accum/backend/tensorflow/micro_batches.py",
        "        self.remainder = rest - self.full * size\n",
        "        self.remainder = 0 * rest\n",
        (f"{T_MICRO}::TestExactness::test_masked_sequences",),
    ),
    Mutant(
        "epoch-end-apply-rebuilt-per-model-code",
        "keras_accum/backend/tensorflow/window_update.py",
        "                functools.partial(apply_function), autograph=False\n",
        "                apply_function, autograph=False\n",
        (
            "tests/accumulating_model_test.py::TestFitIntegration::"
            "test_epoch_end_apply_is_traced_once_per_model",
        ),
    ),
    # PyTorch: tensors are mutable there, which TensorFlow and JAX never
    # showed; each bug below was met while writing the torch backend.
    Mutant(
        "torch-regularisation-aliased",
        "keras_accum/core/objectives.py",
        "    in_loss, objective = ops.zeros((), dtype), ops.zeros((), dtype)\n"
        "    for value, factor, scale in zip(\n"
        "        compat_trainer.regularization_losses(model),\n"
        "        coefficients.regularisation,\n"
        "        coefficients.regularisation_scales,\n"
        "    ):\n"
        "        part = ops.stop_gradient(ops.cast(factor, dtype)) * ops.cast(\n"
        "            ops.sum(value), dtype\n"
        "        )\n"
        "        in_loss = in_loss + part\n"
        "        objective = objective + part * ops.cast(scale, dtype)\n",
        "    in_loss = objective = ops.zeros((), dtype)\n"
        "    for value, factor, scale in zip(\n"
        "        compat_trainer.regularization_losses(model),\n"
        "        coefficients.regularisation,\n"
        "        coefficients.regularisation_scales,\n"
        "    ):\n"
        "        part = ops.stop_gradient(ops.cast(factor, dtype)) * ops.cast(\n"
        "            ops.sum(value), dtype\n"
        "        )\n"
        "        in_loss += part\n"
        "        objective += part * ops.cast(scale, dtype)\n",
        (f"{T_MICRO}::TestExactness::test_sample_weights_and_weight_"
         "regularisation",),
        backend="torch",
    ),
    Mutant(
        "torch-sample-weight-masked-in-place",
        "keras_accum/core/loss_normalisers.py",
        "            None if sample_weight is None else ops.copy(sample_weight),\n",
        "            sample_weight,\n",
        (f"{T_NORMALISATION}::TestMaskedSequences::"
         "test_mean_with_sample_weight_over_masked_tokens",),
        backend="torch",
    ),
    Mutant(
        "torch-micro-batch-remainder-dropped",
        "keras_accum/backend/torch/trainer.py",
        "            for start in range(0, batch, size):\n",
        "            for start in range(0, batch - batch % size, size):\n",
        (f"{T_MICRO}::TestExactness::test_masked_sequences",),
        backend="torch",
    ),
    Mutant(
        "torch-refused-step-keeps-its-update",
        "keras_accum/core/custom_steps.py",
        "            _restore(saved)\n",
        "",
        ("tests/torch_backend_test.py::"
         "test_refused_custom_step_leaves_weights_as_they_were",),
        backend="torch",
    ),
    # The gradient noise scale (`noise_scale=True`): wrong estimators, each
    # caught by `tests/noise_scale_test.py` (closed form, per-example
    # brute force, sampling error).
    Mutant(
        "noise-scale-micro-batch-norm-alone",
        "keras_accum/core/noise_scale.py",
        "    trace = ops.divide_no_nan(q - total * g2, n - 1)\n",
        "    trace = ops.divide_no_nan(q, n)\n",
        NOISE_ESTIMATOR_TESTS,
    ),
    Mutant(
        "noise-scale-window-norm-of-sums",
        "keras_accum/core/noise_scale.py",
        "    g2 = ops.cast(window_squared_norm, dtype)\n",
        "    g2 = ops.cast(window_squared_norm, dtype) * ops.square(\n"
        "        ops.cast(normaliser, dtype)\n"
        "    )\n",
        (
            f"{T_NOISE}::test_linear_regression_matches_its_closed_form",
            f"{T_ONE_WINDOW}[weight-sum]",
            f"{T_NOISE}::test_mirrored_replica_shards_are_micro_batches",
            f"{T_NOISE}::test_finite_dataset_within_sampling_error",
        ),
    ),
    Mutant(
        # The paper's equal-size estimator applied to unequal micro-batches:
        # each at the mean size `B / n`, `Q = (B / n) sum |g_i|^2`. Equal
        # sizes give the same estimate, so only unequal ones catch it.
        "noise-scale-equal-sizes-assumed",
        "keras_accum/core/noise_scale.py",
        "    weight = ops.stack([ops.divide_no_nan(counted, normaliser), "
        "zero])\n",
        "    weight = ops.stack([ops.divide_no_nan(counted, "
        "ops.square(normaliser)), zero])\n",
        (
            f"{T_ONE_WINDOW}[ragged]",
            f"{T_ONE_WINDOW}[weight-sum]",
            f"{T_ONE_WINDOW}[micro-batch-size]",
            f"{T_ONE_WINDOW}[masked-tokens]",
            f"{T_NOISE}::test_mirrored_replica_shards_are_micro_batches",
        ),
    ),
    Mutant(
        # `n` as the window's `fit` batches: wrong with micro-batches split
        # from a batch, replicas' shards, or empty micro-batches.
        "noise-scale-n-counts-fit-batches",
        "keras_accum/core/noise_scale.py",
        "    q, n = sums[0], sums[1]\n",
        "    q, n = sums[0], ops.cast(batches, dtype)\n",
        (
            f"{T_ONE_WINDOW}[weight-sum]",
            f"{T_ONE_WINDOW}[micro-batch-size]",
            f"{T_ONE_WINDOW}[masked-tokens]",
            f"{T_NOISE}::test_mirrored_replica_shards_are_micro_batches",
            f"{T_NOISE}::test_finite_dataset_within_sampling_error",
        ),
    ),
    Mutant(
        "noise-scale-empty-micro-batch-counted",
        "keras_accum/core/noise_scale.py",
        "    base = ops.stack([zero, counted])\n",
        "    base = ops.stack([zero, ops.ones((), dtype)])\n",
        (
            f"{T_ONE_WINDOW}[weight-sum]",
            f"{T_ONE_WINDOW}[skipped-non-finite]",
            f"{T_ONE_WINDOW}[masked-tokens]",
            f"{T_NOISE}::test_mirrored_replica_shards_are_micro_batches",
        ),
    ),
    Mutant(
        "noise-scale-q-not-divided-by-size",
        "keras_accum/core/noise_scale.py",
        "    weight = ops.stack([ops.divide_no_nan(counted, normaliser), "
        "zero])\n",
        "    weight = ops.stack([counted, zero])\n",
        NOISE_ESTIMATOR_TESTS,
    ),
    Mutant(
        "noise-scale-not-debiased",
        "keras_accum/core/noise_scale.py",
        "    trace = float(np.sum(state[trace_slice] / weights))\n"
        "    grad_sq = float(np.sum(state[grad_sq_slice] / weights))\n",
        "    trace = float(np.sum(state[trace_slice]))\n"
        "    grad_sq = float(np.sum(state[grad_sq_slice]))\n",
        NOISE_ESTIMATOR_TESTS,
    ),
    Mutant(
        # Every window reads the same block: the others are never
        # measured, and the sum over blocks never exists.
        "noise-scale-block-not-advanced",
        "keras_accum/core/noise_scale.py",
        "ops.mod(block + 1, blocks)",
        "ops.mod(block, blocks)",
        NOISE_ESTIMATOR_TESTS,
    ),
    Mutant(
        # The window's gradient read at another block than its
        # micro-batches'.
        "jax-noise-scale-window-block-mismatch",
        "keras_accum/backend/jax/window_update.py",
        "                            gradients, "
        "noise_scale.window_block(state),\n",
        "                            gradients, "
        "(noise_scale.window_block(state) + 1) % 8,\n",
        (
            f"{T_ONE_WINDOW}[ragged]",
            f"{T_NOISE}::test_linear_regression_matches_its_closed_form",
        ),
        backend="jax",
    ),
    Mutant(
        # A large variable's block sliced at the wrong offset.
        "noise-scale-large-block-offset",
        "keras_accum/core/noise_scale.py",
        "                ops.square(ops.slice(flat, [block * c], [c]))\n",
        "                ops.square(ops.slice(flat, [block * c // 2], [c]))\n",
        (f"{T_ONE_WINDOW}[wide-layer]",),
        backend="jax",
    ),
    Mutant(
        # The remainder of a variable's last block left out (the bounds
        # TensorFlow's small-variable table and torch's views read).
        "noise-scale-remainder-dropped",
        "keras_accum/core/noise_scale.py",
        "    return block * c, (size if block == blocks - 1 else "
        "(block + 1) * c)\n",
        "    return block * c, (block + 1) * c\n",
        (f"{T_ONE_WINDOW}[ragged]",),
    ),
    Mutant(
        # Each replica's share of the window's gradient, not the
        # all-reduced whole.
        "noise-scale-replica-share-norm",
        "keras_accum/backend/tensorflow/clipping.py",
        "        observe(totals)\n",
        "        observe(gradients)\n",
        (
            f"{T_NOISE}::test_mirrored_replica_shards_are_micro_batches",
        ),
    ),
    Mutant(
        # A sparse gradient's squared norm over its rows as listed: a token
        # repeated in a micro-batch is counted apart.
        "noise-scale-sparse-rows-not-summed",
        "keras_accum/backend/tensorflow/block_norms.py",
        "    rows, index = tf.unique(gradient.indices)\n"
        "    values = tf.math.unsorted_segment_sum(\n"
        "        gradient.values, index, tf.shape(rows)[0]\n"
        "    )\n",
        "    rows = gradient.indices\n"
        "    values = gradient.values\n",
        (f"{T_ONE_WINDOW}[masked-tokens]",),
    ),
    Mutant(
        # A large variable's block read by `tf.slice`: under XLA its start
        # is a compile-time constant, and each window compiles again.
        "noise-scale-xla-block-slice",
        "keras_accum/backend/tensorflow/block_norms.py",
        "        piece = tf.gather(tf.reshape(head, [blocks, c]), block)\n",
        "        piece = tf.slice(flat, [block * c], [c])\n",
        (
            "tests/noise_scale_api_test.py::"
            "test_xla_functions_are_compiled_once_for_every_window",
        ),
    ),
    Mutant(
        # A large variable's remainder (after its `blocks` rows) left out
        # of its last block.
        "noise-scale-tf-large-remainder-dropped",
        "keras_accum/backend/tensorflow/block_norms.py",
        "        if size > blocks * c:\n",
        "        if size < 0:\n",
        (f"{T_ONE_WINDOW}[wide-layer]",),
    ),
    Mutant(
        # A sparse gradient in blocks of whole rows: the last block's
        # remainder rows left out.
        "noise-scale-sparse-remainder-rows-dropped",
        "keras_accum/backend/tensorflow/block_norms.py",
        "                    tf.cast(start + block_rows, indices.dtype), "
        "start + rows)\n",
        "                    tf.cast(start + rows, indices.dtype), "
        "start + rows)\n",
        (f"{T_ONE_WINDOW}[whole-row-blocks]",),
    ),
    Mutant(
        # The window's running sums instead of the micro-batch's gradient.
        "jax-noise-scale-running-sums",
        "keras_accum/backend/jax/accumulation.py",
        "                        term_gradients[0], "
        "noise_scale.window_block(state),\n",
        "                        sums[0], noise_scale.window_block(state),\n",
        (
            f"{T_ONE_WINDOW}[ragged]",
            f"{T_NOISE}::test_finite_dataset_within_sampling_error",
        ),
        backend="jax",
    ),
    Mutant(
        "torch-noise-scale-running-sums",
        "keras_accum/backend/torch/accumulators.py",
        "            norm = squared_norm(self._noise_block_pieces(added))\n",
        "            norm = squared_norm(self._noise_block_pieces(totals))\n",
        (
            f"{T_ONE_WINDOW}[ragged]",
            f"{T_NOISE}::test_finite_dataset_within_sampling_error",
        ),
        backend="torch",
    ),
    Mutant(
        # The window's gradient measured after the optimizer clips it.
        "torch-noise-scale-measured-after-clipping",
        "keras_accum/backend/torch/trainer.py",
        "            accumulator.update_noise_scale(gradients)\n",
        "            accumulator.update_noise_scale(\n"
        "                self.optimizer._clip_gradients(gradients)\n"
        "            )\n",
        (
            f"{T_ONE_WINDOW}[clipnorm]",
        ),
        backend="torch",
    ),
)


def apply(mutant, root):
    """Applies `mutant` to the copy at `root`.

    Raises:
        ValueError: if the search text does not occur exactly once.
    """
    path = pathlib.Path(root) / mutant.path
    source = path.read_text()
    count = source.count(mutant.old)
    if count != 1:
        raise ValueError(
            f"Mutant {mutant.name!r}: its search text must occur exactly once "
            f"in {mutant.path}. Received: {count} occurrences"
        )
    path.write_text(source.replace(mutant.old, mutant.new))


def copy_repository(destination):
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy2(source, destination / name)


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def _covers(target, node_id):
    return node_id == target or node_id.startswith((target + "::",
                                                    target + "["))


def run_mutant(mutant, workers, first_failure, python):
    """Returns (status, seconds, detail) for one mutant.

    `mutant=None` runs every mutant's tests on the unmutated copy instead
    (status `"passed"` when they all pass).
    """
    start = time.perf_counter()
    name = mutant.name if mutant else "baseline"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        root = pathlib.Path(tmp)
        copy_repository(root)
        if mutant is None:
            tests = sorted({t for m in MUTANTS for t in m.tests})
        else:
            tests = mutant.tests
            try:
                apply(mutant, root)
            except ValueError as error:
                return "error", time.perf_counter() - start, str(error)
        backend = mutant.backend if mutant else "tensorflow"
        command = [
            python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
            "-n", str(workers), *(["-x"] if first_failure else []),
            *(["-m", "backends"] if backend != "tensorflow" else []),
            *tests,
        ]
        env = dict(os.environ, PYTHONPATH=str(root),
                   KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(command, cwd=root, env=env,
                                capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    failed = _FAILED.findall(output)
    if mutant is None:
        status = "passed" if result.returncode == 0 else "failed"
        return status, seconds, "\n".join(failed) or output[-2000:] * (
            result.returncode != 0
        )
    if result.returncode not in (0, 1):
        return "error", seconds, f"pytest exit {result.returncode}\n" + (
            output[-2000:]
        )
    if first_failure:
        status = "caught" if result.returncode == 1 else "survived"
        return status, seconds, ""
    missed = [t for t in mutant.tests
              if not any(_covers(t, node) for node in failed)]
    if missed:
        return "survived", seconds, "passed with the bug: " + ", ".join(missed)
    return "caught", seconds, ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these mutants")
    parser.add_argument("--list", action="store_true",
                        help="print the mutants and their tests, then exit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="mutants run at once (each its own pytest)")
    parser.add_argument("--workers", type=int, default=0,
                        help="pytest-xdist workers per mutant (0: none)")
    parser.add_argument("--baseline", action="store_true",
                        help="run every mutant's tests without a mutant; "
                        "they must all pass")
    parser.add_argument("--first-failure", action="store_true",
                        help="pytest -x: caught at the first failing test, "
                        "instead of requiring every listed test to fail")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown mutant(s): {unknown}. Known: {sorted(names)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}  ({mutant.path})")
            for test in mutant.tests:
                print(f"    {test}")
        return 0
    if args.baseline:
        status, seconds, detail = run_mutant(None, args.workers, False,
                                             sys.executable)
        print(f"baseline {status} in {seconds:.0f} s")
        if detail:
            print(detail)
        return 0 if status == "passed" else 1

    start = time.perf_counter()
    results = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            pool.submit(run_mutant, m, args.workers, args.first_failure,
                        sys.executable): m
            for m in mutants
        }
        for future, mutant in futures.items():
            status, seconds, detail = future.result()
            results[mutant.name] = status
            print(f"{status:8s} {seconds:6.0f} s  {mutant.name}", flush=True)
            if detail:
                print("         " + detail.replace("\n", "\n         "))
    caught = sum(status == "caught" for status in results.values())
    total = time.perf_counter() - start
    print(f"\nMutation score: {caught}/{len(results)} caught "
          f"({100 * caught / max(len(results), 1):.0f}%) in {total:.0f} s.")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
