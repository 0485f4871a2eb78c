"""Generated differential harness: random workflows, keras_accum vs Keras.

Issue 25, part 3. The enumerated harness (`workflows_test.py`) holds the
rows someone thought of; this one draws workflows from a grammar of the
features users combine (`tests/workflow_grammar.py`: model form, loss
set-up, masks, sample and class weights, custom `compute_loss`,
regularisers, `add_loss`, optimizer features, window, `fit` arguments, one
or two devices) and runs each twice in float64: through `AccumulatingModel`
fed micro-batches (under `MirroredStrategy` over two logical CPUs on
TensorFlow, `keras.distribution.DataParallel` over two host devices on JAX,
where drawn), and through a plain `keras.Model` fed one big batch per window
on one device.

Verdict per workflow:

* exact: weights, updates and logged losses within `RTOL` (1e-9, on JAX
  too: conftest.py keeps Keras' float64 in float64) of the reference; or
* a clear refusal (`is_clear_refusal`): a `ValueError`, `TypeError` or
  `NotImplementedError` raised by keras_accum's own code (a frame of the
  `keras_accum` package raised it) whose message echoes the offending value
  after "Received" (STYLE.md, point 5);
* with `noise_scale=True` (the gradient noise scale measured), decided by
  an oracle written from the features (`noise_scale_refusal`), not by the
  library: refused, with an error that names `noise_scale`, exactly where
  the noise scale cannot be measured; elsewhere exact as with it off (the
  measurement never changes training), with a finite estimate (or none)
  and one logged `noise_scale` per epoch;
* skipped (and counted) when the reference itself fails or diverges
  (non-finite, or its loss grows 100-fold): round-off decides chaotic runs;
  or when the accumulating run fails where plain Keras, compiled as it is
  (the reference runs eagerly), fails too: a Keras bug, not a silent one;
* anything else fails, printing the seed, the drawn features and what
  differs from the simplest workflow.

Runs:

* CI slice: `SLICE_SEEDS`, fixed, on the backend of the run
  (`pytest tests/generated_workflows_test.py`; on JAX and torch add
  `-m backends`).
* Long run: `KERAS_ACCUM_FUZZ_EXAMPLES=500 pytest -n 2
  tests/generated_workflows_test.py` draws 500 workflows from seeds
  `10000...` (`KERAS_ACCUM_FUZZ_START` moves the first seed).
* Reproduce: `KERAS_ACCUM_FUZZ_SEEDS=10042,10077` runs those seeds;
  `KERAS_ACCUM_FUZZ_FEATURES="{'loss': 'custom_terms', ...}"` runs one
  feature dict (missing keys from `workflow_grammar.BASE`). With
  `KERAS_ACCUM_FUZZ_SHRINK=1` a failure is shrunk to the fewest features
  that still fail before it is reported.
"""

import ast
import collections
import dataclasses
import os
import traceback

import keras
import numpy as np
import pytest

# The workflows (`tests/workflows.py`) build `tf.distribute` strategies; a
# JAX environment without TensorFlow (the version matrix's floor) skips.
pytest.importorskip("tensorflow")

from tests import workflow_grammar as grammar  # noqa: E402
from tests.helpers import RTOL  # noqa: E402
from tests.helpers import NaiveAveragingModel  # noqa: E402
from tests.helpers import fresh_keras_state  # noqa: E402
from tests.workflows import Side  # noqa: E402
from tests.workflows_test import _describe  # noqa: E402
from tests.workflows_test import _differences  # noqa: E402

pytestmark = pytest.mark.backends

BACKEND = keras.backend.backend()

# Fixed: the first seven, a greedy cover of seeds 0-299, draw every form,
# input, task, reduction, loss kind, optimizer feature, window kind, `fit`
# argument and both device counts (`test_slice_covers_the_grammar`); then
# four of the first seeds of the range, three custom `compute_loss`
# combinations (a sum and a weighted sum on two devices, a square root),
# and two `micro_batch_size`s on two devices (masked, frozen between
# fits; sample-weighted with `steps_per_execution`). 40056: a custom
# `compute_loss` refrozen between fits, which crashed the torch step (its
# loss check wrote back the frozen weights the forward pass had used).
# With `noise_scale` drawn (last), 109 and 43 drew it on and were refused
# at their first step, testing neither their custom loss nor their
# micro-batches: 4990 and 8097 (noise scale off) took their places. Then
# the noise scale: measured on a loaded model (masked, sample-weighted, on
# two devices, micro-batches, two fits), 81675; refused for a summed and
# a mean loss term (two compiled outputs, on two devices), 222; measured
# across a freeze and a new `compile()` between two fits, 50018 (the
# TensorFlow step, rebuilding its accumulators inside the trace, read the
# old estimate with NumPy and crashed).
SLICE_SEEDS = (30, 55, 293, 24, 131, 98, 18, 0, 3, 5, 112, 4990, 144, 8097,
               49, 40056, 81675, 222, 50018)

