"""Sizes and settings of the benchmark, as plain Python constants.

`FULL` is what `python benchmarks/run.py` runs; `QUICK` (`--quick`) is a
smoke run of the same code paths that finishes in well under 3 minutes on
two CPU cores.
"""

# Micro-batch size `b` of every accumulating configuration.
MICRO_BATCH = 32

# Accumulation steps `k`. `k=1` is plain training for every method; the
# built-in needs `gradient_accumulation_steps >= 2`, so it has no k=1 row.
FULL_KS = (1, 4, 8, 32)
QUICK_KS = (1, 8)

FULL_OPTIMIZERS = ("sgd", "adam")
QUICK_OPTIMIZERS = ("adam",)
LEARNING_RATES = {"sgd": 0.01, "adam": 1e-3}

# Examples per epoch. A multiple of `MICRO_BATCH * max(k)` so that every
# method performs the same number of optimizer updates per epoch and the
# timing compares like with like (exactness uses ragged data instead).
FULL_EXAMPLES = {"mlp": 4096, "convnet": 1024, "transformer": 1024}
QUICK_EXAMPLES = {"mlp": 512}

FULL_MODELS = ("mlp", "convnet", "transformer")
QUICK_MODELS = ("mlp",)

# Timing: one warm-up epoch per configuration, then `rounds` timed epochs per
# configuration, interleaved round-robin inside one process per
# (model, optimizer); the reported time is the median over the rounds.
FULL_TIMING_ROUNDS = 4
QUICK_TIMING_ROUNDS = 1

# Memory: epochs of the single `fit` call made in each fresh process.
FULL_MEMORY_EPOCHS = 1
QUICK_MEMORY_EPOCHS = 1

# Seconds before a child process is killed and its configuration recorded as
# failed.
CHILD_TIMEOUT = 420

# Distributed run: logical CPU devices, window, global batch (an even
# number, see KERAS_NOTES.md), examples and timed rounds.
DISTRIBUTED_DEVICES = 2
DISTRIBUTED_K = 8
DISTRIBUTED_GLOBAL_BATCH = 2 * MICRO_BATCH
FULL_DISTRIBUTED_EXAMPLES = 2048
QUICK_DISTRIBUTED_EXAMPLES = 256

# Exactness: float64 MLP, ragged data (the last micro-batch is short) and a
# divisible control where Keras' built-in is exact as well.
EXACT_RAGGED_EXAMPLES = 100
EXACT_DIVISIBLE_EXAMPLES = 96
EXACT_MICRO_BATCH = 8
FULL_EXACT_KS = (4, 8)
QUICK_EXACT_KS = (4,)
EXACT_EPOCHS = 3

# JAX (`KERAS_BACKEND=jax python benchmarks/run.py`): timing and memory
# (the other phases use TensorFlow's profiler, strategies and `tf.data`),
# much of it XLA compilation (one per configuration and process). Sized for
# about ten minutes on two quiet cores. `jit_compile=True` (JAX's
# default; `False` would run every op eagerly). The micro-batch is smaller
# than TensorFlow's so that the convnet's epochs stay short while every k
# still divides the epoch (examples = JAX_MICRO_BATCH * max(JAX_KS)).
JAX_MODELS = ("mlp", "convnet", "transformer")
JAX_OPTIMIZERS = ("sgd", "adam")
JAX_KS = (4, 8, 32)
JAX_MICRO_BATCH = 16
# The transformer's micro-steps take ~3 ms on two cores: 2048 examples
# make its epochs ~0.4 s, long against `fit`'s fixed cost per call.
JAX_EXAMPLES = {"mlp": 512, "convnet": 512, "transformer": 2048}
# keras_accum and the built-in differ by a few percent on the transformer,
# under epoch-to-epoch noise of +-15% on a shared machine: 9 rounds, and
# ratios taken per round (report.py).
JAX_TIMING_ROUNDS = 9
# Memory on JAX: one fresh (forked) process per configuration, each paying
# its own compilation, so a smaller grid: k = 8, every model.
JAX_MEMORY_OPTIMIZERS = ("sgd", "adam")
JAX_MEMORY_KS = (8,)
JAX_MEMORY_EPOCHS = 1
# Epochs trained before the measured `fit`, so that XLA's compilation (in
# the first `fit`) is not counted as training memory.
JAX_MEMORY_WARMUP_EPOCHS = 1
