"""Cost of `noise_scale=True` per micro-step (issue 29, item 2).

Times `AccumulatingModel(accumulate=8)` against the same model with
`noise_scale=True` on the benchmark's MLP and transformer, alternating in
one process (`timing.time_group`: one warm-up epoch each, then rounds in
which each trains one epoch, in an order rotated per round), and reports
the median over rounds of the ratio of their throughputs *in the same
round* (micro-steps per second with the noise scale / without; 0.95 is
the issue's floor), with its spread.

Usage (from the repository root; ~2-4 minutes per backend on 2 cores):

    KERAS_BACKEND=tensorflow python benchmarks/noise_scale_cost.py
    KERAS_BACKEND=jax python benchmarks/noise_scale_cost.py
    KERAS_BACKEND=torch python benchmarks/noise_scale_cost.py
    # Smoke run into a scratch directory:
    python benchmarks/noise_scale_cost.py --rounds 2 --out /tmp/noise
    # TensorFlow: where the extra time goes (tf.profiler op time per
    # micro-step, `profile_step.op_breakdown`), into <backend>_profile.json:
    python benchmarks/noise_scale_cost.py --profile
    # Rewrite <backend>.md from <backend>.json:
    python benchmarks/noise_scale_cost.py --report-only
    # Another `jit_compile` than the backend's default (TensorFlow under
    # XLA, as on a GPU), into <backend>_jit_compile_on.json and .md:
    KERAS_BACKEND=tensorflow python benchmarks/noise_scale_cost.py \
        --jit-compile on

Writes `benchmarks/results/noise_scale/<backend>.json` (every epoch) and
`<backend>.md` (the table), or under `--out`. Sizes per backend are the
`NOISE_SCALE_*` constants of `config.py`; the micro-batch, `jit_compile`
and input pipeline are those of the backend's main benchmark run.
"""

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import config
import isolation

# Sets KERAS_BACKEND's default, TF's log level and, on torch, the intra-op
# threads before torch is imported, as the main run does.
import run

BACKEND = run.BACKEND
OFF = {"method": "keras_accum", "k": config.NOISE_SCALE_K}
ON = {"method": "keras_accum_noise", "k": config.NOISE_SCALE_K}
MODEL_LABELS = {"mlp": "MLP", "transformer": "Transformer"}


#: Each backend's micro-batch and `jit_compile`: those of its main run
#: (Keras' own default on a CPU, but for JAX, which runs eagerly without).
DEFAULTS = {
    "tensorflow": (config.MICRO_BATCH, False),
    "jax": (config.JAX_MICRO_BATCH, True),
    "torch": (config.TORCH_MICRO_BATCH, False),
}


def _settings(rounds=None, optimizers=None, jit_compile=None):
    micro_batch, default_jit_compile = DEFAULTS[BACKEND]
    if jit_compile is None:
        jit_compile = default_jit_compile
    return {
        "backend": BACKEND,
        "k": config.NOISE_SCALE_K,
        "models": list(config.NOISE_SCALE_MODELS),
        "optimizers": list(optimizers or config.NOISE_SCALE_OPTIMIZERS),
        "micro_batch": micro_batch,
        "jit_compile": jit_compile,
        "examples": config.NOISE_SCALE_EXAMPLES[BACKEND],
        "rounds": rounds or config.NOISE_SCALE_ROUNDS[BACKEND],
        "learning_rates": config.LEARNING_RATES,
    }


