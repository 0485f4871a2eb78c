"""The README's quick start runs, on the backend `KERAS_BACKEND` names.

The code block under "## Quick start" runs as a user runs it: in a fresh
Python process, once with each `KERAS_BACKEND` (`tensorflow`, `jax`,
`torch`), and must print its 10 updates on that backend.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def quick_start():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_quick_start_runs_on_the_chosen_backend(backend, tmp_path):
    """Catches a quick start that overrides `KERAS_BACKEND` (it ran on
    TensorFlow whatever the user chose) or whose update count is wrong."""
    script = quick_start() + (
        "\nprint('backend', keras.backend.backend())\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2:] == ["10", f"backend {backend}"], result.stdout[-2000:]