# Seeds of the slice that fail against the current library, by backend:
# strict, so a fix shows up as an XPASS to remove here. Empty since issue
# 25's fixes (the slice found clone_model, custom compute_loss, penalty
# and clipping failures before them).
KNOWN_FAILURES = {"tensorflow": {}, "jax": {}, "torch": {}}

REFUSAL_TYPES = (ValueError, TypeError, NotImplementedError)
_LIBRARY = os.path.dirname(grammar.keras_accum.__file__)

# Verdicts of this process's generated workflows, printed at the end.
TALLY = collections.Counter()


def _seeds():
    explicit = os.environ.get("KERAS_ACCUM_FUZZ_SEEDS")
    if explicit:
        return [int(s) for s in explicit.split(",") if s.strip()]
    count = os.environ.get("KERAS_ACCUM_FUZZ_EXAMPLES")
    if count:
        start = int(os.environ.get("KERAS_ACCUM_FUZZ_START", "10000"))
        return list(range(start, start + int(count)))
    return list(SLICE_SEEDS)


def _features(seed):
    literal = os.environ.get("KERAS_ACCUM_FUZZ_FEATURES")
    if literal:
        return grammar.resolve({**grammar.BASE, **ast.literal_eval(literal)})
    return grammar.draw(seed)


def is_clear_refusal(error):
    """Whether `error` is a clear refusal (see the module docstring)."""
    if not isinstance(error, REFUSAL_TYPES) or "Received" not in str(error):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.filename.startswith(_LIBRARY) for frame in frames[-3:])


def noise_scale_refusal(features):
    """Why `noise_scale=True` must be refused for `features`, or `None`.

    The documented rule, written from the features: the noise scale
    compares the mean gradients of micro-batches and of the window, so it
    needs windows of at least two micro-batches and a step's loss
    accumulated as ONE set divided by its normaliser. Refused:

    * at construction, windows of one micro-batch: `accumulate=1` without
      a `micro_batch_size` (and the model's `reduction="sum"`, which the
      grammar does not draw);
    * at the first step, a loss accumulated in several parts or a summed
      one: several Keras loss terms (two compiled outputs, or a custom
      `compute_loss` calling two Keras losses: `loss_normalisation="auto"`
      keeps one set per term), an activity regulariser (its penalties have
      a set of their own on every Keras version), or a single term with
      reduction `"sum"` (summed over the window, not divided).

    Weight regularisation, masks, sample and class weights, clipping,
    schedules and devices leave one divided set: measured.
    """
    if not features["noise_scale"]:
        return None
    if features["accumulate"] == 1 and features["micro_batch_size"] is None:
        return "windows of one micro-batch (accumulate=1)"
    terms = features["outputs"] if features["loss"] == "compiled" else 2
    if terms > 1:
        return f"{terms} Keras loss terms, one accumulator set each"
    if features["activity_regularizer"]:
        return "activity penalties, an accumulator set of their own"
    if features["reductions"] == ["sum"]:
        return "a single loss term with reduction \"sum\", not divided"
    return None


def refused_before_the_noise_scale(features):
    """Whether the first step refuses `features` whatever `noise_scale`,
    by a check that runs before the noise scale's: a loss passed to
    `add_loss` (no normaliser Keras reports), or a custom `compute_loss`
    that is not a fixed linear combination of Keras losses."""
    return features["add_loss"] or (
        features["loss"] != "compiled"
        and features["custom_combination"] in ("hand_written_mean", "sqrt")
    )


def _construction_refusal(reason):
    return reason is not None and reason.startswith("windows of one")


def _judge_refusal(features, text):
    """A clear refusal's verdict, by the noise-scale oracle."""
    names_it = "noise_scale" in text
    expected = noise_scale_refusal(features)
    if expected is None:
        if names_it:
            return "mismatch", (
                "refused for the noise scale, which the rule measures "
                f"here: {text}"
            )
        return "refused", text
    if not names_it and (
        _construction_refusal(expected)
        or not refused_before_the_noise_scale(features)
    ):
        return "mismatch", (
            f"the noise scale must be refused ({expected}), but the error "
            f"does not name `noise_scale`: {text}"
        )
    return "refused", text


