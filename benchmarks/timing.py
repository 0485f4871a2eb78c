"""Seconds per epoch of every configuration of one (model, optimizer) group.

Runs in one child process per group. Every configuration is built and
trained for one warm-up epoch (tracing, optimizer and accumulator creation),
then the configurations take turns: round r trains each of them for one
epoch, in an order rotated by r. On a shared 2-core machine the load of
other processes comes and goes over tens of seconds; interleaving puts every
configuration under the same conditions, and the median over rounds drops
the epochs a burst of foreign load hit. Each epoch also records the share
of the machine's CPU used by *other* processes while it ran.
"""

import contextlib
import math
import statistics
import time
import traceback

import keras
import methods
import psutil
from models import fit_inputs
from models import make_data


class EpochTimer(keras.callbacks.Callback):
    """Wall and CPU seconds from `on_epoch_begin` to `on_epoch_end`.

    Defines no batch hook, so Keras keeps dispatching batch-end callbacks
    asynchronously, exactly as for a `fit` without callbacks. It runs after
    keras_accum's epoch-end callback, so its time includes the epoch-end
    update.
    """

    def __init__(self):
        super().__init__()
        self.records = []
        self._begin = None
        self._process = psutil.Process()
        self._cpus = psutil.cpu_count() or 1

    def on_epoch_begin(self, epoch, logs=None):
        self._begin = self._sample()

    def on_epoch_end(self, epoch, logs=None):
        end = self._sample()
        wall = end[0] - self._begin[0]
        own = end[2] - self._begin[2]
        foreign = max(0.0, (end[1] - self._begin[1]) - own)
        self.records.append({
            "wall_s": wall,
            "cpu_s": own,
            "foreign_cpu_share": foreign / max(wall * self._cpus, 1e-9),
        })

    def _sample(self):
        machine = psutil.cpu_times()
        own = self._process.cpu_times()
        # Busy time of the machine; steal (time the hypervisor gave to
        # other guests) counts as foreign load too.
        busy = sum(
            getattr(machine, field, 0.0)
            for field in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        return time.perf_counter(), busy, own.user + own.system


def time_group(model, optimizer, ks, examples, rounds, micro_batch,
               learning_rate, jit_compile=False, configs=None,
               strategies=None):
    """Times every configuration of (`model`, `optimizer`).

    Args:
        jit_compile: Passed to `compile`. `False` is Keras' default on a
            TensorFlow CPU; on JAX, `False` runs eagerly, so the JAX run
            passes `True` (JAX's default).
        configs: The configurations; all of `methods.configurations(ks)`
            when `None` (without the TensorFlow-only `fwd_bwd` on JAX).
        strategies: Dict of name -> `tf.distribute.Strategy` (or `None` for
            no strategy); every configuration is built once per strategy.
            Defaults to `{"none": None}`.

    Returns:
        A list with one dict per (configuration, strategy): its key, the
        epoch records of the timed rounds, the warm-up epoch and the updates
        per epoch, or the error that stopped it.
    """
    if configs is None:
        configs = methods.configurations(
            ks, include_reference=keras.backend.backend() == "tensorflow"
        )
    if strategies is None:
        strategies = {"none": None}
    x, y = make_data(model, examples)
    datasets = {}
    entries, failures = [], []
    for strategy_name, strategy in strategies.items():
        for config in configs:
            entry = {
                "config": config,
                "key": methods.config_key(config),
                "strategy": strategy_name,
            }
            try:
                with _scope(strategy):
                    fitted, batch_size = methods.build(
                        config, model, optimizer, learning_rate, micro_batch,
                        jit_compile=jit_compile,
                    )
                if batch_size not in datasets:
                    datasets[batch_size] = fit_inputs(x, y, batch_size)
                entry.update(
                    model=fitted, batch_size=batch_size, timer=EpochTimer()
                )
                if config["method"] in _AGREEMENT_METHODS:
                    entry["initial_weights"] = fitted.get_weights()
                updates_before = _updates(fitted)
                started = time.perf_counter()
                _fit_one_epoch(entry, datasets)
                entry["warmup_s"] = time.perf_counter() - started
                entry["updates_per_epoch"] = (
                    _updates(fitted) - updates_before
                )
                entry["timer"].records.clear()
                entries.append(entry)
            except Exception as error:  # noqa: BLE001 - recorded
                failures.append(_failure(entry, error))
    for round_index in range(rounds):
        shift = round_index % max(len(entries), 1)
        for entry in entries[shift:] + entries[:shift]:
            _fit_one_epoch(entry, datasets)
    summaries = [_summary(entry, examples) for entry in entries]
    _add_agreement(entries, summaries)
    return summaries + failures


# Configurations whose trained weights are compared with a reference that
# made the same updates: `keras_accum_micro` with plain fit at k*b, and an
# XLA configuration with the same one without XLA.
_AGREEMENT_METHODS = ("plain_kb", "keras_accum_micro")


def _add_agreement(entries, summaries):
    """Adds `agreement` to the summaries of the `keras_accum_micro` rows:
    after the same epochs on the same batches, the distance of their
    weights from those of plain fit at k*b (and, for an XLA row, from the
    same configuration without XLA), relative to the total change of the
    reference's weights, ‖w - w_ref‖ / ‖w_ref - w_0‖ over all weights.
    A check that the timed configurations did the same training (float32
    round-off gives ~1e-6..1e-4), not an exactness test."""
    import numpy as np

    by_key = {entry["key"]: entry for entry in entries}
    for entry, summary in zip(entries, summaries):
        if entry["config"]["method"] != "keras_accum_micro":
            continue
        references = {"plain_kb": f"plain_kb_k{entry['config']['k']}"}
        if entry["config"].get("jit"):
            references["without_xla"] = entry["key"].removesuffix("_jit")
        weights = entry["model"].get_weights()
        agreement = {}
        for name, key in references.items():
            reference = by_key.get(key)
            if reference is None:
                continue
            reference_weights = reference["model"].get_weights()
            difference = np.sqrt(sum(
                np.sum((np.asarray(a, "float64") - b) ** 2)
                for a, b in zip(weights, reference_weights)))
            update = np.sqrt(sum(
                np.sum((np.asarray(b, "float64") - w0) ** 2)
                for b, w0 in zip(reference_weights,
                                 reference["initial_weights"])))
            agreement[name] = float(difference / max(update, 1e-30))
        summary["agreement"] = agreement


def _updates(model):
    # With `gradient_accumulation_steps`, `iterations` is computed: a JAX
    # array, which has no `.numpy()`.
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _scope(strategy):
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def _failure(entry, error):
    message = f"{type(error).__name__}: {error}"
    return {
        "key": entry["key"],
        "method": entry["config"]["method"],
        "k": entry["config"]["k"],
        "strategy": entry["strategy"],
        "error": message[:1500],
        "traceback": traceback.format_exc()[-4000:],
    }


def _summary(entry, examples):
    records = entry["timer"].records
    walls = [r["wall_s"] for r in records]
    median = statistics.median(walls)
    return {
        "key": entry["key"],
        "method": entry["config"]["method"],
        "k": entry["config"]["k"],
        "strategy": entry["strategy"],
        "batch_size": entry["batch_size"],
        "examples_per_epoch": examples,
        "steps_per_epoch": math.ceil(examples / entry["batch_size"]),
        "updates_per_epoch": entry["updates_per_epoch"],
        "warmup_epoch_s": entry["warmup_s"],
        "epochs": records,
        "median_epoch_s": median,
        "min_epoch_s": min(walls),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in records),
        "median_foreign_cpu_share": statistics.median(
            r["foreign_cpu_share"] for r in records
        ),
        "examples_per_s": examples / median,
    }


def _fit_one_epoch(entry, datasets):
    entry["model"].fit(
        **datasets[entry["batch_size"]],
        epochs=1,
        verbose=0,
        callbacks=[entry["timer"]],
        shuffle=False,
    )
