"""Profile of the library's step: where a micro-step's time goes.

Two measurements, each in its own child process:

1. `op_breakdown`: one epoch of each configuration under
   `tf.profiler.experimental`, the trace parsed from its XPlane protobuf.
   Per micro-step it reports the summed execution time of TensorFlow ops
   (thread-milliseconds, so two busy threads count twice) and the number
   of op executions, split into forward/backward, optimizer update and
   the rest (accumulation, loss tracker, counters). Op times are CPU work,
   much less sensitive to the load of other processes than wall time.
2. `variant_timings`: interleaved wall-clock epochs of the library beside
   `jit_compile=True` settings and private variants of its step
   (`variants.py`), plus a check that each variant trains to the same
   weights as the library.
"""

import collections
import glob
import os
import re
import shutil
import tempfile

import methods
import numpy as np
import timing
from models import make_data
from models import make_dataset

# Ops that only call other ops; their events would count their body twice.
_CALL_OPS = {
    "StatefulPartitionedCall", "PartitionedCall", "If", "StatelessIf",
    "While", "StatelessWhile", "Case", "StatelessCase",
}
_OPTIMIZER_SCOPE = re.compile(r"(^|/)(adam|sgd)(_\d+)?/", re.IGNORECASE)


FORWARD_BACKWARD = "forward/backward"
OPTIMIZER = "optimizer update"
BUILTIN_ACCUMULATE = "built-in: accumulate (cond else-branch)"
WINDOW_APPLY = "keras_accum: window divide + reset"
ACCUMULATE = "keras_accum: accumulate (add; check and scale under skip) + loss tracker"
_WINDOW_APPLY_OPS = {"DivNoNan", "AssignVariableOp", "Fill", "ZerosLike"}


def _category(name, op_type, model_scopes):
    if _OPTIMIZER_SCOPE.search(name):
        # The built-in runs its update in the then-branch of a `tf.cond`
        # and its accumulation in the else-branch.
        return BUILTIN_ACCUMULATE if "/else/" in name else OPTIMIZER
    if "gradient_tape/" in name or "compile_loss/" in name:
        return FORWARD_BACKWARD
    if any(scope in name for scope in model_scopes):
        return FORWARD_BACKWARD
    if "/then/" in name and op_type in _WINDOW_APPLY_OPS:
        return WINDOW_APPLY
    # Everything else of a step: keras_accum's finiteness check, scaling
    # and accumulator updates, counters, and the loss tracker (a few
    # scalar ops, < 0.05 ms/step, present in every configuration).
    return ACCUMULATE


