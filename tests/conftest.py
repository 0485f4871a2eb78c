"""Test configuration shared by every test module.

The suite runs on the backend named by `KERAS_BACKEND` (TensorFlow when
unset). On TensorFlow, four logical CPU devices are configured at import,
before any op runs, so the distribution tests can use real
`MirroredStrategy`s on one CPU. On JAX, two host CPU devices are configured
for `keras.distribution.DataParallel` and float64 is enabled; on JAX and
torch only tests marked `backends` run (`python -m pytest -m backends`);
the others use TensorFlow.
"""

import gc
import importlib.util
import os
import re
import tempfile

BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if BACKEND == "jax":
    # Before JAX initialises its CPU backend. The tests' models are tiny, so
    # their time goes to XLA compiling, not running: LLVM's optimisation
    # passes are turned off (code generation only; the arithmetic is the
    # same IEEE operations, and both sides of every comparison run here).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=2"
        + " --xla_backend_optimization_level=0"
        + " --xla_llvm_disable_expensive_passes=true"
    ).strip()

import keras  # noqa: E402
import pytest  # noqa: E402

LOGICAL_CPUS = 4

if BACKEND == "jax":
    import jax  # noqa: E402
    from keras.src.backend.common import dtypes as _keras_dtypes

    jax.config.update("jax_enable_x64", True)
    # Many tests compile the same programs (same models, other settings):
    # JAX's persistent compilation cache, shared by the xdist workers,
    # compiles each once (cut the `-m backends` run by about a third).
    # Not on JAX 0.4.29 (the floor): there a second model compiling the
    # same step (a `clone_model`'s) from the persistent cache corrupted the
    # heap ("malloc(): unaligned tcache chunk detected"); without the cache
    # it trains exactly. Measured 2026-12-07; 0.10.2 is fine.
    _CACHE = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 5)
    for _option, _value in () if not _CACHE else (
        ("jax_compilation_cache_dir",
         os.path.join(tempfile.gettempdir(), "keras_accum_tests_xla_cache")),
        ("jax_persistent_cache_min_compile_time_secs", 0),
        ("jax_persistent_cache_min_entry_size_bytes", 0),
    ):
        if hasattr(jax.config, _option):  # Options of JAX >= 0.4.29 vary.
            jax.config.update(_option, _value)
    # Keras' type promotion maps float64 to float32 on JAX (as JAX does
    # without x64), so `ops.mean` and `tanh` of float64 tensors compute in
    # float32 and plain Keras' own big batch drifts ~1e-8 per update. Both
    # sides of every comparison run in this process, so make float64 honest
    # for both: exactness is then tested to the same 1e-9 as on TensorFlow.
    _keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
elif BACKEND == "torch":
    from keras.src.backend.common import dtypes as _keras_dtypes

    # As on JAX: Keras' type promotion maps float64 to float32 on torch
    # too (`ops.matmul` of two float64 tensors is float32).
    _keras_dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
else:
    import tensorflow as tf  # noqa: E402

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS
    )


# On JAX, TensorFlow may be absent (`keras-accum[jax]`; scripts/
# version_matrix.py runs a JAX slice without it where pip cannot install
# that JAX beside that TensorFlow). Then a test
# module that imports TensorFlow at its top, or is not marked `backends` (its
# tests would be skipped anyway), is not collected; the header names them.
_WITHOUT_TENSORFLOW = (
    BACKEND in ("jax", "torch")
    and importlib.util.find_spec("tensorflow") is None
)
_TOP_LEVEL_TENSORFLOW = re.compile(r"^(import|from) tensorflow\b", re.M)


def _needs_tensorflow(path):
    """Whether the test module at `path` is left out without TensorFlow."""
    if path.suffix != ".py" or not path.name.endswith("_test.py"):
        return False
    source = path.read_text()
    return "pytest.mark.backends" not in source or bool(
        _TOP_LEVEL_TENSORFLOW.search(source)
    )


def pytest_ignore_collect(collection_path, config):
    if _WITHOUT_TENSORFLOW and _needs_tensorflow(collection_path):
        return True
    return None


def pytest_report_header(config):
    if not _WITHOUT_TENSORFLOW:
        return None
    left_out = sorted(
        path.name for path in (config.rootpath / "tests").glob("*_test.py")
        if _needs_tensorflow(path)
    )
    return "no TensorFlow: not collected: " + ", ".join(left_out)


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    tensorflow_only = pytest.mark.skip(
        reason="uses TensorFlow (not marked `backends`)"
    )
    for item in items:
        if (
            "backends" not in item.keywords
            or "tensorflow_only" in item.keywords
        ):
            item.add_marker(tensorflow_only)


@pytest.fixture
def float64():
    """Runs a test with `keras.backend.floatx() == "float64"`."""
    previous = keras.backend.floatx()
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx(previous)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    from tests import helpers  # After the devices above are configured.

    helpers.fresh_keras_state()
    yield


# Keras, TensorFlow or JAX put ~10^6 long-lived objects on the heap at
# import; moved out of the collector's reach, Python's own collections
# during tracing no longer walk them.
gc.freeze()
