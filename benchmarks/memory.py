"""Peak memory of one configuration, in a fresh child process.

TensorFlow alone holds ~700 MB of RSS before `fit` (KERAS_NOTES.md), so the
absolute RSS says little. The child builds the data pipeline, the model and
the optimizer object, then measures the high-water mark of its RSS during
one `fit` call and reports the increase over the RSS just before it. The
increase covers what training adds: traced graphs, optimizer slots,
accumulators, activations and gradients of a step.

On TensorFlow the input is a `tf.data` pipeline built before the baseline;
on JAX (`jit_compile=True`) the NumPy arrays themselves. XLA compiles the
step inside the first `fit`, so the JAX run first trains `warmup_epochs`
(one) and measures the next `fit`: what training holds, not what compiling
takes. `state_mib` is the exact size of the persistent training state (the
model's variables and the optimizer's, accumulators included).

On JAX, `step` also gives XLA's own account of one compiled train step
(`memory_analysis()` of the step Keras jits, state donated as Keras
donates it): arguments, outputs, the part of the outputs that reuses
donated arguments, and temporaries (activations, gradients). Its peak,
arguments + outputs - aliased + temporaries, is what the device holds
during a step, exact and free of the allocator's and the machine's noise.
"""

import gc
import time

import methods
import numpy as np
from isolation import PeakRss
from isolation import make_rss_track_live_memory
from models import fit_inputs
from models import make_data

MIB = 1024 * 1024


def measure_memory(model, optimizer, config, examples, micro_batch,
                   learning_rate, epochs, jit_compile=False, warmup_epochs=0):
    allocator_tuned = make_rss_track_live_memory()
    x, y = make_data(model, examples)
    fitted, batch_size = methods.build(
        config, model, optimizer, learning_rate, micro_batch,
        jit_compile=jit_compile,
    )
    inputs = fit_inputs(x, y, batch_size)
    if warmup_epochs:
        fitted.fit(**inputs, epochs=warmup_epochs, verbose=0, shuffle=False)
    gc.collect()
    peak = PeakRss()
    baseline = peak.start()
    started = time.perf_counter()
    fitted.fit(**inputs, epochs=epochs, verbose=0, shuffle=False)
    seconds = time.perf_counter() - started
    high_water = peak.stop()
    state = {id(v): v for v in fitted.variables + fitted.optimizer.variables}
    # keras_accum's accumulators are not layer variables (a saved model
    # holds none of them); counted from the accumulator itself.
    accumulator = getattr(fitted, "_accumulator", None)
    if accumulator is not None and accumulator.built:
        state.update({id(v): v for v in accumulator.state_variables()})
    return {
        "step": _step_memory(fitted, x, y, batch_size),
        "key": methods.config_key(config),
        "method": config["method"],
        "k": config["k"],
        "batch_size": batch_size,
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": high_water / MIB,
        "fit_increase_mib": (high_water - baseline) / MIB,
        "rss_method": peak.method,
        "allocator": (
            "glibc mallopt: M_MMAP_THRESHOLD=128 KiB, M_ARENA_MAX=2"
            if allocator_tuned else "default"
        ),
        "fit_seconds": seconds,
        "warmup_epochs": warmup_epochs,
        "state_mib": sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize
            for v in state.values()
        ) / MIB,
    }


def _step_memory(model, x, y, batch_size):
    """XLA's memory analysis of `model`'s train step (MiB), on JAX only."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    batch = (x[:batch_size], y[:batch_size])
    # As Keras jits it (`JAXTrainer.make_train_function`).
    step = jax.jit(model.train_step, donate_argnums=0)
    analysis = step.lower(state, batch).compile().memory_analysis()
    sizes = {
        "arguments_mib": analysis.argument_size_in_bytes / MIB,
        "outputs_mib": analysis.output_size_in_bytes / MIB,
        "aliased_mib": analysis.alias_size_in_bytes / MIB,
        "temporaries_mib": analysis.temp_size_in_bytes / MIB,
    }
    sizes["peak_mib"] = (
        sizes["arguments_mib"] + sizes["outputs_mib"] - sizes["aliased_mib"]
        + sizes["temporaries_mib"]
    )
    return sizes