def median_interval(values, confidence=0.95):
    """A distribution-free confidence interval of the median: the order
    statistics whose ranks the binomial(n, 1/2) distribution puts around
    it (`None` below 6 values, where no such interval reaches 95%)."""
    values = sorted(values)
    n = len(values)

    def cdf(r):
        return sum(math.comb(n, i) for i in range(r + 1)) / 2 ** n

    best = None
    for low in range(n // 2):
        # P(X_(low+1) <= median <= X_(n-low)) = 1 - 2 P(Bin <= low).
        if 1 - 2 * cdf(low) >= confidence:
            best = low
    if best is None:
        return None
    return values[best], values[n - 1 - best]


def _quantile(values, q):
    values = sorted(values)
    position = q * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def compare(rows):
    """The per-round ratios of `ON` against `OFF` in one group's rows."""
    import methods

    by_key = {row["key"]: row for row in rows if "error" not in row}
    off = by_key.get(methods.config_key(OFF))
    on = by_key.get(methods.config_key(ON))
    if off is None or on is None:
        return {"error": "; ".join(
            row["error"][:300] for row in rows if "error" in row
        ) or "missing configuration"}
    pairs = list(zip(off["epochs"], on["epochs"]))
    # Throughput with the noise scale / without = t(off) / t(on).
    wall = [a["wall_s"] / b["wall_s"] for a, b in pairs]
    cpu = [a["cpu_s"] / b["cpu_s"] for a, b in pairs]
    interval = median_interval(wall)
    fastest = min(a["wall_s"] for a in off["epochs"]) / min(
        b["wall_s"] for b in on["epochs"])
    return {
        "rounds": len(pairs),
        "ratio": statistics.median(wall),
        "ratio_p25": _quantile(wall, 0.25),
        "ratio_p75": _quantile(wall, 0.75),
        "ratio_min": min(wall),
        "ratio_max": max(wall),
        "ratio_ci95": list(interval) if interval else None,
        "cpu_ratio": statistics.median(cpu),
        # The least-disturbed epochs: under heavy foreign load the
        # fastest epoch of each is the closest to a quiet machine's.
        "fastest_epoch_ratio": fastest,
        "ratio_of_medians": off["median_epoch_s"] / on["median_epoch_s"],
        "micro_steps_per_epoch": off["steps_per_epoch"],
        "updates_per_epoch": [off["updates_per_epoch"],
                              on["updates_per_epoch"]],
        "median_epoch_s": [off["median_epoch_s"], on["median_epoch_s"]],
        "micro_step_ms": [
            1000 * off["median_epoch_s"] / off["steps_per_epoch"],
            1000 * on["median_epoch_s"] / on["steps_per_epoch"],
        ],
        "foreign_cpu_share": statistics.median(
            r["foreign_cpu_share"] for r in off["epochs"] + on["epochs"]
        ),
        "per_round_ratios": wall,
    }


def _stem(jit_compile):
    """The results' file name: `<backend>`, or with `_jit_compile_<on|off>`
    where `jit_compile` is not the backend's default."""
    if jit_compile == DEFAULTS[BACKEND][1]:
        return BACKEND
    return f"{BACKEND}_jit_compile_{'on' if jit_compile else 'off'}"


def markdown(data):
    settings = data["settings"]
    lines = [
        f"# Cost of `noise_scale=True`: {BACKEND}"
        + ("" if settings["jit_compile"] == DEFAULTS[BACKEND][1]
           else f", `jit_compile={settings['jit_compile']}`"),
        "",
        (f"Generated {data['generated']} by `{data['command']}`; "
         f"keras_accum {data['library'].get('git_commit')} (package sha256 "
         f"{data['library'].get('sha256')}, uncommitted changes: "
         f"{data['library'].get('uncommitted_changes')}); "
         f"{data['machine'].get('nproc')} CPU cores, "
         f"{data['machine'].get('cpu_model')}."),
        "",
        (f"`accumulate={settings['k']}` with `noise_scale=True` against "
         f"without, b = {settings['micro_batch']}, "
         f"`jit_compile={settings['jit_compile']}`, alternating epochs in "
         "one process. Ratio: throughput (micro-steps/s) with the noise "
         "scale / without, median over rounds of the ratio within a round "
         "(>= 0.95 meets issue 29); IQR, min-max and a distribution-free "
         "95% confidence interval of that median over the rounds; the "
         "median per-round ratio of the process's CPU time; the ratio of "
         "the fastest epochs. Foreign CPU: the median share of the "
        "machine's CPU used by other processes meanwhile."),
        "",
        ("| model | optimizer | examples/epoch | rounds | ratio (median) | "
         "IQR | min-max | 95% CI of median | CPU-time ratio | "
         "fastest-epoch ratio | ms/micro-step off / on | foreign CPU |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, groups in data["results"].items():
        for optimizer, result in groups.items():
            label = MODEL_LABELS.get(model, model)
            if "error" in result:
                lines.append(f"| {label} | {optimizer} | | | failed: "
                             f"{result['error'][:200]} | | | | | | | |")
                continue
            ci = result["ratio_ci95"]
            lines.append(
                f"| {label} | {optimizer} | "
                f"{settings['examples'][model]} | {result['rounds']} | "
                f"{result['ratio']:.3f} | {result['ratio_p25']:.3f}-"
                f"{result['ratio_p75']:.3f} | {result['ratio_min']:.3f}-"
                f"{result['ratio_max']:.3f} | "
                + (f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a")
                + f" | {result['cpu_ratio']:.3f} | "
                f"{result['fastest_epoch_ratio']:.3f} | "
                f"{result['micro_step_ms'][0]:.2f} / "
                f"{result['micro_step_ms'][1]:.2f} | "
                f"{100 * result['foreign_cpu_share']:.0f}% |"
            )
    lines.append("")
    return "\n".join(lines)


def profile(settings, out):
    """TensorFlow only: `profile_step.op_breakdown` of `OFF`, `ON` and the
    forward+backward reference, per model (Adam), 3 repeats each, the
    least-disturbed kept. Op time is CPU work: much steadier than wall
    time on a loaded machine."""
    if BACKEND != "tensorflow":
        raise SystemExit("--profile uses tf.profiler: TensorFlow only")
    library = run.snapshot_library()
    results = {}
    try:
        import keras  # noqa: F401
        import profile_step  # noqa: F401

        for model in settings["models"]:
            print(f"profile {model}", flush=True)
            outcome = isolation.run_isolated(
                "profile_step", "op_breakdown", {
                    "model": model, "optimizer": "adam",
                    "k": settings["k"],
                    "examples": settings["examples"][model],
                    "micro_batch": settings["micro_batch"],
                    "learning_rate": config.LEARNING_RATES["adam"],
                    "repeats": 3,
                    "configs": [{"method": "fwd_bwd", "k": 1}, OFF, ON],
                }, config.CHILD_TIMEOUT, "fork",
            )
            results[model] = outcome["value"] if outcome["ok"] else outcome
    finally:
        shutil.rmtree(os.path.dirname(library["snapshot"]),
                      ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{BACKEND}_profile.json"), "w") as handle:
        json.dump({"generated": datetime.datetime.now().isoformat(
            timespec="seconds"), "library": library, "results": results},
            handle, indent=1)
    for model, rows in results.items():
        if "ok" in rows:
            print(model, "failed:", rows["error"])
            continue
        for key, row in rows.items():
            print(f"{model} {key}: {row['op_ms_per_step']:.3f} op-ms/step, "
                  f"{row['op_executions_per_step']:.1f} ops/step")
            for op in row["top_ops_outside_forward_backward"][:8]:
                print(f"    {op['op']}: {op['ms_per_step']:.4f} ms/step")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per group (default: "
                             "NOISE_SCALE_ROUNDS of config.py)")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated, e.g. sgd,adam (default: "
                             "NOISE_SCALE_OPTIMIZERS)")
    parser.add_argument("--profile", action="store_true",
                        help="TensorFlow: op time per micro-step of both "
                             "configurations and the forward+backward "
                             "reference (tf.profiler), instead of timing")
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "noise_scale"),
        help="directory of <backend>.json and <backend>.md")
    parser.add_argument("--jit-compile", choices=("on", "off"),
                        default=None,
                        help="override the backend's `jit_compile` "
                             "(TensorFlow: off; JAX: on; torch: off); "
                             "writes <backend>_jit_compile_<on|off>.*")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the ratios and <backend>.md from "
                             "the epochs in <backend>.json")
    args = parser.parse_args(argv)
    settings = _settings(
        args.rounds, args.optimizers and args.optimizers.split(","),
        None if args.jit_compile is None else args.jit_compile == "on",
    )
    stem = _stem(settings["jit_compile"])
    if args.report_only:
        path = os.path.join(args.out, f"{stem}.json")
        with open(path) as handle:
            data = json.load(handle)
        for model, groups in data["raw"].items():
            for optimizer, rows in groups.items():
                data["results"][model][optimizer] = compare(rows)
        with open(path, "w") as handle:
            json.dump(data, handle, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
            handle.write(markdown(data))
        print(markdown(data))
        return 0
    if args.profile:
        return profile(settings, args.out)
    library = run.snapshot_library()
    try:
        # Imported once before forking, as run.py does; no op runs here.
        import keras  # noqa: F401
        import timing  # noqa: F401

        import keras_accum  # noqa: F401

        data = {
            "generated": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(
                [f"KERAS_BACKEND={BACKEND}", "python",
                 "benchmarks/noise_scale_cost.py"] + sys.argv[1:]),
            "settings": settings,
            "machine": run._machine("fork"),
            "library": library,
            "results": {},
            "raw": {},
        }
        started = time.monotonic()
        for model in settings["models"]:
            for optimizer in settings["optimizers"]:
                print(f"[{time.monotonic() - started:6.1f} s] {model}/"
                      f"{optimizer}", flush=True)
                outcome = isolation.run_isolated(
                    "timing", "time_group", {
                        "model": model,
                        "optimizer": optimizer,
                        "ks": [settings["k"]],
                        "examples": settings["examples"][model],
                        "rounds": settings["rounds"],
                        "micro_batch": settings["micro_batch"],
                        "learning_rate": config.LEARNING_RATES[optimizer],
                        "jit_compile": settings["jit_compile"],
                        "configs": [OFF, ON],
                    }, config.CHILD_TIMEOUT, "fork",
                )
                rows = outcome["value"] if outcome["ok"] else [
                    {"key": "failed", "error": outcome["error"]}]
                result = compare(rows)
                data["results"].setdefault(model, {})[optimizer] = result
                data["raw"].setdefault(model, {})[optimizer] = rows
                if "error" in result:
                    print(f"  FAILED: {result['error']}", flush=True)
                else:
                    print(f"  ratio {result['ratio']:.3f} (IQR "
                          f"{result['ratio_p25']:.3f}-"
                          f"{result['ratio_p75']:.3f}, CPU "
                          f"{result['cpu_ratio']:.3f}, "
                          f"{result['rounds']} rounds)", flush=True)
        data["duration_s"] = time.monotonic() - started
    finally:
        shutil.rmtree(os.path.dirname(library["snapshot"]),
                      ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as handle:
        handle.write(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
