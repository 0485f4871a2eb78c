"""Runs the keras_accum benchmark and writes JSON, Markdown and plots.

Usage (from the repository root):

    python benchmarks/run.py            # full run, ~25 min on 2 cores
    python benchmarks/run.py --quick    # smoke run, < 3 min
    KERAS_BACKEND=jax python benchmarks/run.py   # JAX timing+memory+floors, ~28 min
    KERAS_BACKEND=torch python benchmarks/run.py # PyTorch timing+memory

The full run writes `benchmarks/results.md` and `benchmarks/results/`; the
quick run writes to `benchmarks/results/tmp/quick/` unless `--out` is given.
See `benchmarks/README.md` for what is measured and how.
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import config
import isolation

if BACKEND == "torch":
    # Before torch is imported, here and in spawned children (config.py).
    os.environ.setdefault("OMP_NUM_THREADS", str(config.TORCH_THREADS))

# Nothing that imports keras_accum is imported at module level: the package
# is snapshotted first (see `snapshot_library`), then imported from the copy.

PHASES = ("timing", "memory", "floors", "exactness", "distributed",
          "profile")
# On JAX timing, memory and floors run: the others use TensorFlow's
# profiler, `tf.distribute` and `tf.data`.
JAX_PHASES = ("timing", "memory", "floors")
# On torch timing and memory: the floors are `lax.scan` and
# `tf.while_loop` programs.
TORCH_PHASES = ("timing", "memory")
BACKEND_PHASES = {"jax": JAX_PHASES, "torch": TORCH_PHASES}


def snapshot_library():
    """Copies the `keras_accum` package to a temporary directory and puts
    that copy first on the import path of this process and its children.

    A run takes ~20 minutes and the package may be edited meanwhile: forked
    children would run the code imported at start while AutoGraph re-reads
    the edited source from disk (seen: `tf__scaled() takes 2 positional
    arguments but 3 were given`), and spawned children would import whatever
    version is on disk. The snapshot measures one version throughout.

    Returns:
        A dict describing the snapshot (source, SHA-256 of the files, the
        git commit and whether the package differs from it).
    """
    spec = importlib.util.find_spec("keras_accum")
    source = spec.submodule_search_locations[0]
    root = tempfile.mkdtemp(prefix="keras_accum_benchmark_")
    target = os.path.join(root, "keras_accum")
    shutil.copytree(source, target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(target)):
        if name.endswith(".py"):
            with open(os.path.join(target, name), "rb") as handle:
                digest.update(name.encode() + handle.read())
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                  if p]
    )
    info = {"source": source, "snapshot": target,
            "sha256": digest.hexdigest()[:16]}
    repository = os.path.dirname(source)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", repository, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip() or None
        changed = subprocess.run(
            ["git", "-C", repository, "status", "--porcelain", "--",
             "keras_accum"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
        info["uncommitted_changes"] = bool(changed)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _settings(quick):
    if BACKEND == "jax" and not quick:
        return {
            "mode": "jax",
            "micro_batch": config.JAX_MICRO_BATCH,
            "ks": list(config.JAX_KS),
            "models": list(config.JAX_MODELS),
            "optimizers": list(config.JAX_OPTIMIZERS),
            "learning_rates": config.LEARNING_RATES,
            "examples": config.JAX_EXAMPLES,
            "timing_rounds": config.JAX_TIMING_ROUNDS,
            "jit_compile": True,
            # Plain fit at b and k*b, the built-in and keras_accum at each
            # k; no k=1 or "epoch" keras_accum rows (the TF run has them).
            "timing_configs": "plain_b, plain_kb, builtin, keras_accum",
            "memory_epochs": config.JAX_MEMORY_EPOCHS,
            "memory_warmup_epochs": config.JAX_MEMORY_WARMUP_EPOCHS,
            "memory_optimizers": list(config.JAX_MEMORY_OPTIMIZERS),
            "memory_ks": list(config.JAX_MEMORY_KS),
            "memory_micro_ks": list(config.JAX_MEMORY_MICRO_KS),
            "floors": {
                "models": list(config.JAX_MODELS),
                "ks": list(config.JAX_KS),
                "micro_batch": config.JAX_MICRO_BATCH,
                "rounds": config.FLOORS_ROUNDS,
            },
        }
    if BACKEND == "torch" and not quick:
        return {
            "mode": "torch",
            "micro_batch": config.TORCH_MICRO_BATCH,
            "ks": list(config.TORCH_KS),
            "models": list(config.TORCH_MODELS),
            "optimizers": list(config.TORCH_OPTIMIZERS),
            "learning_rates": config.LEARNING_RATES,
            "examples": config.TORCH_EXAMPLES,
            "timing_rounds": config.TORCH_TIMING_ROUNDS,
            "jit_compile": False,
            "timing_configs": "plain_b, plain_kb, builtin, keras_accum, "
                              "keras_accum_micro",
            "memory_epochs": config.TORCH_MEMORY_EPOCHS,
            "memory_warmup_epochs": config.TORCH_MEMORY_WARMUP_EPOCHS,
            "memory_optimizers": list(config.TORCH_OPTIMIZERS),
            "memory_ks": list(config.TORCH_MEMORY_KS),
            "memory_micro_ks": [],
            "torch_threads": config.TORCH_THREADS,
        }
    return {
        "mode": "quick" if quick else "full",
        "micro_batch": config.MICRO_BATCH,
        "ks": list(config.QUICK_KS if quick else config.FULL_KS),
        "models": list(config.QUICK_MODELS if quick else config.FULL_MODELS),
        "optimizers": list(
            config.QUICK_OPTIMIZERS if quick else config.FULL_OPTIMIZERS
        ),
        "learning_rates": config.LEARNING_RATES,
        "examples": config.QUICK_EXAMPLES if quick else config.FULL_EXAMPLES,
        "timing_rounds": (
            config.QUICK_TIMING_ROUNDS if quick else config.FULL_TIMING_ROUNDS
        ),
        "jit_compile": BACKEND == "jax",
        "memory_epochs": (
            config.QUICK_MEMORY_EPOCHS if quick else config.FULL_MEMORY_EPOCHS
        ),
        "micro_xla_models": list(
            config.QUICK_MICRO_XLA_MODELS if quick
            else config.MICRO_XLA_MODELS
        ),
        "floors": {
            "models": list(
                config.QUICK_MODELS if quick else config.FULL_MODELS
            ),
            "ks": [k for k in (config.QUICK_KS if quick else config.FULL_KS)
                   if k >= 2],
            "micro_batch": config.MICRO_BATCH,
            "rounds": 1 if quick else config.FLOORS_ROUNDS,
        },
        "distributed": {
            "devices": config.DISTRIBUTED_DEVICES,
            "k": config.DISTRIBUTED_K,
            "global_batch": config.DISTRIBUTED_GLOBAL_BATCH,
            "examples": (
                config.QUICK_DISTRIBUTED_EXAMPLES if quick
                else config.FULL_DISTRIBUTED_EXAMPLES
            ),
            "rounds": 1 if quick else 3,
        },
        "exactness": {
            "ragged_examples": config.EXACT_RAGGED_EXAMPLES,
            # The divisible control (built-in exact too) in full runs only.
            "divisible_examples": (
                None if quick else config.EXACT_DIVISIBLE_EXAMPLES
            ),
            "micro_batch": config.EXACT_MICRO_BATCH,
            "ks": list(
                config.QUICK_EXACT_KS if quick else config.FULL_EXACT_KS
            ),
            "epochs": config.EXACT_EPOCHS,
        },
        "profile": {
            "model": "mlp",
            "optimizer": "adam",
            "k": 8,
            "examples": 256 if quick else 2048,
            "rounds": 1 if quick else 4,
        },
    }


def _machine(isolation_mode):
    import keras

    import keras_accum

    if BACKEND == "jax":
        import jax

        framework = {"backend": "jax", "jax": jax.__version__}
    elif BACKEND == "torch":
        import torch

        framework = {"backend": "torch", "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()}
    else:
        import tensorflow as tf

        framework = {"backend": "tensorflow", "tensorflow": tf.__version__}

    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_gib = int(line.split()[1]) / 1024 / 1024
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **framework,
        "keras": keras.__version__,
        "keras_accum": keras_accum.__version__,
        "isolation": isolation_mode,
        "gpu": "none used (CPU benchmark)",
    }


class Runner:
    def __init__(self, args, library):
        self.args = args
        self.quick = args.quick
        self.settings = _settings(args.quick)
        self.results_dir = os.path.join(
            args.out, "results",
            *([BACKEND] if BACKEND in BACKEND_PHASES else [])
        )
        os.makedirs(self.results_dir, exist_ok=True)
        self.json_path = os.path.join(self.results_dir, "benchmark.json")
        self.data = {
            "generated": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
            "settings": dict(self.settings, memory_jobs=args.memory_jobs),
            "machine": _machine(args.isolation),
            "library": library,
            "durations_s": {},
            "failures": [],
        }

    def carry_over(self, phases):
        """Keeps the sections of the phases not run from the previous
        `benchmark.json` at the same place, marked as carried over, so that
        a run of some phases does not drop the others' results."""
        if not os.path.exists(self.json_path):
            return
        with open(self.json_path) as handle:
            previous = json.load(handle)
        if previous.get("settings", {}).get("mode") != self.settings["mode"]:
            return
        sections = {"timing": ["timing"],
                    "memory": ["memory", "memory_isolation_check"],
                    "floors": ["floors"], "exactness": ["exactness"],
                    "distributed": ["distributed"], "profile": ["profile"]}
        carried = {}
        for phase, keys in sections.items():
            if phase in phases:
                continue
            for key in keys:
                if key in previous:
                    self.data[key] = previous[key]
                    carried[phase] = previous.get("generated")
        if carried:
            self.data["carried_over"] = carried

    def log(self, message):
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f} s] {message}", flush=True)

    def child(self, module, function, kwargs, mode=None):
        result = isolation.run_isolated(
            module, function, kwargs, config.CHILD_TIMEOUT,
            mode or self.args.isolation,
        )
        if not result["ok"]:
            failure = {"module": module, "function": function,
                       "kwargs": kwargs, "error": result["error"],
                       "traceback": result.get("traceback", "")}
            self.data["failures"].append(failure)
            self.log(f"  FAILED {module}.{function}: {result['error'][:300]}")
            return None
        return result["value"]

    def save(self):
        with open(self.json_path, "w") as handle:
            json.dump(self.data, handle, indent=1, sort_keys=False)

    def run(self, phases):
        self.started = time.monotonic()
        if self.args.keep_other_phases:
            self.carry_over(phases)
        for phase in phases:
            phase_started = time.monotonic()
            self.log(f"phase {phase}")
            getattr(self, f"phase_{phase}")()
            self.data["durations_s"][phase] = time.monotonic() - phase_started
            self.save()
        self.data["durations_s"]["total"] = time.monotonic() - self.started
        import report

        if BACKEND != "tensorflow":
            # Its own section of results.md; the TensorFlow tables stay.
            report.write_backend_section(
                self.data, os.path.join(self.args.out, "results.md")
            )
        else:
            report.write_all(self.data, self.args.out, self.results_dir,
                             readme_path(self.args, self.quick))
        self.save()
        self.log(f"wrote {self.json_path} and "
                 f"{os.path.join(self.args.out, 'results.md')}")

    def _groups(self, optimizers=None):
        for model in self.settings["models"]:
            for optimizer in optimizers or self.settings["optimizers"]:
                yield model, optimizer

    def _timing_configs(self, model):
        """Every configuration on TensorFlow, `micro_batch_size` with
        `jit_compile=True` too for the models in `micro_xla_models`; on JAX
        and torch the compared methods only (on JAX each configuration
        costs an XLA compilation)."""
        import methods

        if self.settings["mode"] not in ("jax", "torch"):
            return methods.configurations(
                self.settings["ks"],
                # The forward+backward reference and XLA on TensorFlow.
                include_reference=BACKEND == "tensorflow",
                include_micro_xla=BACKEND == "tensorflow" and (
                    model in self.settings.get("micro_xla_models", ())
                ),
            )
        return methods.configurations(
            self.settings["ks"], include_reference=False, include_epoch=False
        )

    def phase_timing(self):
        timing_results = self.data.setdefault("timing", {})
        for model, optimizer in self._groups():
            self.log(f"  timing {model}/{optimizer}")
            rows = self.child("timing", "time_group", {
                "model": model,
                "optimizer": optimizer,
                "ks": self.settings["ks"],
                "examples": self.settings["examples"][model],
                "rounds": self.settings["timing_rounds"],
                "micro_batch": self.settings["micro_batch"],
                "learning_rate": config.LEARNING_RATES[optimizer],
                "jit_compile": self.settings["jit_compile"],
                "configs": self._timing_configs(model),
            })
            timing_results.setdefault(model, {})[optimizer] = rows or []
            self.save()

    def phase_memory(self):
        import concurrent.futures

        import methods

        memory_results = self.data.setdefault("memory", {})
        jobs = max(1, self.args.memory_jobs)
        # JAX and torch: the compared methods at `memory_ks` only.
        small_grid = "memory_ks" in self.settings
        groups = self._groups(self.settings.get("memory_optimizers"))
        for model, optimizer in groups:
            if small_grid:
                configs = methods.configurations(
                    self.settings.get("memory_ks", self.settings["ks"]),
                    include_reference=False,
                    include_epoch=False,
                )
                # At larger k, only the big batch and micro_batch_size.
                for k in self.settings.get("memory_micro_ks", []):
                    if k not in self.settings.get("memory_ks", []):
                        configs += [{"method": "plain_kb", "k": k},
                                    {"method": "keras_accum_micro", "k": k}]
            else:
                configs = methods.configurations(
                    self.settings["ks"],
                    include_reference=BACKEND == "tensorflow",
                )
            self.log(f"  memory {model}/{optimizer}: {len(configs)} "
                     f"processes, {jobs} at a time")
            kwargs = [{
                "model": model,
                "optimizer": optimizer,
                "config": config_,
                "examples": self.settings["examples"][model],
                "micro_batch": self.settings["micro_batch"],
                "learning_rate": config.LEARNING_RATES[optimizer],
                "epochs": self.settings["memory_epochs"],
                "jit_compile": self.settings["jit_compile"],
                "warmup_epochs": self.settings.get("memory_warmup_epochs", 0),
            } for config_ in configs]
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                rows = list(pool.map(
                    lambda k: self.child("memory", "measure_memory", k),
                    kwargs,
                ))
            memory_results.setdefault(model, {})[optimizer] = [
                row for row in rows if row is not None
            ]
            self.save()
        if (self.args.isolation == "fork" and not self.quick
                and BACKEND == "tensorflow"):
            self._isolation_check()

    def _isolation_check(self):
        """One configuration measured in a new interpreter as well, to show
        that forked children measure what fresh interpreters do."""
        import methods

        model = self.settings["models"][-1]
        checks = []
        for config_ in ({"method": "plain_b", "k": 1},
                        {"method": "keras_accum", "k": 8}):
            kwargs = {
                "model": model, "optimizer": "adam", "config": config_,
                "examples": self.settings["examples"][model],
                "micro_batch": config.MICRO_BATCH,
                "learning_rate": config.LEARNING_RATES["adam"],
                "epochs": self.settings["memory_epochs"],
            }
            spawned = self.child("memory", "measure_memory", kwargs, "spawn")
            forked = self.child("memory", "measure_memory", kwargs, "fork")
            if spawned and forked:
                checks.append({
                    "model": model, "optimizer": "adam",
                    "key": methods.config_key(config_),
                    "spawn_increase_mib": spawned["fit_increase_mib"],
                    "fork_increase_mib": forked["fit_increase_mib"],
                })
        self.data["memory_isolation_check"] = checks

    def phase_floors(self):
        settings = self.settings["floors"]
        rows = []
        for model in settings["models"]:
            self.log(f"  floors {model}")
            rows += self.child("floors", "measure_floors", {
                "model": model,
                "ks": settings["ks"],
                "micro_batch": settings["micro_batch"],
                "rounds": settings["rounds"],
            }) or [{"model": model, "error": "failed (see Failures)"}]
        self.data["floors"] = rows

    def phase_exactness(self):
        settings = self.settings["exactness"]
        self.data["exactness"] = self.child("exactness", "measure_exactness", {
            "ragged_examples": settings["ragged_examples"],
            "divisible_examples": settings["divisible_examples"],
            "micro_batch": settings["micro_batch"],
            "ks": settings["ks"],
            "epochs": settings["epochs"],
            "optimizers": self.settings["optimizers"],
        }) or []

    def phase_distributed(self):
        settings = self.settings["distributed"]
        # Always a new interpreter: logical devices need a pristine runtime.
        self.data["distributed"] = self.child(
            "distributed", "measure_distributed", {
                "devices": settings["devices"],
                "k": settings["k"],
                "global_batch": settings["global_batch"],
                "examples": settings["examples"],
                "rounds": settings["rounds"],
                "learning_rate": config.LEARNING_RATES["adam"],
                "quick": self.quick,
            }, mode="spawn",
        )

    def phase_profile(self):
        settings = self.settings["profile"]
        common = {
            "model": settings["model"],
            "optimizer": settings["optimizer"],
            "k": settings["k"],
            "examples": settings["examples"],
            "micro_batch": config.MICRO_BATCH,
            "learning_rate": config.LEARNING_RATES[settings["optimizer"]],
        }
        self.log("  op breakdown (tf.profiler)")
        breakdown = self.child("profile_step", "op_breakdown",
                               dict(common, repeats=1 if self.quick else 3))
        self.log("  variants and jit_compile")
        variants = self.child("profile_step", "variant_timings",
                              dict(common, rounds=settings["rounds"],
                                   quick=self.quick))
        self.data["profile"] = {"op_breakdown": breakdown,
                                "variants": variants}