def noise_scale_problem(features, noise):
    """What is wrong with the accumulating run's noise scale
    (`grammar.NoiseScale`) once it trained, or `None`."""
    if noise.enabled != features["noise_scale"]:
        return (
            f"model.noise_scale is {noise.enabled!r} after building it as "
            f"{features['form']!r} with noise_scale="
            f"{features['noise_scale']!r}"
        )
    if not features["noise_scale"]:
        if any(logged is not None for logged in noise.logged):
            return f"noise_scale logged while off: {noise.logged}"
        return None
    expected = noise_scale_refusal(features)
    if expected is not None:
        return f"trained, but the rule refuses the noise scale: {expected}"
    estimate = noise.estimate
    if estimate is not None and not (
        np.isfinite(estimate.trace) and np.isfinite(estimate.grad_sq)
    ):
        return f"non-finite noise_scale_estimate: {estimate}"
    counts = [None if v is None else len(v) for v in noise.logged]
    if counts != [grammar.EPOCHS] * len(noise.logged):
        return (
            f"history['noise_scale'] has {counts} entries per fit, not "
            f"one per epoch ({grammar.EPOCHS}): {noise.logged}"
        )
    return None


def _run(features, accumulating, eager_reference=True):
    fresh_keras_state()
    previous = keras.backend.floatx()
    # Not the `float64` fixture: `shrink` reruns outside the test's setup.
    keras.backend.set_floatx("float64")
    try:
        return grammar.run(
            features, Side(accumulating, eager_reference=eager_reference)
        )
    finally:
        keras.backend.set_floatx(previous)


def logged_keys(features):
    """The logs both sides must agree on, by Keras' own semantics.

    Weights and `iterations` are always compared. A logged loss is a mean of
    per-batch values weighted by examples, so plain Keras' own log changes
    with the batch size unless every batch's loss is an example mean: a
    `"sum"` or `"mean_with_sample_weight"` reduction, masks, and sample or
    class weights make it batch-size dependent (docs/semantics.md, "What is logged":
    keras_accum logs its mini-batches' losses). With several compiled terms
    keras_accum logs each window as plain Keras' one batch (docs/
    semantics.md; one device or epoch mode), so `loss` is compared then;
    `val_loss` comes from `evaluate` with each side's batch size.
    """
    example_mean = (
        all(r == "sum_over_batch_size" for r in features["reductions"])
        and features["input"] == "dense"
        and not (features["sample_weight"] or features["class_weight"])
    )
    if features["loss"] != "compiled":
        return set()
    keys = {"loss", "val_loss"} if example_mean else set()
    if features["outputs"] == 2 and (
        features["devices"] == 1 or features["accumulate"] == "epoch"
    ):
        keys.add("loss")
    return keys


def _comparable(outcome, keys):
    history = {k: v for k, v in outcome.history.items() if k in keys}
    return dataclasses.replace(outcome, history=history)


def _diverged(outcome):
    if not all(np.all(np.isfinite(w)) for w in outcome.weights):
        return "non-finite weights"
    for key, values in outcome.history.items():
        values = np.asarray(values, np.float64)
        if not np.all(np.isfinite(values)):
            return f"non-finite {key}"
        if key == "loss" and abs(values[-1]) > 100 * abs(values[0]) + 1e-12:
            return f"loss grew from {values[0]:.3g} to {values[-1]:.3g}"
    return None


def judge(features):
    """`(verdict, detail)`: verdict is "exact", "refused", "skipped",
    "mismatch" or "crash"."""
    try:
        reference = _run(features, accumulating=False)
    except Exception as error:  # noqa: BLE001 - plain Keras refuses it.
        return "skipped", f"reference raised {type(error).__name__}: {error}"
    reason = _diverged(reference)
    if reason:
        return "skipped", f"reference diverged: {reason}"
    try:
        outcome = _run(features, accumulating=True)
    except Exception as error:  # noqa: BLE001 - judged below.
        text = f"{type(error).__name__}: {str(error)[:2000]}"
        if is_clear_refusal(error):
            return _judge_refusal(features, text)
        try:
            # The reference runs eagerly; plain Keras compiled, as the
            # accumulating run is, may fail the same way (on JAX, Keras
            # 3.15 donates one buffer twice in a second `fit` with
            # `use_ema=True`).
            _run(features, accumulating=False, eager_reference=False)
        except Exception as keras_error:  # noqa: BLE001
            return "skipped", (
                f"plain Keras compiled fails too: "
                f"{type(keras_error).__name__}: {keras_error}"
            )
        return "crash", text + "\n" + "".join(
            traceback.format_exception(error)[-6:]
        )
    problem = noise_scale_problem(features, outcome.noise_scale)
    if problem:
        return "mismatch", problem
    keys = logged_keys(features)
    errors = _differences(
        _comparable(outcome, keys), _comparable(reference, keys)
    )
    worst = max(errors.values())
    if worst <= RTOL:
        return "exact", f"relative error {worst:.3g}"
    return "mismatch", _describe(errors, outcome, reference)


