"""Turns the benchmark JSON into `results.md`, target checks and plots."""

import os
import re
import statistics

import methods

MEMORY_TOLERANCE = 1.10  # keras_accum at b within 10% of plain fit at b.
MEMORY_CLEARLY_BELOW = 0.5  # ... and at most half of plain fit at k*b.
SPEED_VS_BUILTIN = 1.0
SPEED_VS_PLAIN_ADAM_MLP_K8 = 1.3
# Issue 26: micro_batch_size=b at batch k*b against plain fit at k*b, and
# against accumulate=k at b.
MICRO_VS_PLAIN_BIG = 0.8
MICRO_VS_ACCUMULATE = 1.0


def _index(rows):
    return {row["key"]: row for row in rows or [] if "error" not in row}


def _time(rows, key):
    row = _index(rows).get(key)
    return None if row is None else row["median_epoch_s"]


def _speedup(rows, baseline_key, key):
    """How many times faster `key` trains than `baseline_key`: the median
    over rounds of the ratio of their epochs in the same round.

    Both trained one epoch in each round, minutes apart at most, so a
    round's ratio cancels the load the machine had then; the median of
    per-round ratios is steadier than a ratio of medians taken from
    different rounds. Falls back to that where rounds do not pair up.
    """
    index = _index(rows)
    baseline, row = index.get(baseline_key), index.get(key)
    if baseline is None or row is None:
        return None
    pairs = list(zip(baseline.get("epochs", []), row.get("epochs", [])))
    if not pairs or len(baseline["epochs"]) != len(row["epochs"]):
        return _ratio(baseline["median_epoch_s"], row["median_epoch_s"])
    return statistics.median(a["wall_s"] / b["wall_s"] for a, b in pairs)


def _memory(rows, key):
    row = _index(rows).get(key)
    return None if row is None else row["fit_increase_mib"]


def _peak_rss(rows, key):
    row = _index(rows).get(key)
    return None if row is None else row["peak_rss_mib"]