def _parse_trace(directory):
    """Summed duration (ms) and count of every op, keyed (name, type)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"),
                      recursive=True)
    space = xplane_pb2.XSpace()
    with open(files[0], "rb") as handle:
        space.ParseFromString(handle.read())
    times, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # Op events are "name:Type"; runtime events ("EagerExecute",
                # "ExecutorState::Process", "EagerLocalExecute: fn") are not.
                if ":" not in name or "::" in name or " " in name:
                    continue
                op_name, op_type = name.rsplit(":", 1)
                if op_type in _CALL_OPS:
                    continue
                key = (op_name.replace("StatefulPartitionedCall/", ""),
                       op_type)
                times[key] += event.duration_ps / 1e9
                counts[key] += 1
    return times, counts


def _profile_epoch(fitted, dataset, directory):
    import tensorflow as tf

    tf.profiler.experimental.start(directory)
    try:
        fitted.fit(dataset, epochs=1, verbose=0, shuffle=False)
    finally:
        tf.profiler.experimental.stop()
    times, counts = _parse_trace(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return times, counts


def op_breakdown(model, optimizer, k, examples, micro_batch, learning_rate,
                 repeats=3, configs=None):
    """Op time per micro-step of each configuration.

    `configs` defaults to the library's step beside the references (the
    forward+backward reference must be among them). A "step" is one `fit`
    batch: for `plain_kb` and `keras_accum_micro`, k micro-batches' worth.

    Every configuration is profiled for one epoch `repeats` times,
    interleaved; the repeat with the least total op time is kept, since a
    thread that loses its core in the middle of an op inflates that op's
    duration (the minimum is the least disturbed measurement of CPU work).
    """
    x, y = make_data(model, examples)
    configs = configs or [
        {"method": "fwd_bwd", "k": 1},
        {"method": "plain_b", "k": 1},
        {"method": "builtin", "k": k},
        {"method": "keras_accum", "k": k},
        {"method": "keras_accum_epoch", "k": None},
        {"method": "keras_accum_skip", "k": k},
    ]
    entries = []
    for config in configs:
        try:
            fitted, batch_size = methods.build(
                config, model, optimizer, learning_rate, micro_batch
            )
            dataset = make_dataset(x, y, batch_size)
            fitted.fit(dataset, epochs=1, verbose=0, shuffle=False)
        except Exception:
            if config["method"] in methods.VARIANTS:
                continue
            raise
        scopes = [fitted.name] + [layer.name for layer in fitted.layers]
        entries.append((methods.config_key(config), fitted, dataset, scopes,
                        -(-examples // batch_size)))
    best = {}
    trace_root = tempfile.mkdtemp(prefix="keras_accum_profile_")
    try:
        for repeat in range(repeats):
            for key, fitted, dataset, _, _ in entries:
                times, counts = _profile_epoch(
                    fitted, dataset, os.path.join(trace_root, f"{key}_{repeat}")
                )
                total = sum(times.values())
                if key not in best or total < best[key][0]:
                    best[key] = (total, times, counts, repeat)
    finally:
        shutil.rmtree(trace_root, ignore_errors=True)
    results = {}
    for key, _, _, scopes, steps in entries:
        total, times, counts, repeat = best[key]
        by_category = collections.Counter()
        for (name, op_type), value in times.items():
            by_category[_category(name, op_type, scopes)] += value
        extra = [
            (name, op_type, value) for (name, op_type), value in times.items()
            if _category(name, op_type, scopes) != FORWARD_BACKWARD
        ]
        extra.sort(key=lambda item: -item[2])
        results[key] = {
            "steps": steps,
            "kept_repeat": repeat,
            "op_ms_per_step": total / steps,
            "op_executions_per_step": sum(counts.values()) / steps,
            "op_ms_per_step_by_category": {
                name: value / steps for name, value in by_category.items()
            },
            "top_ops_outside_forward_backward": [
                {"op": f"{name}:{op_type}", "ms_per_step": value / steps,
                 "executions": counts[(name, op_type)]}
                for name, op_type, value in extra[:12]
            ],
        }
    reference = results["fwd_bwd"]["op_ms_per_step"]
    for row in results.values():
        row["op_ms_per_step_over_fwd_bwd"] = row["op_ms_per_step"] - reference
    return results


VARIANT_CONFIGS = (
    {"method": "fwd_bwd", "k": 1},
    {"method": "plain_b", "k": 1},
    {"method": "plain_b", "k": 1, "jit": True},
    {"method": "builtin", "k": 8},
    {"method": "builtin", "k": 8, "jit": True},
    {"method": "keras_accum", "k": 8},
    {"method": "keras_accum", "k": 8, "jit": True},
    {"method": "keras_accum_epoch", "k": None, "jit": True},
    {"method": "keras_accum_xla_apply", "k": 8},
    {"method": "keras_accum_skip", "k": 8},
)


def variant_timings(model, optimizer, k, examples, rounds, micro_batch,
                    learning_rate, quick=False):
    configs = [dict(c, k=k) if c["k"] == 8 else dict(c)
               for c in VARIANT_CONFIGS]
    if quick:
        configs = [c for c in configs if c["method"] in (
            "keras_accum", "keras_accum_xla_apply", "keras_accum_skip")]
    rows = timing.time_group(
        model, optimizer, ks=(k,), examples=examples, rounds=rounds,
        micro_batch=micro_batch, learning_rate=learning_rate,
        configs=configs,
    )
    return {"rows": rows, "agreement": _variant_agreement(
        model, optimizer, k, micro_batch, learning_rate, quick
    )}


def _variant_agreement(model, optimizer, k, micro_batch, learning_rate,
                       quick=False):
    """Max relative weight difference of each jit setting or variant to the
    library without jit, after 2 epochs from the same start (float32)."""
    x, y = make_data(model, 16 * micro_batch, seed=1)
    dataset = make_dataset(x, y, micro_batch)
    weights = {}
    for config in (
        {"method": "keras_accum", "k": k},
        {"method": "keras_accum", "k": k, "jit": True},
        {"method": "keras_accum_xla_apply", "k": k},
        {"method": "keras_accum_skip", "k": k},
    ):
        if quick and config["method"] not in (
                "keras_accum", "keras_accum_xla_apply",
                "keras_accum_skip"):
            continue
        key = methods.config_key(config)
        try:
            fitted, _ = methods.build(
                config, model, optimizer, learning_rate, micro_batch
            )
            fitted.fit(dataset, epochs=2, verbose=0, shuffle=False)
            weights[key] = [np.asarray(w) for w in fitted.get_weights()]
        except Exception as error:  # noqa: BLE001 - recorded
            weights[key] = f"{type(error).__name__}: {error}"[:500]
    reference = weights[f"keras_accum_k{k}"]
    agreement = {}
    for key, value in weights.items():
        if isinstance(value, str) or isinstance(reference, str):
            agreement[key] = value if isinstance(value, str) else None
            continue
        agreement[key] = max(
            float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            for a, b in zip(value, reference)
        )
    return agreement