def _failing(features):
    return judge(features)[0] in ("mismatch", "crash")


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    """Prints this process's verdicts (`pytest -rP` or `-s` shows them)."""
    yield
    if TALLY:
        print(f"\ngenerated workflows on {BACKEND}: {dict(TALLY)}")


def _params():
    known = KNOWN_FAILURES.get(BACKEND, {})
    params = []
    for seed in _seeds():
        marks = [pytest.mark.slow]
        if seed in known and not os.environ.get("KERAS_ACCUM_FUZZ_FEATURES"):
            marks.append(pytest.mark.xfail(strict=True, reason=known[seed]))
        params.append(pytest.param(seed, id=f"seed-{seed}", marks=marks))
    return params


@pytest.mark.parametrize("seed", _params())
def test_generated_workflow(seed, record_property):
    """Each generated workflow: exact against plain Keras, or refused."""
    features = _features(seed)
    verdict, detail = judge(features)
    TALLY[verdict] += 1
    if features["noise_scale"]:
        TALLY[f"noise_scale {verdict}"] += 1
    record_property("verdict", verdict)
    record_property("features", repr(grammar.describe(features)))
    if verdict == "skipped":
        pytest.skip(f"seed {seed}: {detail}")
    if verdict in ("exact", "refused"):
        return
    minimal = features
    if os.environ.get("KERAS_ACCUM_FUZZ_SHRINK"):
        minimal = grammar.shrink(features, _failing)
        verdict, detail = judge(minimal)
    pytest.fail(
        f"generated workflow seed={seed} on {BACKEND}: {verdict}: {detail}\n"
        f"features (changed from BASE): {grammar.describe(minimal)!r}\n"
        f"all features: {minimal!r}\n"
        f"reproduce: KERAS_ACCUM_FUZZ_SEEDS={seed} (or "
        f"KERAS_ACCUM_FUZZ_FEATURES=\"{grammar.describe(minimal)!r}\")",
        pytrace=False,
    )


def test_slice_covers_the_grammar():
    """The CI slice draws every value of the grammar's main features.

    Catches a grammar change that silently drops a feature from CI (the
    seeds are fixed, the draws are not).
    """
    drawn = [grammar.draw(seed) for seed in SLICE_SEEDS]
    seen = collections.defaultdict(set)
    for f in drawn:
        for key, value in f.items():
            seen[key].add(repr(value))
        for reduction in f["reductions"] + (f["custom_reductions"] or []):
            seen["reduction"].add(reduction)
    expected = {
        "form": set(map(repr, grammar.FORMS)),
        "input": {"'dense'", "'masking'", "'embedding'"},
        "loss": {"'compiled'", "'custom_terms'", "'custom_plus_super'"},
        "reduction": set(grammar.REDUCTIONS),
        # Keras on torch has one device (see `workflow_grammar.resolve`).
        "devices": {"1"} if BACKEND == "torch" else {"1", "2"},
        "fits": {"1", "2"},
        "micro_batch_size": {"None", "2", "3"},
    }
    for key, values in expected.items():
        assert values <= seen[key], (key, values - seen[key])
    for key in ("sample_weight", "class_weight", "kernel_regularizer",
                "activity_regularizer", "add_loss", "weight_decay", "ema",
                "lr_schedule", "validation", "freeze"):
        assert "True" in seen[key], key
    assert {"'clipnorm'", "'global_clipnorm'", "'clipvalue'"} <= seen["clip"]
    assert {"'epoch'", "{0: 2, 1: 3}"} <= seen["accumulate"]
    assert set(map(repr, grammar.COMBINATIONS)) <= seen["custom_combination"]
    # The noise scale both measured and refused by its own rule (not only
    # refused first for another reason).
    noise = [f for f in drawn if f["noise_scale"]]
    assert any(noise_scale_refusal(f) is None
               and not refused_before_the_noise_scale(f) for f in noise)
    assert any(noise_scale_refusal(f) is not None
               and not refused_before_the_noise_scale(f) for f in noise)


def test_draws_are_reproducible():
    """A seed names one workflow: what a failure message relies on."""
    assert [grammar.draw(s) for s in range(50)] == [
        grammar.draw(s) for s in range(50)
    ]
    for seed in range(50):
        f = grammar.draw(seed)
        assert grammar.resolve(f) == f