def _step_peak(rows, key):
    row = _index(rows).get(key)
    return None if row is None else (row.get("step") or {}).get("peak_mib")


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _fmt(value, digits=2, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _accumulating_keys(ks):
    keys = [f"keras_accum_k{k}" for k in ks] + ["keras_accum_epoch"]
    return keys + [f"builtin_k{k}" for k in ks if k >= 2]


def compute_targets(data):
    """Checks the targets of issue 7 on the measured numbers."""
    targets = []

    def add(target, model, optimizer, k, ratio, met):
        targets.append({
            "target": target, "model": model, "optimizer": optimizer,
            "k": k, "measured": ratio,
            "met": None if ratio is None else met(ratio),
        })

    timing = data.get("timing", {})
    memory = data.get("memory", {})
    ks = data["settings"]["ks"]
    for model, by_optimizer in timing.items():
        for optimizer, rows in by_optimizer.items():
            for k in [k for k in ks if k >= 4]:
                add("throughput >= 1.0x Keras built-in, k >= 4",
                    model, optimizer, k,
                    _speedup(rows, f"builtin_k{k}", f"keras_accum_k{k}"),
                    lambda r: r >= SPEED_VS_BUILTIN)
    for model, by_optimizer in timing.items():
        for optimizer, rows in by_optimizer.items():
            for k in [k for k in ks if k >= 2]:
                micro = f"keras_accum_micro_k{k}"
                add("micro_batch_size=b at k*b >= 0.8x plain fit at k*b",
                    model, optimizer, k,
                    _speedup(rows, f"plain_kb_k{k}", micro),
                    lambda r: r >= MICRO_VS_PLAIN_BIG)
                add("micro_batch_size=b at k*b >= 1.0x accumulate=k at b",
                    model, optimizer, k,
                    _speedup(rows, f"keras_accum_k{k}", micro),
                    lambda r: r >= MICRO_VS_ACCUMULATE)
    mlp_adam = timing.get("mlp", {}).get("adam")
    if mlp_adam and 8 in ks:
        add(">= 1.3x plain fit at b (Adam, k=8, MLP)", "mlp", "adam", 8,
            _speedup(mlp_adam, "plain_b", "keras_accum_k8"),
            lambda r: r >= SPEED_VS_PLAIN_ADAM_MLP_K8)
    for model, by_optimizer in memory.items():
        for optimizer, rows in by_optimizer.items():
            for k in [k for k in ks if k >= 2] + ["epoch"]:
                key = ("keras_accum_epoch" if k == "epoch"
                       else f"keras_accum_k{k}")
                add("peak RSS increase during fit at b within 10% of plain "
                    "fit at b", model, optimizer, k,
                    _ratio(_memory(rows, key), _memory(rows, "plain_b")),
                    lambda r: r <= MEMORY_TOLERANCE)
                # The literal measure: the process's RSS high-water
                # mark (TensorFlow's own ~700 MB included).
                add("process peak RSS at b within 10% of plain fit at b",
                    model, optimizer, k,
                    _ratio(_peak_rss(rows, key), _peak_rss(rows, "plain_b")),
                    lambda r: r <= MEMORY_TOLERANCE)
                step = _step_peak(rows, key)
                if step is not None:
                    add("XLA step peak memory at b within 10% of plain fit "
                        "at b (JAX)", model, optimizer, k,
                        _ratio(step, _step_peak(rows, "plain_b")),
                        lambda r: r <= MEMORY_TOLERANCE)
                if model in ("convnet", "transformer") and k != "epoch" \
                        and k >= 4:
                    add("peak memory clearly below plain fit at k*b "
                        "(<= 0.5x)", model, optimizer, k,
                        _ratio(_memory(rows, key),
                               _memory(rows, f"plain_kb_k{k}")),
                        lambda r: r <= MEMORY_CLEARLY_BELOW)
    return targets


def _fastest_ratio(rows, baseline_key, key):
    """Throughput of `key` over `baseline_key` from their fastest epochs
    (the least disturbed by other processes)."""
    index = _index(rows)
    baseline, row = index.get(baseline_key), index.get(key)
    if baseline is None or row is None:
        return None
    return _ratio(baseline["min_epoch_s"], row["min_epoch_s"])


def micro_batch_rows(data):
    """Per (model, optimizer, k): `micro_batch_size=b` at batch k*b against
    plain fit at k*b, accumulate=k at b, the built-in and plain fit at b
    (throughput ratios, > 1: the micro-batched run is faster), and the
    same with `jit_compile=True` where timed (TensorFlow)."""
    rows = []
    for model, by_optimizer in data.get("timing", {}).items():
        for optimizer, timing_rows in by_optimizer.items():
            index = _index(timing_rows)
            for k in [k for k in data["settings"]["ks"] if k >= 2]:
                micro, big = f"keras_accum_micro_k{k}", f"plain_kb_k{k}"
                if micro not in index:
                    continue
                accumulate = f"keras_accum_k{k}"
                xla = micro + "_jit"

                def speed(base, key):
                    return _speedup(timing_rows, base, key)

                rows.append({
                    "model": model, "optimizer": optimizer, "k": k,
                    "micro_vs_plain_kb": speed(big, micro),
                    "micro_vs_plain_kb_fastest": _fastest_ratio(
                        timing_rows, big, micro),
                    "micro_vs_accumulate": speed(accumulate, micro),
                    "micro_vs_builtin": speed(f"builtin_k{k}", micro),
                    "micro_vs_plain_b": speed("plain_b", micro),
                    "accumulate_vs_plain_kb": speed(big, accumulate),
                    "builtin_vs_plain_kb": speed(big, f"builtin_k{k}"),
                    "plain_b_vs_plain_kb": speed(big, "plain_b"),
                    "micro_xla_vs_plain_kb": speed(big, xla),
                    "micro_xla_vs_micro": speed(micro, xla),
                    "micro_xla_vs_micro_fastest": _fastest_ratio(
                        timing_rows, micro, xla),
                    "agreement": index[micro].get("agreement"),
                    "xla_agreement": (index.get(xla) or {}).get("agreement"),
                })
    return rows


def _micro_batch_section(lines, data):
    rows = micro_batch_rows(data)
    if not rows:
        return
    xla = any(row["micro_xla_vs_micro"] is not None for row in rows)
    lines += [
        "Throughput ratios (> 1: the first faster), each the median over "
        "rounds of the ratio of the two epochs of one round; *fastest* is "
        "the ratio of the two fastest epochs. `micro` is `keras_accum` "
        "with `accumulate=1, micro_batch_size=b` at batch k*b; `accum` is "
        "`accumulate=k` at b. Target (issue 26): micro >= 0.8x plain @ "
        "k*b, and >= 1.0x accum. *weights* is ‖w_micro − w_plain@k*b‖ / "
        "‖w_plain@k*b − w_0‖ after the timed epochs (same updates; float32 "
        "round-off).",
        "",
        "| model | optimizer | k | micro vs plain @ k*b | (fastest) | "
        "micro vs accum | micro vs built-in | micro vs plain @ b | "
        "accum vs plain @ k*b | built-in vs plain @ k*b | plain @ b vs "
        "plain @ k*b | "
        + ("micro XLA vs micro | (fastest) | micro XLA vs plain @ k*b | "
           if xla else "")
        + "mem vs plain @ b | mem vs plain @ k*b | weights | target met |",
        "|" + "---|" * (15 + (3 if xla else 0)),
    ]
    memory = data.get("memory", {})
    for row in rows:
        met = [row["micro_vs_plain_kb"], row["micro_vs_accumulate"]]
        met = ("n/a" if None in met else
               "yes" if met[0] >= MICRO_VS_PLAIN_BIG
               and met[1] >= MICRO_VS_ACCUMULATE else "**no**")
        cells = [row[key] for key in (
            "micro_vs_plain_kb", "micro_vs_plain_kb_fastest",
            "micro_vs_accumulate", "micro_vs_builtin", "micro_vs_plain_b",
            "accumulate_vs_plain_kb", "builtin_vs_plain_kb",
            "plain_b_vs_plain_kb")]
        if xla:
            cells += [row["micro_xla_vs_micro"],
                      row["micro_xla_vs_micro_fastest"],
                      row["micro_xla_vs_plain_kb"]]
        memory_rows = memory.get(row["model"], {}).get(row["optimizer"], [])
        micro_memory = _memory(memory_rows, f"keras_accum_micro_k{row['k']}")
        cells += [_ratio(micro_memory, _memory(memory_rows, "plain_b")),
                  _ratio(micro_memory,
                         _memory(memory_rows, f"plain_kb_k{row['k']}"))]
        agreement = (row["agreement"] or {}).get("plain_kb")
        agreement = "n/a" if agreement is None else f"{agreement:.0e}"
        lines.append(
            f"| {row['model']} | {row['optimizer']} | {row['k']} | "
            + " | ".join(_fmt(c, 2, "x") for c in cells)
            + f" | {agreement} | {met} |"
        )
    lines.append("")


def _floors_section(lines, floors):
    if not floors:
        lines.append("Not run.")
        return
    lines += [
        "The summed gradient of k micro-batches of b against one gradient "
        "of k*b, nothing of `fit` around it (`floors.py`): fastest call of "
        "each, alternating in one process. Ratio = big-batch time / "
        "micro-batched time (throughput; < 1: micro-batching slower). "
        "*gradient* is the relative difference of the two gradients.",
        "",
        "| model | k | b | variant | big batch ms | k micro-batches ms | "
        "ratio | gradient |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in floors:
        if "error" in row:
            lines.append(f"| {row.get('model')} | | | FAILED: "
                         f"{_one_line(row['error'])[:200]} | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['k']} | {row['micro_batch']} | "
            f"{row['variant']} | {row['big_batch_ms']:.1f} | "
            f"{row['micro_batches_ms']:.1f} | {row['ratio']:.2f}x | "
            f"{row['gradient_agreement']:.0e} |"
        )


def micro_step_overheads(data):
    """keras_accum's cost per micro-step over a bare forward+backward."""
    rows = []
    for model, by_optimizer in data.get("timing", {}).items():
        for optimizer, timing_rows in by_optimizer.items():
            index = _index(timing_rows)
            reference = index.get("fwd_bwd")
            if reference is None:
                continue
            steps = reference["steps_per_epoch"]
            base = reference["median_epoch_s"]
            for key in ("keras_accum_epoch",
                        f"keras_accum_k{max(data['settings']['ks'])}",
                        "plain_b"):
                row = index.get(key)
                if row is None:
                    continue
                extra = row["median_epoch_s"] - base
                rows.append({
                    "model": model, "optimizer": optimizer, "key": key,
                    "fwd_bwd_ms_per_step": 1000 * base / steps,
                    "ms_per_step": 1000 * row["median_epoch_s"] / steps,
                    "overhead_ms_per_step": 1000 * extra / steps,
                    "overhead_percent": 100 * extra / base,
                })
    return rows


def _timing_table(lines, model, data):
    timing = data.get("timing", {}).get(model, {})
    memory = data.get("memory", {}).get(model, {})
    lines.append(
        "| optimizer | configuration | k | batch | s/epoch (median) | "
        "s/epoch (min) | examples/s | vs built-in | vs plain@b | "
        "vs plain@k*b | CPU s/epoch | "
        "peak mem +MiB | mem vs plain@b | mem vs plain@k*b | foreign CPU | "
        "updates/epoch |"
    )
    lines.append("|" + "---|" * 16)
    for optimizer, rows in timing.items():
        index = _index(rows)
        memory_rows = memory.get(optimizer, [])
        plain_memory = _memory(memory_rows, "plain_b")
        ordered = sorted(index.values(), key=_row_order)
        for row in ordered:
            key, k = row["key"], row["k"]
            vs_builtin = _speedup(rows, f"builtin_k{k}", key) if row[
                "method"] in ("keras_accum", "plain_kb", "keras_accum_micro") \
                and k and k >= 2 else None
            vs_big = (_speedup(rows, f"plain_kb_k{k}", key)
                      if k and k >= 2 and row["method"] != "plain_kb"
                      else None)
            mem = _memory(memory_rows, key)
            big = (_memory(memory_rows, f"plain_kb_k{k}")
                   if k and k >= 2 and row["method"] != "plain_kb" else None)
            label = methods.LABELS.get(row["method"], key)
            if row["key"].endswith("_jit"):
                label += ", jit_compile=True"
            lines.append(
                f"| {optimizer} | {label} | "
                f"{k if k is not None else 'epoch'} | {row['batch_size']} | "
                f"{row['median_epoch_s']:.3f} | {row['min_epoch_s']:.3f} | "
                f"{row['examples_per_s']:.0f} | "
                f"{_fmt(vs_builtin, 2, 'x')} | "
                f"{_fmt(_speedup(rows, 'plain_b', key), 2, 'x')} | "
                f"{_fmt(vs_big, 2, 'x')} | "
                f"{row['median_cpu_s']:.3f} | {_fmt(mem, 1)} | "
                f"{_fmt(_ratio(mem, plain_memory), 2, 'x')} | "
                f"{_fmt(_ratio(mem, big), 2, 'x')} | "
                f"{row['median_foreign_cpu_share']:.0%} | "
                f"{row['updates_per_epoch']} |"
            )
        for row in rows:
            if "error" in row:
                lines.append(f"| {optimizer} | {row['key']} | | | FAILED: "
                             f"{_one_line(row['error'])[:150]} |" + " |" * 11)


def _row_order(row):
    order = {"plain_b": 0, "fwd_bwd": 1, "plain_kb": 2, "builtin": 3,
             "keras_accum": 4, "keras_accum_micro": 5, "keras_accum_epoch": 6}
    k = row["k"] if row["k"] is not None else 10 ** 6
    if row["method"] in ("plain_b", "fwd_bwd"):
        k = 0
    return (k, order.get(row["method"], 9), row["key"].endswith("_jit"))


def _targets_table(lines, targets):
    lines.append("| target | model | optimizer | k | measured | met |")
    lines.append("|---|---|---|---|---|---|")
    for target in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
        lines.append(
            f"| {target['target']} | {target['model']} | "
            f"{target['optimizer']} | {target['k']} | "
            f"{_fmt(target['measured'], 2, 'x')} | {met} |"
        )


def _exactness_table(lines, rows):
    lines.append(
        "| data | optimizer | window | method | ‖w−w_big‖/‖w_big‖ | "
        "‖w−w_big‖/‖w_big−w0‖ | max per tensor |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for row in rows:
        window = row["window"]
        if row["method"] == "builtin" and window == "epoch":
            window = f"epoch (built-in: steps={row['builtin_steps']})"
        lines.append(
            f"| {row['data']} (n={row['examples']}, b={row['micro_batch']}) | "
            f"{row['optimizer']} | {window} | {row['method']} | "
            f"{row['relative_error']:.1e} | "
            f"{row['error_relative_to_update']:.1e} | "
            f"{row.get('max_per_tensor_relative_error', float('nan')):.1e} |"
        )


def _distributed_section(lines, distributed):
    if not distributed:
        lines.append("Not run or failed to start (see Failures).")
        return
    lines.append(
        f"MLP, Adam, k={distributed['k']}, global batch "
        f"{distributed['global_batch']} ({distributed['per_replica_batch']} "
        f"per replica), {distributed['replicas']} logical CPU devices "
        f"({', '.join(distributed['devices'])}). Both strategies are timed "
        "in the same process, interleaved."
    )
    lines.append("")
    lines.append("| strategy | configuration | batch | s/epoch (median) | "
                 "vs built-in (same strategy) | vs built-in without strategy "
                 "| vs same config without strategy | updates/epoch | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    rows = distributed["rows"]
    for row in sorted(rows, key=lambda r: (r["strategy"], r["key"])):
        if "error" in row:
            lines.append(
                f"| {row['strategy']} | {row['key']} | | | | | | | FAILED: "
                f"{_one_line(row['error'])[:300]} |"
            )
            continue
        builtin = next(
            (r for r in rows if r["strategy"] == row["strategy"]
             and r["key"] == f"builtin_k{distributed['k']}"
             and "error" not in r), None)
        ratio = _ratio(builtin["median_epoch_s"] if builtin else None,
                       row["median_epoch_s"])
        unstrategied = {r["key"]: r for r in rows
                        if r["strategy"] == "none" and "error" not in r}
        builtin_none = _time(list(unstrategied.values()),
                             f"builtin_k{distributed['k']}")
        same_none = _time(list(unstrategied.values()), row["key"])
        seconds = row["median_epoch_s"]
        lines.append(
            f"| {row['strategy']} | {row['key']} | {row['batch_size']} | "
            f"{seconds:.3f} | {_fmt(ratio, 2, 'x')} | "
            f"{_fmt(_ratio(builtin_none, seconds), 2, 'x')} | "
            f"{_fmt(_ratio(same_none, seconds), 2, 'x')} | "
            f"{row['updates_per_epoch']} | ok |"
        )


def _variant_baseline(row, k):
    """What a profile row is compared with: the same configuration without
    jit, or the library itself for a private variant."""
    if row["method"] in methods.VARIANTS:
        return f"keras_accum_k{k}"
    if row["key"].endswith("_jit") and row["method"] != "keras_accum_epoch":
        return row["key"].removesuffix("_jit")
    return None


def _one_line(text):
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    return " ".join(text.split()).replace("|", "/")


def _profile_section(lines, profile, settings):
    if not profile:
        lines.append("Not run.")
        return
    breakdown = profile.get("op_breakdown")
    if breakdown:
        lines.append(
            f"Op time per micro-step from `tf.profiler` (thread-ms summed "
            f"over TensorFlow ops; {settings['model']}, "
            f"{settings['optimizer']}, k={settings['k']}, b=32):"
        )
        lines.append("")
        categories = sorted({c for row in breakdown.values()
                             for c in row["op_ms_per_step_by_category"]})
        lines.append("| configuration | op ms/step | over fwd+bwd | "
                     "op executions/step | " + " | ".join(categories) + " |")
        lines.append("|" + "---|" * (4 + len(categories)))
        for key, row in breakdown.items():
            cells = [_fmt(row["op_ms_per_step_by_category"].get(c), 2)
                     for c in categories]
            lines.append(
                f"| {key} | {row['op_ms_per_step']:.2f} | "
                f"{row['op_ms_per_step_over_fwd_bwd']:+.2f} | "
                f"{row['op_executions_per_step']:.0f} | "
                + " | ".join(cells) + " |"
            )
        accum_key = f"keras_accum_k{settings['k']}"
        if accum_key in breakdown:
            lines.append("")
            lines.append(f"Most expensive ops of `{accum_key}` outside the "
                         "forward/backward pass:")
            lines.append("")
            lines.append("| op | ms/step | executions |")
            lines.append("|---|---|---|")
            for op in breakdown[accum_key]["top_ops_outside_forward_backward"]:
                lines.append(f"| `{op['op'][:90]}` | {op['ms_per_step']:.3f} "
                             f"| {op['executions']} |")
    variants = profile.get("variants")
    if variants:
        lines.append("")
        lines.append("Wall-clock, interleaved in one process (median epoch):")
        lines.append("")
        lines.append("| configuration | s/epoch | time vs baseline | baseline "
                     "| vs fwd+bwd | CPU s/epoch | foreign CPU |")
        lines.append("|---|---|---|---|---|---|---|")
        index = _index(variants["rows"])
        reference = index.get("fwd_bwd")
        for row in variants["rows"]:
            if "error" in row:
                lines.append(f"| {row['key']} | FAILED: "
                             f"{_one_line(row['error'])[:200]} | | | | | |")
                continue
            seconds = row["median_epoch_s"]
            base_key = _variant_baseline(row, settings["k"])
            base = index.get(base_key) if base_key else None
            vs_base = _ratio(seconds, base and base["median_epoch_s"])
            vs_reference = _ratio(
                seconds, reference and reference["median_epoch_s"]
            )
            lines.append(
                f"| {row['key']} | {seconds:.3f} | {_fmt(vs_base, 2, 'x')} | "
                f"{base_key or 'n/a'} | {_fmt(vs_reference, 2, 'x')} | "
                f"{row['median_cpu_s']:.3f} | "
                f"{row['median_foreign_cpu_share']:.0%} |"
            )
        agreement = variants.get("agreement", {})
        if agreement:
            lines.append("")
            lines.append("Same weights as the library without jit after 2 "
                         "epochs (max relative difference, float32): " +
                         ", ".join(f"`{k}`: {_agreement(v)}"
                                   for k, v in agreement.items()))


def _library_line(library):
    if not library:
        return "unknown"
    line = f"commit `{library.get('git_commit')}`"
    if library.get("uncommitted_changes"):
        line += " plus uncommitted changes"
    return (line + f" (package files sha256 `{library['sha256']}`, copied "
            "at the start of the run and used by every process)")


def _agreement(value):
    if isinstance(value, float):
        return f"{value:.1e}"
    return "n/a" if value is None else f"FAILED ({_one_line(value)[:200]})"


def _header(data):
    machine, settings = data["machine"], data["settings"]
    total = data["durations_s"].get("total", 0)
    return [
        "# keras_accum benchmark results",
        "",
        (f"Generated {data['generated']} by `{data['command']}` "
         f"({settings['mode']} mode, {total:.0f} s)."),
        "",
        "## Machine",
        "",
        (f"- `nproc`: {machine['nproc']}; CPU: {machine['cpu_model']}; "
         f"memory: {_fmt(machine['memory_gib'], 1)} GiB; no GPU"),
        (f"- TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, "
         f"keras_accum {machine['keras_accum']}, Python {machine['python']}"),
        f"- {machine['platform']}",
        "- keras_accum measured: " + _library_line(data.get("library")),
        *([("- Carried over from earlier runs (not re-run by this one): "
             + ", ".join(f"{phase} ({when})" for phase, when in
                         data["carried_over"].items()))]
          if data.get("carried_over") else []),
        ("- The *foreign CPU* column is the share of the machine's CPU time "
         "that other processes used during the timed epochs (median). "
         "Ratios come from configurations timed interleaved in the same "
         "process, so they saw the same load."),
        "",
        "## Setup",
        "",
        (f"- Micro-batch b = {settings['micro_batch']}, k in "
         f"{settings['ks']}, optimizers {settings['optimizers']} "
         f"(learning rates {settings['learning_rates']}), synthetic data, "
         "`shuffle=False`, `tf.data` input built before `fit`, "
         "`jit_compile=False` (Keras' default on CPU)."),
        f"- Examples per epoch: {settings['examples']}.",
        (f"- Time: 1 warm-up epoch per configuration, then "
         f"{settings['timing_rounds']} rounds in which every configuration "
         "trains one epoch (order rotated each round); median epoch. "
         "Speed ratios are the median over rounds of the ratio of two "
         "configurations' epochs in the same round. "
         "Epochs are timed from `on_epoch_begin` to `on_epoch_end`, which "
         "includes keras_accum's epoch-end update."),
        (f"- Memory: one fresh process per configuration "
         f"({machine['isolation']}); peak RSS during one `fit` of "
         f"{settings['memory_epochs']} epoch(s) minus RSS just before it."),
        "",
    ]


def _overhead_section(lines, rows):
    lines += [
        "", "## Per micro-step overhead over forward+backward", "",
        ("`fwd_bwd` is a model whose `train_step` computes the gradients "
         "and applies nothing; `keras_accum_epoch` accumulates every "
         "micro-step and applies once per epoch."),
        "",
        ("| model | optimizer | configuration | fwd+bwd ms/step | "
         "ms/step | overhead ms/step | overhead % |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['optimizer']} | {row['key']} | "
            f"{row['fwd_bwd_ms_per_step']:.2f} | {row['ms_per_step']:.2f} | "
            f"{row['overhead_ms_per_step']:+.2f} | "
            f"{row['overhead_percent']:+.1f}% |"
        )


def write_markdown(data, path):
    settings = data["settings"]
    targets = compute_targets(data)
    data["targets"] = targets
    data["micro_step_overhead"] = micro_step_overheads(data)
    lines = _header(data)
    from models import DESCRIPTIONS

    for model in settings["models"]:
        lines += [f"### {DESCRIPTIONS.get(model, model)}", ""]
        _timing_table(lines, model, data)
        lines.append("")
    lines += ["## micro_batch_size=b at batch k*b", ""]
    _micro_batch_section(lines, data)
    lines += ["## Raw floors of micro-batching", ""]
    _floors_section(lines, data.get("floors"))
    lines += ["", "## Targets", ""]
    _targets_table(lines, targets)
    _overhead_section(lines, data["micro_step_overhead"])
    lines += [
        "", "## Exactness (float64)", "",
        ("Tiny MLP (6-16-3), 3 epochs, `shuffle=False`; reference: plain "
         "`fit` with batch k*b (or the whole data set for `\"epoch\"`). "
         "The built-in matches only when k divides the number of "
         "micro-batches per epoch and no micro-batch is short: with 96 "
         "examples (12 micro-batches) for k=4 and for one window of 12; "
         "for k=8 its windows straddle epochs."),
        "",
    ]
    _exactness_table(lines, data.get("exactness") or [])
    lines += ["", "## Distributed (MirroredStrategy, 2 logical CPUs)", ""]
    _distributed_section(lines, data.get("distributed"))
    lines += ["", "## Profile of the library's step", ""]
    _profile_section(lines, data.get("profile"), settings["profile"])
    check = data.get("memory_isolation_check")
    if check:
        lines += ["", "## Fork vs new interpreter (memory)", "",
                  "| model | configuration | fork +MiB | spawn +MiB |",
                  "|---|---|---|---|"]
        for row in check:
            lines.append(f"| {row['model']} | {row['key']} | "
                         f"{row['fork_increase_mib']:.1f} | "
                         f"{row['spawn_increase_mib']:.1f} |")
    lines += ["", "## Failures", ""]
    failures = list(data.get("failures", []))
    for model, by_optimizer in data.get("timing", {}).items():
        for optimizer, rows in by_optimizer.items():
            failures += [dict(r, model=model, optimizer=optimizer)
                         for r in rows if "error" in r]
    if data.get("distributed"):
        failures += [r for r in data["distributed"]["rows"] if "error" in r]
    if not failures:
        lines.append("None.")
    for failure in failures:
        where = failure.get("key") or failure.get("function")
        context = ", ".join(f"{k}={failure[k]}" for k in
                            ("model", "optimizer", "strategy") if k in failure)
        lines.append(f"- `{where}` ({context}): "
                     f"{_one_line(failure['error'])[:600]}")
    lines.append("")
    lines += _kept_backend_sections(path)
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


# The sections of `results.md` that a run on another backend writes, each
# between its markers: (start, end, the framework's name).
BACKEND_SECTIONS = {
    "jax": ("<!-- jax-timing:start (written by KERAS_BACKEND=jax run.py) -->",
            "<!-- jax-timing:end -->", "JAX"),
    "torch": ("<!-- torch-timing:start (written by KERAS_BACKEND=torch "
              "run.py) -->", "<!-- torch-timing:end -->", "PyTorch"),
}
JAX_START, JAX_END, _ = BACKEND_SECTIONS["jax"]


def _kept_backend_sections(path):
    """The JAX and torch sections of an existing `results.md`, which a
    TensorFlow run keeps (and a run on that backend replaces)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        text = handle.read()
    kept = []
    for start_marker, end_marker, _ in BACKEND_SECTIONS.values():
        start, end = text.find(start_marker), text.find(end_marker)
        if start >= 0 and end > start:
            kept += [text[start:end + len(end_marker)], ""]
    return kept


def _backend(data):
    return data["machine"].get("backend", "tensorflow")


def _setup_paragraph(data):
    """How a JAX or torch run timed and measured, in one paragraph."""
    settings = data["settings"]
    if _backend(data) == "jax":
        input_and_compile = (
            "NumPy arrays given to `fit` (no `tf.data`), `jit_compile=True` "
            "(JAX's default)")
        warmup = (f"after {settings.get('memory_warmup_epochs', 0)} warm-up "
                  "epoch(s) in an earlier `fit` (XLA compiles the step "
                  "there, so compilation is not counted)")
        missing = ("No `fwd_bwd` reference and no exactness, distributed or "
                   "profile phases: those use TensorFlow.")
    else:
        input_and_compile = (
            "NumPy arrays given to `fit` (no `tf.data`), eager steps "
            "(`jit_compile=False`, Keras' default on torch), "
            f"{data['machine'].get('torch_threads', '?')} intra-op thread "
            "(`OMP_NUM_THREADS`, see `config.TORCH_THREADS`)")
        warmup = ("with no warm-up `fit` (nothing is compiled: optimizer "
                  "slots and accumulators made during the `fit` count, as "
                  "on TensorFlow)")
        missing = ("No `fwd_bwd` reference, floors, exactness, distributed "
                   "or profile phases: those use TensorFlow's or JAX's "
                   "tools.")
    return (
        f"Same method as the TensorFlow run (one process per group, 1 "
        f"warm-up epoch, then {settings['timing_rounds']} interleaved "
        "rounds, median; speed ratios per round, median), "
        f"micro-batch b = {settings['micro_batch']}, examples per epoch "
        f"{settings['examples']}, {input_and_compile}. Memory: one "
        "fresh (forked) process per configuration for optimizers "
        f"{settings.get('memory_optimizers')} and k in "
        f"{settings.get('memory_ks')}; peak RSS during one `fit` of "
        f"{settings.get('memory_epochs')} epoch minus RSS just before it, "
        f"{warmup}; n/a elsewhere. {missing}")


def backend_section(data):
    """The timing tables of a JAX or torch run, as Markdown lines."""
    from models import DESCRIPTIONS

    machine, settings = data["machine"], data["settings"]
    backend = _backend(data)
    start_marker, end_marker, name = BACKEND_SECTIONS[backend]
    lines = [
        start_marker,
        f"## {name} backend (timing and memory)",
        "",
        (f"Generated {data['generated']} by `KERAS_BACKEND={backend} "
         f"{data['command']}` ({settings['mode']} mode, "
         f"{data['durations_s'].get('total', 0):.0f} s): "
         f"{machine['nproc']} CPU cores ({machine['cpu_model']}), no GPU; "
         f"{name} {machine[backend]}, Keras {machine['keras']}; keras_accum "
         f"measured: {_library_line(data.get('library'))}."),
        "",
        _setup_paragraph(data),
        "",
    ]
    if backend == "torch":
        lines += ["### PyTorch: summary", "",
                  *readme_table(data).rstrip("\n").split("\n"), ""]
    lines += _state_table(data)
    for model in settings["models"]:
        lines += [f"### {name}: {DESCRIPTIONS.get(model, model)}", ""]
        _timing_table(lines, model, data)
        lines.append("")
    lines += [f"### {name}: micro_batch_size=b at batch k*b", ""]
    _micro_batch_section(lines, data)
    if backend == "jax":
        lines += ["### JAX: raw floors of micro-batching", ""]
        _floors_section(lines, data.get("floors"))
        lines.append("")
    targets = compute_targets(data)
    if backend == "jax":
        targets = [t for t in targets if t["target"].startswith("micro")]
    # No `accumulate="epoch"` rows on JAX or torch.
    targets = [t for t in targets
               if t["k"] != "epoch" or t["measured"] is not None]
    lines += ["", f"### {name}: targets", ""]
    _targets_table(lines, targets)
    lines.append("")
    failures = [r for rows in data.get("timing", {}).values()
                for group in rows.values() for r in group if "error" in r]
    failures += data.get("failures", [])
    for failure in failures:
        lines.append(f"- FAILED `{failure.get('key') or failure.get('function')}`"
                     f": {_one_line(failure['error'])[:600]}")
    lines.append(end_marker)
    return lines


def jax_section(data):
    """The JAX backend's timing tables, as Markdown lines."""
    return backend_section(data)


def _state_table(data):
    """The training state and XLA's memory analysis of one train step per
    memory configuration, where measured (JAX)."""
    rows = [
        (model, optimizer, row, _index(group).get("plain_b"))
        for model, by_optimizer in data.get("memory", {}).items()
        for optimizer, group in by_optimizer.items()
        for row in group if "state_mib" in row
    ]
    if not rows:
        return []
    if not any(row.get("step") for _, _, row, _ in rows):
        # torch: no compiled step to analyse.
        lines = [
            "Memory per configuration: the training state (model and "
            "optimizer variables, accumulators included) and the "
            "process's peak RSS increase during the measured `fit`. "
            "All MiB.",
            "",
            "| model | optimizer | configuration | state | peak RSS + | "
            "peak RSS + vs plain @ b |",
            "|---|---|---|---|---|---|",
        ]
        for model, optimizer, row, plain in rows:
            lines.append(
                f"| {model} | {optimizer} | {row['key']} | "
                f"{row['state_mib']:.2f} | {row['fit_increase_mib']:.1f} | "
                + _fmt(_ratio(row["fit_increase_mib"],
                              (plain or {}).get("fit_increase_mib")),
                       2, "x") + " |"
            )
        return lines + [""]
    lines = [
        "Memory per configuration: the training state (model and optimizer "
        "variables, accumulators included); XLA's analysis of the compiled "
        "train step (`memory_analysis()`: temporaries are activations and "
        "gradients; peak = arguments + outputs - donated-and-reused + "
        "temporaries, exact and noise-free); and the process's peak RSS "
        "increase during the measured `fit`. All MiB.",
        "",
        "| model | optimizer | configuration | state | step temporaries | "
        "step peak | step peak vs plain @ b | peak RSS + |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, optimizer, row, plain in rows:
        step = row.get("step") or {}
        peak = step.get("peak_mib")
        vs_plain = _ratio(peak, ((plain or {}).get("step") or {}).get(
            "peak_mib"))
        lines.append(
            f"| {model} | {optimizer} | {row['key']} | "
            f"{row['state_mib']:.2f} | "
            f"{_fmt(step.get('temporaries_mib'))} | {_fmt(peak)} | "
            f"{_fmt(vs_plain, 2, 'x')} | {row['fit_increase_mib']:.1f} |"
        )
    return lines + [""]


def write_backend_section(data, path):
    """Replaces (or appends) the section of `results.md` of the backend
    that produced `data` (JAX or torch)."""
    text = ""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    start_marker, end_marker, _ = BACKEND_SECTIONS[_backend(data)]
    section = "\n".join(backend_section(data))
    start, end = text.find(start_marker), text.find(end_marker)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(end_marker):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as handle:
        handle.write(text)


write_jax_section = write_backend_section


def write_plots(data, results_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = data.get("timing", {})
    memory = data.get("memory", {})
    models = [m for m in data["settings"]["models"] if m in timing]
    optimizers = data["settings"]["optimizers"]
    ks = data["settings"]["ks"]
    paths = []
    if models:
        figure, axes = plt.subplots(
            len(optimizers) + 1, len(models),
            figsize=(5 * len(models), 3.6 * (len(optimizers) + 1)),
            squeeze=False,
        )
        styles = {
            "plain_kb": ("plain fit @ k*b", "tab:gray", "s"),
            "builtin": ("Keras built-in", "tab:orange", "^"),
            "keras_accum": ("keras_accum k", "tab:blue", "o"),
        }
        for column, model in enumerate(models):
            for row_index, optimizer in enumerate(optimizers):
                axis = axes[row_index][column]
                rows = _index(timing[model].get(optimizer, []))
                for method, (label, color, marker) in styles.items():
                    points = [(k, rows[f"{method}_k{k}"]["examples_per_s"])
                              for k in ks if f"{method}_k{k}" in rows]
                    if method == "plain_kb" and "plain_b" in rows:
                        first = (1, rows["plain_b"]["examples_per_s"])
                        points = [first] + points
                    if points:
                        axis.plot(*zip(*points), marker=marker, color=color,
                                  label=label)
                for key, label, style in (
                    ("plain_b", "plain fit @ b", "k--"),
                    ("keras_accum_epoch", 'keras_accum "epoch"', "b:"),
                    ("fwd_bwd", "fwd+bwd only", "g-."),
                ):
                    if key in rows:
                        axis.axhline(rows[key]["examples_per_s"],
                                     linestyle=style[1:], color=style[0],
                                     label=label, linewidth=1)
                axis.set_xscale("log", base=2)
                axis.set_xticks(ks)
                axis.set_xticklabels([str(k) for k in ks])
                axis.set_ylim(bottom=0)
                axis.set_title(f"{model} / {optimizer}: throughput")
                axis.set_xlabel("k (accumulation steps)")
                axis.set_ylabel("examples/s")
                axis.grid(alpha=0.3)
                if column == 0 and row_index == 0:
                    axis.legend(fontsize=7)
            axis = axes[len(optimizers)][column]
            rows = _index(memory.get(model, {}).get("adam", []))
            if rows:
                keys = [key for key in (
                    ["plain_b"] + [f"plain_kb_k{k}" for k in ks if k >= 2]
                    + [f"builtin_k{k}" for k in ks if k >= 2]
                    + [f"keras_accum_k{k}" for k in ks]
                    + ["keras_accum_epoch"]) if key in rows]
                colors = ["tab:gray" if k.startswith("plain") else
                          "tab:orange" if k.startswith("builtin") else
                          "tab:blue" for k in keys]
                axis.bar(range(len(keys)),
                         [rows[k]["fit_increase_mib"] for k in keys],
                         color=colors)
                axis.set_xticks(range(len(keys)))
                axis.set_xticklabels(keys, rotation=60, ha="right",
                                     fontsize=7)
                axis.set_ylabel("peak RSS increase during fit (MiB)")
                axis.set_title(f"{model} / adam: peak memory")
                axis.grid(alpha=0.3, axis="y")
        figure.suptitle(
            f"keras_accum benchmark ({data['settings']['mode']}), b="
            f"{data['settings']['micro_batch']}, "
            f"{data['machine']['nproc']} CPU cores, "
            f"TF {data['machine']['tensorflow']}"
        )
        figure.tight_layout()
        path = os.path.join(results_dir, "benchmark.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


README_START = "<!-- benchmark-table:start (written by benchmarks/run.py) -->"
README_END = "<!-- benchmark-table:end -->"


def readme_table(data):
    """The README's summary: keras_accum's ratios per model, optimizer, k,
    then the raw floors of micro-batching."""
    from models import DESCRIPTIONS

    machine, settings = data["machine"], data["settings"]
    backend = _backend(data)
    xla_column = backend == "tensorflow"
    framework = {
        "jax": f"JAX {machine.get('jax')}",
        "torch": f"PyTorch {machine.get('torch')}",
    }.get(backend, f"TensorFlow {machine.get('tensorflow')}")
    jit = {
        "jax": "`jit_compile=True` (JAX's default)",
        "torch": ("eager steps (`jit_compile=False`, Keras' default on "
                  f"torch), {machine.get('torch_threads', '?')} intra-op "
                  "thread"),
    }.get(backend, "`jit_compile=False` (Keras' default on CPU; the XLA "
                   "column compiles `micro_batch_size` with "
                   "`jit_compile=True`)")
    lines = [
        (f"Measured {data['generated'][:10]} by `{data['command']}`: "
         f"{machine['nproc']} CPU cores ({machine['cpu_model']}), "
         f"{_fmt(machine['memory_gib'], 1)} GiB, no GPU; {framework}, "
         f"Keras {machine['keras']}; keras_accum "
         f"commit `{(data.get('library') or {}).get('git_commit', '?')}`"
         + (" plus uncommitted changes"
            if (data.get("library") or {}).get("uncommitted_changes")
            else "") + ". "
         f"Micro-batch b = {settings['micro_batch']}, {jit}, "
         f"{settings['timing_rounds']} interleaved rounds. Speed ratios are "
         "throughput (higher is better), the median over rounds of the "
         "ratio in each round; memory ratios compare the peak "
         "RSS increase during `fit` (lower is better). All in one run. "
         "`accumulate=k` runs at batch b; `micro_batch_size=b` runs "
         "`accumulate=1` at batch k*b, split inside the step (target: "
         ">= 0.8x plain fit @ k*b)."),
        "",
        "| model | optimizer | k | accumulate=k: vs built-in | "
        "vs plain fit @ b | vs plain fit @ k*b | memory vs plain @ b | "
        "memory vs plain @ k*b | micro_batch_size=b: vs plain fit @ k*b | "
        "vs accumulate=k | "
        + ("with XLA vs without | " if xla_column else "")
        + "memory vs plain @ b | memory vs plain @ k*b |",
        "|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if xla_column else "") + "---|---|",
    ]
    timing, memory = data.get("timing", {}), data.get("memory", {})
    for model, by_optimizer in timing.items():
        for optimizer, rows in by_optimizer.items():
            memory_rows = memory.get(model, {}).get(optimizer, [])
            plain_memory = _memory(memory_rows, "plain_b")
            for k in [k for k in settings["ks"] if k >= 4]:
                ours = f"keras_accum_k{k}"
                micro = f"keras_accum_micro_k{k}"
                big_memory = _memory(memory_rows, f"plain_kb_k{k}")
                mem = _memory(memory_rows, ours)
                micro_mem = _memory(memory_rows, micro)
                ratios = [
                    _speedup(rows, f"builtin_k{k}", ours),
                    _speedup(rows, "plain_b", ours),
                    _speedup(rows, f"plain_kb_k{k}", ours),
                    _ratio(mem, plain_memory),
                    _ratio(mem, big_memory),
                    _speedup(rows, f"plain_kb_k{k}", micro),
                    _speedup(rows, ours, micro),
                ]
                if xla_column:
                    ratios.append(_speedup(rows, micro, micro + "_jit"))
                ratios += [
                    _ratio(micro_mem, plain_memory),
                    _ratio(micro_mem, big_memory),
                ]
                lines.append(
                    f"| {DESCRIPTIONS.get(model, model)} | {optimizer} | {k} | "
                    + " | ".join(_fmt(r, 2, "x") for r in ratios) + " |"
                )
    floors = [row for row in data.get("floors") or [] if "error" not in row]
    if floors:
        lines += [
            "",
            "Raw floors, same run: the summed gradient of k micro-batches "
            "of b against one gradient of k*b, nothing of `fit` around it "
            "(throughput ratio, fastest call of each, alternating):",
            "",
            "| model | variant | "
            + " | ".join(f"k={k}" for k in sorted({r['k'] for r in floors}))
            + " |",
            "|---|---|" + "---|" * len({r["k"] for r in floors}),
        ]
        ks = sorted({r["k"] for r in floors})
        seen = []
        for row in floors:
            if (row["model"], row["variant"]) not in seen:
                seen.append((row["model"], row["variant"]))
        for model, variant in seen:
            cells = {r["k"]: r["ratio"] for r in floors
                     if r["model"] == model and r["variant"] == variant}
            lines.append(f"| {model} | {variant} | "
                         + " | ".join(_fmt(cells.get(k), 2, "x") for k in ks)
                         + " |")
    return "\n".join(lines) + "\n"


def update_readme(data, readme_path):
    """Replaces the table between the README's benchmark markers."""
    with open(readme_path) as handle:
        text = handle.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(
            f"{readme_path} has no benchmark markers: add {README_START!r} "
            f"and {README_END!r} around the table."
        )
    text = (text[: start + len(README_START)] + "\n" + readme_table(data)
            + text[end:])
    with open(readme_path, "w") as handle:
        handle.write(text)


def write_all(data, out_dir, results_dir, readme_path=None):
    """Writes `results.md` and the plots; the README table too when
    `readme_path` is given (full runs into the repository)."""
    write_markdown(data, os.path.join(out_dir, "results.md"))
    if readme_path is not None:
        update_readme(data, readme_path)
    data["plots"] = [os.path.relpath(p, out_dir)
                     for p in write_plots(data, results_dir)]
