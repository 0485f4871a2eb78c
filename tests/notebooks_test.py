"""Tests of the example notebooks.

Every notebook runs top to bottom in a fresh `python3` kernel (the one of the
interpreter running the tests), from its own folder as on Colab. Each
notebook's source is a jupytext percent-format `.py` file paired with it
(edit the `.py`, then `jupytext --sync examples/notebooks/*.py
examples/colab_tpu.py`); the committed `.ipynb` must agree with it and carry
no outputs.

`colab_tpu` is the JAX notebook: its kernel runs with `KERAS_BACKEND=jax`
and, as on a Colab TPU runtime, without TensorFlow: the test prepends a cell
`sys.modules["tensorflow"] = None` (in memory only), which makes any
`import tensorflow` fail, and checks at the end that it still holds.
`01_quickstart` keeps a `KERAS_BACKEND` set before it starts, so it runs
twice: on TensorFlow, and on JAX with TensorFlow blocked the same way.
"""

import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = [
    EXAMPLES / "notebooks" / "01_quickstart.ipynb",
    EXAMPLES / "notebooks" / "02_big_batch_on_small_memory.ipynb",
    EXAMPLES / "colab_tpu.ipynb",
]
CELL_TIMEOUT_S = 300
# Run on JAX with TensorFlow not importable, as on a Colab TPU runtime.
WITHOUT_TENSORFLOW = {"colab_tpu"}
# (notebook, backend): every notebook once, on its own backend (None: as the
# notebook chooses), plus the quickstart on JAX without TensorFlow.
RUNS = [(path, None) for path in NOTEBOOKS] + [
    (EXAMPLES / "notebooks" / "01_quickstart.ipynb", "jax"),
]
BLOCK_TENSORFLOW = 'import sys\nsys.modules["tensorflow"] = None'
STILL_BLOCKED = 'assert sys.modules["tensorflow"] is None'


def _ids(paths):
    return [path.stem for path in paths]


def _cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_agrees_with_its_percent_source(path):
    """Catches an edit to one side of a pair that was not synced to the other
    (a notebook that no longer runs what its reviewed source says)."""
    source = path.with_suffix(".py")
    assert source.exists(), f"{path.name} has no paired {source.name}"
    from_source = jupytext.read(source)
    committed = nbformat.read(path, as_version=4)
    assert _cells(committed) == _cells(from_source), (
        f"{path.name} differs from {source.name}: run `jupytext --sync "
        f"{source.relative_to(REPO)}`"
    )
    assert committed.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for key, value in from_source.metadata.items():
        if key != "jupytext":
            assert committed.metadata.get(key) == value, key


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_run_note_and_guarded_install_and_no_outputs(path):
    """Catches an install cell that names a repository address of its own
    (the project has no confirmed public address: the one place for it is
    the notebook's `REPOSITORY`), or one that installs over a clone's
    editable install."""
    notebook = nbformat.read(path, as_version=4)

    first, install = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown"
    assert f"jupyter execute {path.relative_to(REPO).as_posix()}" in (
        first.source
    )
    assert install.cell_type == "code"
    assert 'REPOSITORY = ""' in install.source
    assert 'if importlib.util.find_spec("keras_accum") is None:' in (
        install.source
    )
    for cell in notebook.cells:
        assert "github.com" not in cell.source
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "backend"), RUNS,
    ids=[path.stem + (f"-{backend}" if backend else "")
         for path, backend in RUNS],
)
def test_notebook_runs_top_to_bottom(path, backend):
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    # A backend-neutral notebook follows KERAS_BACKEND: pin it, so that a
    # test session run with KERAS_BACKEND=jax does not move the default run.
    env["KERAS_BACKEND"] = backend or "tensorflow"
    if path.stem in WITHOUT_TENSORFLOW or backend == "jax":
        # The notebook picks its devices itself; the JAX test run's
        # XLA_FLAGS must not leak into it.
        env.pop("XLA_FLAGS", None)
        env["KERAS_BACKEND"] = "jax"
        notebook.cells.insert(0, nbformat.v4.new_code_cell(BLOCK_TENSORFLOW))
        notebook.cells.append(nbformat.v4.new_code_cell(STILL_BLOCKED))
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )

    start = time.perf_counter()
    # Raises CellExecutionError on the first failing cell.
    client.execute(env=env)
    seconds = time.perf_counter() - start

    print(f"{path.name}: {seconds:.1f} s")
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    # Console hygiene: no warning that names keras_accum's internals (such
    # as a retracing warning naming one of its functions).
    warnings = [
        output.text
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stderr"
        and "keras_accum" in output.text
    ]
    assert not warnings, warnings