def test_refusal_criterion():
    """Library errors echoing the value are refusals; Keras' and TF's
    crashes, and unexplained library errors, are not."""
    def raised(error):
        try:
            raise error
        except Exception as caught:  # noqa: BLE001
            return caught

    with pytest.raises(ValueError) as library:
        grammar.AccumulatingModel(accumulate=0)
    assert is_clear_refusal(library.value)
    assert not is_clear_refusal(raised(ValueError("Received: x=1")))
    assert not is_clear_refusal(raised(RuntimeError("Received: x=1")))


def test_noise_scale_oracle():
    """The noise-scale oracle on hand-written workflows, and its verdicts
    (no training)."""
    def workflow(**changes):
        return grammar.resolve(
            {**grammar.BASE, "noise_scale": True, **changes}
        )

    measured = [
        workflow(),
        workflow(input="masking", sample_weight=True, kernel_regularizer=True),
        workflow(reductions=["mean_with_sample_weight"], devices=2),
        workflow(task="binary", class_weight=True, accumulate="epoch"),
        workflow(accumulate=1, micro_batch_size=2),
        workflow(add_loss=True),  # Refused, but not for the noise scale.
    ]
    refused = [
        workflow(accumulate=1),
        workflow(outputs=2, reductions=["sum_over_batch_size"] * 2),
        workflow(outputs=2, reductions=["sum", "sum_over_batch_size"]),
        workflow(loss="custom_terms",
                 custom_reductions=["sum_over_batch_size"] * 2),
        workflow(loss="custom_plus_super", custom_reductions=["sum"] * 2),
        workflow(activity_regularizer=True),
        workflow(reductions=["sum"], kernel_regularizer=True),
    ]
    assert [noise_scale_refusal(f) for f in measured] == [None] * 6
    assert None not in [noise_scale_refusal(f) for f in refused]
    off = workflow(noise_scale=False, accumulate=1)
    assert noise_scale_refusal(off) is None

    ours = "ValueError: `noise_scale=True` ... Received: divides=(True, True)"
    other = "ValueError: not a linear combination. Received: a loss"
    assert _judge_refusal(measured[0], ours)[0] == "mismatch"
    assert _judge_refusal(measured[0], other)[0] == "refused"
    assert _judge_refusal(refused[1], ours)[0] == "refused"
    assert _judge_refusal(refused[1], other)[0] == "mismatch"
    # Refused first for `add_loss`, or a custom loss that is no linear
    # combination: any clear refusal; at construction, the noise scale's.
    assert _judge_refusal(workflow(outputs=2, add_loss=True), other)[0] == (
        "refused"
    )
    sqrt = workflow(loss="custom_terms", custom_combination="sqrt",
                    custom_reductions=["sum_over_batch_size"] * 2)
    assert _judge_refusal(sqrt, other)[0] == "refused"
    assert _judge_refusal(workflow(accumulate=1, add_loss=True), other)[0] == (
        "mismatch"
    )

    def noise(enabled=True, estimate=None, logged=None):
        return grammar.NoiseScale(
            enabled, estimate, [[0.5] * grammar.EPOCHS] if logged is None
            else logged,
        )

    finite = grammar.keras_accum.NoiseScaleEstimate(2.0, 1.0, 0.5, 8.0)
    assert noise_scale_problem(measured[0], noise()) is None
    assert noise_scale_problem(measured[0], noise(estimate=finite)) is None
    assert noise_scale_problem(measured[0], noise(enabled=False))
    assert noise_scale_problem(refused[1], noise())
    assert noise_scale_problem(
        measured[0], noise(estimate=finite._replace(grad_sq=np.nan))
    )
    assert noise_scale_problem(measured[0], noise(logged=[[0.5]]))
    assert noise_scale_problem(measured[0], noise(logged=[None]))
    off = {**measured[0], "noise_scale": False}
    assert not noise_scale_problem(off, noise(enabled=False, logged=[None]))
    assert noise_scale_problem(off, noise(enabled=False))


@pytest.mark.slow
def test_harness_rejects_naive_averaging(monkeypatch):
    """The harness can fail: naive per-step averaging is a mismatch."""
    monkeypatch.setattr(grammar, "AccumulatingModel", NaiveAveragingModel)
    features = grammar.resolve({
        **grammar.BASE, "accumulate": 3, "sample_weight": True,
        "optimizer": "adam",
    })
    verdict, detail = judge(features)
    assert verdict == "mismatch", (verdict, detail)
