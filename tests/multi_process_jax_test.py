"""Exact accumulation across processes on JAX (`keras.distribution`).

What TPU pods and multi-host GPU training use: every process calls
`keras.distribution.initialize`, one `DataParallel` spans every process's
devices, and each process feeds its own shard of every global batch
(`auto_shard_dataset=False`). Here two processes on 127.0.0.1
(`multi_process_jax_main.py`), two host CPU devices each, CPU collectives
over gloo, train a masked sequence tagger whose processes see different
numbers of valid tokens. Every case must equal a plain single-process
`keras.Model` trained on one big batch per window, the global batches of
both processes together (float64, relative 1e-9).
"""

import os
import sys

import keras
import numpy as np
import pytest

from tests import helpers
from tests import multi_process_jax_main as cases
from tests.helpers import RTOL

pytestmark = [
    pytest.mark.backends,
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="tests the JAX backend"
    ),
]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "multi_process_jax_main.py")


def _reference_weights(accumulate):
    """A plain model trained on one global big batch per window."""
    tokens, labels = cases.padded_sequences()
    order = cases.global_order()
    reference = keras.Model(*cases.sequence_graph())
    cases.compile_model(reference)
    return helpers.big_batch_reference(
        reference, tokens[order], labels[order],
        cases.PROCESSES * cases.LOCAL_BATCH, accumulate, cases.EPOCHS,
    )


def _load(path):
    result = np.load(path)
    weights = [result[f"arr_{i}"] for i in range(len(result.files) - 1)]
    return weights, int(result["iterations"])


@pytest.mark.usefixtures("float64")
def test_two_processes_equal_one_process_big_batch(tmp_path):
    """Catches a normaliser counted per process or per device instead of
    over the global window (the processes' valid-token counts differ), and
    processes that diverge. The naive method, trained the same way, must
    miss the same reference.

    One pair of processes trains every case of `multi_process_jax_main` in
    turn (starting JAX and the cluster is most of a case's time).
    """
    port = helpers.free_port()
    commands = []
    for process_id in range(cases.PROCESSES):
        (tmp_path / f"process{process_id}").mkdir()
        commands.append([sys.executable, WORKER, str(process_id), str(port),
                         str(tmp_path / f"process{process_id}")])
    results = helpers.run_processes(
        commands, dict(os.environ, KERAS_BACKEND="jax"), timeout=300
    )
    for process_id, (code, output) in enumerate(results):
        assert code == 0, f"process {process_id} ({code}):\n{output[-3000:]}"

    global_examples = cases.PROCESSES * cases.SHARD
    global_batch = cases.PROCESSES * cases.LOCAL_BATCH
    for name, kwargs in cases.CASES.items():
        accumulate = kwargs["accumulate"]
        loaded = [_load(tmp_path / f"process{i}" / f"{name}.npz")
                  for i in range(cases.PROCESSES)]
        (weights, iterations), (other_weights, _) = loaded
        for a, b in zip(weights, other_weights):
            np.testing.assert_array_equal(a, b, err_msg=name)
        error = helpers.relative_error(weights, _reference_weights(accumulate))
        assert error <= RTOL, f"{name}: relative error {error:.3g}"
        windows = helpers.windows(global_examples, global_batch, accumulate)
        assert iterations == cases.EPOCHS * len(windows), name

    naive, _ = _load(tmp_path / "process0" / f"{cases.NAIVE_CASE}.npz")
    error = helpers.relative_error(
        naive, _reference_weights(cases.NAIVE_ACCUMULATE)
    )
    assert error > 1e3 * RTOL, f"naive error {error:.3g}"
