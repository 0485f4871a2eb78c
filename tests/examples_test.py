"""End-to-end tests of the example scripts in `examples/`, at tiny sizes.

`train_digits.py` runs as a subprocess, as a user runs it, on the JAX
backend (its default, where it measures memory); the keras-hub example runs
in-process through its `main(argv)`, so that the test can look at the
objects it returns.
"""

import importlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_accum

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(script, *args, cwd, backend="jax", timeout=300):
    """Runs `examples/<script>` with this interpreter; returns the result."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{script} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result


def test_train_digits_writes_table_plot_models_and_logs(tmp_path):
    """Catches micro-batches weighted equally (naive averaging): the last
    window of each epoch is ragged, so only exact weighting reproduces the
    big-batch reference to 1e-4 (measured: 2.4e-7 exact, 1.2e-2 naive).

    The same run (one subprocess: each run of the script is most of a
    minute of a 2-core machine) saves the model (`--save-models`) and, with
    `tensorboard` installed, writes `--tensorboard` logs, one point per
    update; it writes nothing else."""
    out, saved = tmp_path / "out", tmp_path / "saved"
    logs = tmp_path / "logs"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    result = run_example(
        "train_digits.py",
        "--epochs",
        2,
        "--batch-size",
        48,
        "--accumulate",
        4,
        "--out",
        out,
        "--save-models",
        saved,
        *(("--tensorboard", logs) if tensorboard else ()),
        cwd=tmp_path,
    )

    assert "| run | micro-batch | effective batch | updates |" in result.stdout
    assert "train step memory (MB)" in result.stdout
    assert (out / "digits_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((out / "digits_results.json").read_text())
    runs = summary["runs"]
    # 1280 training images: 26 micro-batches of 48 and one of 32 per epoch,
    # so 6 windows of 4 and a ragged last window of 3 (128 images), which
    # the batch-192 reference reproduces with its ragged last batch.
    assert {key: run["updates"] for key, run in runs.items()} == {
        "plain": 54,
        "epoch": 2,
        "accumulate": 14,
        "reference": 14,
    }
    assert runs["accumulate"]["effective_batch"] == 192
    # The accumulated run reproduces the batch-192 reference.
    assert max(summary["reference_differences"]) < 1e-4
    assert summary["reference_weight_difference"] < 1e-4
    assert runs["plain"]["test_accuracy"] > 0.8
    # XLA's analysis of the compiled steps: the accumulating step at 48
    # holds a fraction of the step at 192 (measured: 29%), a little more
    # than plain `fit` at 48 (its accumulators).
    memory = {key: run["step_memory_mb"] for key, run in runs.items()}
    assert memory["accumulate"] < 0.5 * memory["reference"]
    assert memory["plain"] < memory["accumulate"]
    assert (saved / "digits_accum.keras").is_file()
    assert (saved / "digits_accum_export" / "saved_model.pb").is_file()
    expected = {"out", "saved"} | ({"logs"} if tensorboard else set())
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert "keras_accum" not in result.stderr, result.stderr[-4000:]
    if tensorboard:
        _assert_one_logged_point_per_update(result, logs, updates=14)


def test_train_digits_saves_models_only_when_asked(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    train_digits = importlib.import_module("train_digits")

    assert train_digits.parse_args([]).save_models is None
    assert train_digits.parse_args(["--save-models"]).save_models == (
        "saved_models"
    )


def _assert_one_logged_point_per_update(result, logs, updates):
    from tensorboard.backend.event_processing import event_accumulator

    assert f"tensorboard --logdir {logs}" in result.stdout
    assert sorted(p.name for p in logs.iterdir()) == [
        "accumulate",
        "epoch",
        "plain",
        "reference",
    ]
    events = event_accumulator.EventAccumulator(
        str(logs / "accumulate" / "train"), size_guidance={"tensors": 0}
    )
    events.Reload()
    # Two epochs of 7 windows (the last one ragged): one point per update,
    # at step = `optimizer.iterations`, across the epoch boundary.
    steps = [event.step for event in events.Tensors("batch_loss")]
    assert steps == list(range(1, updates + 1))


@pytest.fixture
def keras_hub_example(monkeypatch):
    """The `keras_hub_classifier` module, imported from `examples/`."""
    pytest.importorskip("keras_hub")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("keras_hub_classifier")


def test_keras_hub_classifier_trains_through_the_wrapper(keras_hub_example):
    result = keras_hub_example.main(
        [
            "--examples",
            "40",
            "--sequence-length",
            "8",
            "--vocabulary-size",
            "32",
            "--num-layers",
            "1",
            "--hidden-dim",
            "8",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "3",
            "--accumulate",
            "3",
            "--epochs",
            "2",
            "--verbose",
            "0",
        ]
    )

    classifier, model = result["classifier"], result["model"]
    assert isinstance(model, keras_accum.AccumulatingModel)
    # 30 training examples: 8 batches of 4 (each in micro-batches of 3 and
    # 1, the last batch of 2 in one), windows of 3, 3 and a leftover of 2
    # applied at epoch end: 3 updates per epoch.
    assert result["expected_updates"] == 6
    assert int(model.optimizer.iterations.numpy()) == 6
    assert model.mini_step == 0
    assert {id(v) for v in model.weights} == {id(v) for v in classifier.weights}
    inputs, _ = keras_hub_example.make_data(5, 8, 32, seed=1)
    # Direct calls, not `predict`: a traced BERT forward pass each.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(classifier(inputs)),
        keras.ops.convert_to_numpy(model(inputs)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_keras_hub_data_label_says_whether_the_marker_occurs(
    keras_hub_example,
):
    marker = importlib.import_module("keras_hub_config").MARKER_TOKEN

    inputs, labels = keras_hub_example.make_data(64, 12, 50, seed=0)

    tokens, mask = inputs["token_ids"], inputs["padding_mask"]
    np.testing.assert_array_equal((tokens == marker).any(axis=1), labels == 1)
    np.testing.assert_array_equal(tokens[:, 0], 1)  # [CLS]
    np.testing.assert_array_equal(tokens[mask == 0], 0)  # Padding.
    np.testing.assert_array_equal(inputs["segment_ids"], 0)


def test_noise_scale_digits_follows_the_measured_noise_scale(tmp_path):
    """Runs `noise_scale_digits.py` small, on its default backend: the auto
    run's window of each epoch is the rule applied to the noise scale the
    history logged at the end of the epoch before, and each run's
    examples and updates to the target agree with its windows."""
    out = tmp_path / "out"
    batch_size, max_window = 16, 8
    result = run_example(
        "noise_scale_digits.py",
        "--epochs", 4,
        "--max-window", max_window,
        "--large", 16,
        "--max-epochs", 12,
        "--target", 1.0,
        "--out", out,
        cwd=tmp_path,
        backend="tensorflow",
    )

    assert "| epoch | window | effective batch | updates |" in result.stdout
    assert "| run | effective batch | examples to val loss 1.0" in (
        result.stdout
    )
    assert (out / "noise_scale.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((out / "noise_scale_results.json").read_text())
    assert summary["backend"] == "tensorflow"
    runs = summary["runs"]
    auto = runs["auto"]
    noise = auto["history"]["noise_scale"]
    assert len(noise) == len(auto["windows"]) == 4
    assert all(math.isfinite(n) and n > 0 for n in noise), noise
    # 1280 training digits: 80 micro-batches of 16 per epoch, so every
    # batch's normaliser is 16 examples.
    assert auto["estimate"]["batch_normaliser"] == pytest.approx(batch_size)
    assert auto["windows"][0] == 2  # `initial`, before any estimate.
    for window, previous in zip(auto["windows"][1:], noise):
        expected = min(max_window, max(2, round(previous / batch_size)))
        assert window == expected, (auto["windows"], noise)
    # One update per window, and the leftover window at each epoch's end.
    assert auto["updates"] == sum(
        math.ceil(80 / window) for window in auto["windows"]
    )
    small, large = runs["small"], runs["large"]
    # Each fixed run stopped at the target, right after the update that
    # reached it: window 1 updates on every batch of 16.
    for run in (auto, small, large):
        assert run["reached"] is not None
        assert run["reached"]["val_loss"] <= 1.0
    assert small["reached"]["examples"] == 16 * small["reached"]["updates"]
    assert small["examples"] == small["reached"]["examples"]
    assert large["examples"] == large["reached"]["examples"]
    assert large["reached"]["examples"] % 256 == 0  # Windows of 16 x 16.
    assert "keras_accum" not in result.stderr, result.stderr[-4000:]
