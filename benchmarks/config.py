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
# 3 since issue 26 (was 4): the `micro_batch_size` rows (and their XLA
# twins) added ~40% more configurations and the whole run stays < 30 min.
FULL_TIMING_ROUNDS = 3
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

# JAX (`KERAS_BACKEND=jax python benchmarks/run.py`): timing, memory and
# floors (the other phases use TensorFlow's profiler, strategies and
# `tf.data`), much of it XLA compilation (one per configuration and
# process). About 28 minutes on two shared cores since issue 26 (half of
# it the convnet's `micro_batch_size` rows, slow under XLA's CPU while
# loop). `jit_compile=True` (JAX's
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
# under epoch-to-epoch noise of +-15% on a shared machine: ratios taken per
# round (report.py). 9 rounds resolved ~+-5%; 5 since issue 26 added the
# `micro_batch_size` rows, whose convnet epochs are ~10x slower on XLA's
# CPU while loop (see the floors), to keep the run near 15 minutes.
JAX_TIMING_ROUNDS = 5
# Memory on JAX: one fresh (forked) process per configuration, each paying
# its own compilation, so a smaller grid: k = 8, every model.
JAX_MEMORY_OPTIMIZERS = ("sgd", "adam")
JAX_MEMORY_KS = (8,)
JAX_MEMORY_EPOCHS = 1
# Epochs trained before the measured `fit`, so that XLA's compilation (in
# the first `fit`) is not counted as training memory.
JAX_MEMORY_WARMUP_EPOCHS = 1
# keras_accum `micro_batch_size=b` at batch k*b (issue 26): on TensorFlow
# also timed with `jit_compile=True` for these models. Not the convnet:
# XLA's CPU while loop over a convolution's gradient runs 10-20x slower
# than the big batch (see the floors), minutes per configuration.
MICRO_XLA_MODELS = ("mlp", "transformer")
QUICK_MICRO_XLA_MODELS = ("mlp",)
# JAX memory: `plain_kb` and `keras_accum_micro` at these k as well (the
# full set of methods runs at `JAX_MEMORY_KS`).
JAX_MEMORY_MICRO_KS = (8, 32)
# Raw floors (floors.py): alternating rounds per (model, k, variant).
FLOORS_ROUNDS = 3

# PyTorch (`KERAS_BACKEND=torch python benchmarks/run.py`): timing and
# memory (floors, exactness, distributed and profile use TensorFlow's or
# JAX's tools). Keras' torch trainer runs each step eagerly
# (`jit_compile=False`, its default; `True` would be `torch.compile`).
# Same models, optimizers, k and micro-batch as the JAX run.
TORCH_MODELS = ("mlp", "convnet", "transformer")
TORCH_OPTIMIZERS = ("sgd", "adam")
TORCH_KS = (4, 8, 32)
TORCH_MICRO_BATCH = 16
TORCH_EXAMPLES = {"mlp": 512, "convnet": 512, "transformer": 512}
# Eager steps are short and every configuration costs no compilation, so
# more rounds than on JAX for the same run time.
TORCH_TIMING_ROUNDS = 7
# Intra-op threads of every torch process (set as `OMP_NUM_THREADS` before
# torch is imported). With torch's default (one per core) on a shared
# 2-core machine under a load of ~8, OpenMP's worker threads spin against
# the other processes: an MLP epoch took 3.9 s with 2 threads and 0.45 s
# with 1, and its spread swamped the differences measured here.
TORCH_THREADS = 1
# Memory on torch: one fresh (forked) process per configuration, every k;
# no warm-up epoch (nothing is compiled), as on TensorFlow.
TORCH_MEMORY_KS = (4, 8, 32)
TORCH_MEMORY_EPOCHS = 1
TORCH_MEMORY_WARMUP_EPOCHS = 0

# Cost of `noise_scale=True` (`noise_scale_cost.py`, issue 29): keras_accum
# `accumulate=k` with and without the noise scale, alternating epochs in
# one process per (model, optimizer). A cost of a few percent under
# epoch-to-epoch noise of +-10-15% needs many short rounds: epochs of
# ~0.3-1 s on a quiet machine, 64-128 micro-steps (8-16 windows), so the epoch-end
# read-out of the estimate weighs as it would in a real epoch.
NOISE_SCALE_K = 8
NOISE_SCALE_MODELS = ("mlp", "transformer")
NOISE_SCALE_OPTIMIZERS = ("sgd", "adam")
NOISE_SCALE_EXAMPLES = {
    "tensorflow": {"mlp": 4096, "transformer": 2048},
    "jax": {"mlp": 2048, "transformer": 2048},
    "torch": {"mlp": 1024, "transformer": 1024},
}
NOISE_SCALE_ROUNDS = {"tensorflow": 30, "jax": 40, "torch": 30}
