"""Smoke test of `benchmarks/run.py --quick` (issue 7).

Runs the quick benchmark in a subprocess into a temporary directory and
checks that it writes its Markdown, JSON and plot. No timing assertion: the
numbers of a shared 2-core machine are not a test oracle.
"""

import json
import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPOSITORY, "benchmarks", "run.py")


def _run_on_tensorflow(script, *arguments):
    """Runs a benchmark script on TensorFlow; fails with its stderr."""
    environment = dict(os.environ, KERAS_BACKEND="tensorflow",
                       TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, script, *arguments],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
    _run_on_tensorflow(RUN, "--quick", "--out", str(tmp_path))

    assert (tmp_path / "results.md").is_file()
    assert (tmp_path / "results" / "benchmark.png").is_file()
    with open(tmp_path / "results" / "benchmark.json") as handle:
        data = json.load(handle)
    assert data["settings"]["mode"] == "quick"
    for section in ("machine", "timing", "memory", "floors", "exactness",
                    "distributed", "profile", "targets"):
        assert section in data, section
    keys = {row["key"] for row in data["timing"]["mlp"]["adam"]}
    # Issue 26: micro_batch_size at k*b, with and without XLA on TF.
    assert {"plain_b", "builtin_k8", "keras_accum_k8",
            "keras_accum_epoch", "keras_accum_micro_k8",
            "keras_accum_micro_k8_jit"} <= keys
    assert {row["variant"] for row in data["floors"]} == {
        "tf: tf.while_loop (no XLA)", "tf: tf.while_loop (jit_compile=True)"
    }

    # The README's table is written by the benchmark's own report code.
    sys.path.insert(0, os.path.join(REPOSITORY, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{report.README_START}\nold table\n{report.README_END}\nend\n"
    )
    report.update_readme(data, str(readme))
    text = readme.read_text()
    assert "old table" not in text
    assert "| MLP 784-1024-512-10 (ReLU) | adam | 8 |" in text
    assert "micro_batch_size=b: vs plain fit @ k*b" in text
    assert text.startswith("intro\n") and text.endswith(
        f"{report.README_END}\nend\n"
    )


@pytest.mark.slow
def test_noise_scale_cost_writes_results(tmp_path):
    """Smoke test of `benchmarks/noise_scale_cost.py` (issue 29): one
    round, one optimizer; checks the files, not the numbers."""
    _run_on_tensorflow(
        os.path.join(REPOSITORY, "benchmarks", "noise_scale_cost.py"),
        "--rounds", "1", "--optimizers", "adam", "--out", str(tmp_path),
    )
    with open(tmp_path / "tensorflow.json") as handle:
        data = json.load(handle)
    for model in ("mlp", "transformer"):
        result = data["results"][model]["adam"]
        assert "error" not in result, result
        assert result["rounds"] == 1
        assert result["ratio"] > 0
        keys = {row["key"] for row in data["raw"][model]["adam"]}
        assert keys == {"keras_accum_k8", "keras_accum_noise_k8"}
        # Both made the same updates: 8 micro-steps per window.
        off, on = result["updates_per_epoch"]
        assert off == on == result["micro_steps_per_epoch"] // 8
    assert "| MLP | adam |" in (tmp_path / "tensorflow.md").read_text()