def readme_path(args, quick):
    """The page whose benchmark table a run rewrites (docs/benchmarks.md):
    only a full run written into the repository's `benchmarks/` updates
    it."""
    if (quick or BACKEND != "tensorflow" or os.path.abspath(args.out) != HERE
            or getattr(args, "no_readme", False)):
        return None
    return os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run (< 3 minutes)")
    parser.add_argument("--out", default=None,
                        help="output directory for results.md and results/ "
                             "(default: benchmarks/, or "
                             "benchmarks/results/tmp/quick with --quick)")
    parser.add_argument("--isolation", choices=("fork", "spawn"),
                        default="fork",
                        help="fresh process per measurement: fork a "
                             "pre-imported parent (default) or start a new "
                             "interpreter each time")
    parser.add_argument("--memory-jobs", type=int, default=1,
                        help="memory measurements run at the same time, "
                             "each in its own process (default 1)")
    phases = BACKEND_PHASES.get(BACKEND, PHASES)
    parser.add_argument("--phases", default=",".join(phases),
                        help=f"comma-separated subset of {','.join(phases)}")
    parser.add_argument("--keep-other-phases", action="store_true",
                        help="with --phases: keep the other phases' results "
                             "from the existing results/benchmark.json "
                             "(marked as carried over)")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite the benchmark table of "
                             "docs/benchmarks.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md and plots from the JSON")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (os.path.join(HERE, "results", "tmp", "quick")
                    if args.quick else HERE)
    args.out = os.path.abspath(args.out)
    if args.report_only:
        import report

        results_dir = os.path.join(args.out, "results")
        if BACKEND != "tensorflow":
            path = os.path.join(results_dir, BACKEND, "benchmark.json")
            with open(path) as handle:
                report.write_backend_section(
                    json.load(handle), os.path.join(args.out, "results.md")
                )
            return 0
        with open(os.path.join(results_dir, "benchmark.json")) as handle:
            data = json.load(handle)
        report.write_all(data, args.out, results_dir,
                         readme_path(args, data["settings"]["mode"] == "quick"))
        return 0
    chosen = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(chosen) - set(phases))
    if unknown:
        parser.error(f"unknown phases {unknown} on {BACKEND}; choose from "
                     f"{phases}")
    library = snapshot_library()
    if args.isolation == "fork":
        # Import once here, run no TensorFlow (JAX, torch) op: forked children
        # start from a pristine runtime without paying the import again.
        import floors  # noqa: F401
        import keras  # noqa: F401
        import memory  # noqa: F401
        import timing  # noqa: F401

        import keras_accum  # noqa: F401

        if BACKEND == "tensorflow":
            import profile_step  # noqa: F401
            import tensorflow  # noqa: F401
    try:
        Runner(args, library).run(chosen)
    finally:
        shutil.rmtree(os.path.dirname(library["snapshot"]),
                      ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
