"""A big batch's updates with a small batch's memory, on scikit-learn's digits.

    python examples/train_digits.py          # about 1.5 minutes on 2 CPU cores

Four runs of the same convnet, on the same data, from the same initial
weights, seeing the examples in the same order:

1. `keras.Model.fit` at the micro-batch size (`--batch-size`, default 32).
2. `AccumulatingModel(accumulate="epoch")`: one update per epoch.
3. `AccumulatingModel(accumulate=N)` (`--accumulate`, default 8): the
   update of a batch of N x batch-size examples, computed from micro-batches
   of batch-size.
4. `keras.Model.fit` at N x batch-size: the big batch that run 3 reproduces.

It prints a table (updates, test accuracy, the memory of one train step,
fit time), how far run 3's weights and curves are from run 4's, and writes a
plot to `out/digits_curves.png` and every number to
`out/digits_results.json`. Nothing else is written unless you ask:
`--save-models` also saves run 3's model to `saved_models/` (a `.keras` file
and a serving export) and `--tensorboard DIR` writes TensorBoard logs.

Memory is XLA's own analysis of each run's compiled train step (on the JAX
backend, the default here): the bytes of its inputs (weights, optimizer
state, accumulators, one batch) plus its temporaries (activations and
gradients). It is exact and the same on every run, unlike a process's
resident memory, which is mostly the framework's fixed cost on a model this
small. On the TensorFlow backend (`KERAS_BACKEND=tensorflow`) the example
trains the same way and leaves the memory column empty.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import digits_config as config  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from digits_data import ShuffledBatches  # noqa: E402
from digits_data import load_data  # noqa: E402

import keras_accum  # noqa: E402

MB = 10**6


class Run:
    """One training configuration.

    Args:
        key: Short name, used for TensorBoard sub-directories and JSON keys.
        label: Name printed in the table and the plot legend.
        batch_size: Mini-batch size given to `fit`.
        accumulate: `None` for a plain `keras.Model`, else the
            `AccumulatingModel` window (`"epoch"` or an int).
    """

    def __init__(self, key, label, batch_size, accumulate=None):
        self.key = key
        self.label = label
        self.batch_size = batch_size
        self.accumulate = accumulate

    def effective_batch(self, train_size):
        if self.accumulate is None:
            return self.batch_size
        if self.accumulate == "epoch":
            return train_size
        return self.batch_size * self.accumulate


def make_runs(batch_size, accumulate):
    big_batch = batch_size * accumulate
    return [
        Run("plain", f"plain fit, batch {batch_size}", batch_size),
        Run("epoch", 'accumulate="epoch"', batch_size, accumulate="epoch"),
        Run(
            "accumulate",
            f"accumulate={accumulate}, batch {batch_size}",
            batch_size,
            accumulate=accumulate,
        ),
        Run("reference", f"plain fit, batch {big_batch}", big_batch),
    ]


def build_model(accumulate):
    """The convnet: a `keras.Model`, or an `AccumulatingModel`.

    Each kernel's initializer has its own seed, so every run starts from the
    same weights.
    """
    seeds = iter(range(config.SEED, config.SEED + 100))

    def init():
        return keras.initializers.GlorotUniform(seed=next(seeds))

    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for filters in config.FILTERS:
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu",
            kernel_initializer=init(),
        )(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(
        config.DENSE_UNITS, activation="relu", kernel_initializer=init()
    )(x)
    outputs = keras.layers.Dense(
        config.NUM_CLASSES, activation="softmax", name="probabilities",
        kernel_initializer=init(),
    )(x)
    if accumulate is None:
        return keras.Model(inputs, outputs, name="digits")
    return keras_accum.AccumulatingModel(
        inputs, outputs, accumulate=accumulate, name="digits"
    )


def step_memory(model, x, y, batch_size):
    """XLA's memory analysis of `model`'s compiled train step, in bytes.

    The step is compiled as Keras compiles it on JAX (`jax.jit`, the state
    donated), for one batch of `batch_size`. Returns `None` off JAX.
    """
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
    step = jax.jit(model.train_step, donate_argnums=0)
    analysis = step.lower(state, batch).compile().memory_analysis()
    return {
        "inputs": analysis.argument_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        # The outputs not written over the donated inputs: the logs.
        "other_outputs": max(
            0, analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        ),
    }


def train(run, args):
    """Trains one configuration; returns its numbers and trained model."""
    keras.backend.clear_session()
    x_train, x_test, y_train, y_test = load_data()
    train_data = ShuffledBatches(
        x_train, y_train, run.batch_size, seed=config.SEED
    )

    model = build_model(run.accumulate)
    model.compile(
        optimizer=keras.optimizers.Adam(config.LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    callbacks = []
    if args.tensorboard:
        # One `batch_*` point per optimizer update, at step =
        # `optimizer.iterations`, whatever the window and the epoch length.
        callbacks.append(
            keras_accum.UpdateTensorBoard(
                log_dir=os.path.join(args.tensorboard, run.key),
                write_graph=False,
            )
        )

    print(f"\n== {run.label} ==", flush=True)
    start = time.perf_counter()
    history = model.fit(
        train_data,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        validation_batch_size=256,
        callbacks=callbacks,
        shuffle=False,  # `ShuffledBatches` shuffles the examples itself.
        verbose=2,
    )
    fit_seconds = time.perf_counter() - start
    memory = step_memory(model, x_train, y_train, run.batch_size)
    return model, {
        "label": run.label,
        "batch_size": run.batch_size,
        "effective_batch": run.effective_batch(len(x_train)),
        "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "test_accuracy": float(history.history["val_accuracy"][-1]),
        "step_memory_bytes": memory,
        "step_memory_mb": (
            None if memory is None else sum(memory.values()) / MB
        ),
        "fit_seconds": fit_seconds,
        "history": {
            k: [float(v) for v in h] for k, h in history.history.items()
        },
    }


def save_artifacts(model, directory):
    """Saves `model` as `.keras` (reloadable) and as a serving SavedModel."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / config.MODEL_FILE)
    # `export` writes a TensorFlow SavedModel whose `serve` endpoint maps
    # images to probabilities: no Python class needed to load it. (It needs
    # TensorFlow installed, on JAX too.)
    model.export(str(directory / config.EXPORT_DIR), verbose=False)
    print(
        f"Saved {directory / config.MODEL_FILE} and "
        f"{directory / config.EXPORT_DIR}/",
        flush=True,
    )


def format_table(results, big_batch_key="reference"):
    """The comparison table, as Markdown (readable in a terminal too)."""
    big = results[big_batch_key]["step_memory_mb"]
    lines = [
        "| run | micro-batch | effective batch | updates | test accuracy "
        "| train step memory (MB) | vs big batch | fit time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results.values():
        memory = result["step_memory_mb"]
        lines.append(
            f"| {result['label']} | {result['batch_size']} "
            f"| {result['effective_batch']} | {result['updates']} "
            f"| {result['test_accuracy']:.3f} "
            + ("| - | - " if memory is None else
               f"| {memory:.2f} | {memory / big:.0%} ")
            + f"| {result['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def curve_differences(first, second):
    """Per epoch, the largest difference between two runs' logged values."""
    return np.max(
        [np.abs(np.subtract(first[k], second[k])) for k in first], axis=0
    ).tolist()


def weight_difference(model, reference):
    """Relative difference of two models' weights (largest over tensors)."""
    differences = []
    for w, r in zip(model.get_weights(), reference.get_weights()):
        differences.append(np.linalg.norm(w - r) / np.linalg.norm(r))
    return float(max(differences))


def plot_curves(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with_memory = all(r["step_memory_mb"] for r in results.values())
    figure, axes = plt.subplots(
        1, 3 if with_memory else 2,
        figsize=(15 if with_memory else 10, 4.2),
        constrained_layout=True,
    )
    loss_axes, accuracy_axes = axes[:2]
    # The accumulated run is drawn wide and its reference dashed on top.
    styles = [
        {"linewidth": 1.5, "color": "tab:blue"},
        {"linewidth": 1.5, "color": "tab:orange"},
        {"linewidth": 5, "alpha": 0.45, "color": "tab:green"},
        {"linewidth": 1.5, "linestyle": "--", "color": "black"},
    ]
    for result, style in zip(results.values(), styles):
        history = result["history"]
        epochs = np.arange(1, len(history["loss"]) + 1)
        label = f"{result['label']} ({result['updates']} updates)"
        loss_axes.plot(epochs, history["loss"], label=label, **style)
        accuracy_axes.plot(
            epochs, history["val_accuracy"], label=label, **style
        )
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log")
    loss_axes.set_title("Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    accuracy_axes.set_title("Test accuracy after each epoch")
    accuracy_axes.legend(loc="lower right", fontsize="small")
    for each in (loss_axes, accuracy_axes):
        each.grid(alpha=0.3)
        each.xaxis.set_major_locator(
            matplotlib.ticker.MaxNLocator(integer=True)
        )
    if with_memory:
        memory_axes = axes[2]
        labels = [r["label"] for r in results.values()]
        values = [r["step_memory_mb"] for r in results.values()]
        bars = memory_axes.barh(
            labels, values, color=[s["color"] for s in styles]
        )
        memory_axes.bar_label(bars, fmt="%.1f MB", padding=3)
        memory_axes.invert_yaxis()
        memory_axes.set_xlim(0, max(values) * 1.3)
        memory_axes.set(xlabel="MB (XLA's analysis of the compiled step)")
        memory_axes.set_title("Memory of one train step")
        memory_axes.grid(alpha=0.3, axis="x")
    figure.suptitle(
        "load_digits: the accumulated run (wide, green) and the big batch "
        "(dashed) coincide; the accumulated step holds a fraction of the "
        "memory"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=config.ACCUMULATE,
        help="micro-batches per update for the accumulating run",
    )
    parser.add_argument("--epochs", type=int, default=config.EPOCHS)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=config.BATCH_SIZE,
        help="micro-batch size",
    )
    parser.add_argument(
        "--out",
        default=config.OUT_DIR,
        help="directory for the plot and the results JSON",
    )
    parser.add_argument(
        "--save-models",
        nargs="?",
        const=config.SAVED_MODELS_DIR,
        default=None,
        metavar="DIR",
        help="also save the accumulating run's model (.keras file and "
        f"serving export) to DIR (default when given: "
        f"{config.SAVED_MODELS_DIR})",
    )
    parser.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write TensorBoard logs, one sub-directory per run "
        "(needs the `tensorboard` package)",
    )
    args = parser.parse_args(argv)
    if args.accumulate < 1 or args.epochs < 1 or args.batch_size < 1:
        parser.error(
            "--accumulate, --epochs and --batch-size must be >= 1. Received: "
            f"{args.accumulate}, {args.epochs}, {args.batch_size}"
        )
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error(
            "--tensorboard needs the `tensorboard` package, which writes the "
            "scalar summaries: pip install tensorboard"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, models = {}, {}
    for run in make_runs(args.batch_size, args.accumulate):
        models[run.key], results[run.key] = train(run, args)
    total_seconds = time.perf_counter() - start

    accumulated, big = results["accumulate"], results["reference"]
    table = format_table(results)
    differences = curve_differences(accumulated["history"], big["history"])
    weights = weight_difference(models["accumulate"], models["reference"])
    print(f"\n{table}\n")
    if big["step_memory_mb"] is not None:
        print(
            "Train step memory: XLA's analysis of the compiled step on "
            f"{keras.backend.backend()} (inputs: weights, optimizer state, "
            "accumulators and one batch; plus temporaries: activations and "
            "gradients)."
        )
    else:
        print("Train step memory: run on JAX (the default) to measure it.")
    print(
        f"{accumulated['label']} vs {big['label']}: after "
        f"{accumulated['updates']} updates their weights differ by "
        f"{weights:.0e} (relative); their logged losses and accuracies by at "
        f"most {differences[0]:.0e} after epoch 1 and {max(differences):.0e} "
        "over all epochs (float32 round-off, which training amplifies)."
    )

    if args.save_models:
        save_artifacts(models["accumulate"], args.save_models)
    plot_path = out / config.PLOT_FILE
    plot_curves(results, plot_path)
    summary = {
        "command": " ".join(
            ["python", "examples/train_digits.py"] + sys.argv[1:]
        ),
        "backend": keras.backend.backend(),
        "runs": results,
        "reference_differences": differences,
        "reference_weight_difference": weights,
        "total_seconds": total_seconds,
        "table": table,
    }
    (out / "digits_results.json").write_text(json.dumps(summary, indent=1))
    print(f"Wrote {plot_path} and {out / 'digits_results.json'}")
    print(f"Total time {total_seconds:.0f} s.")
    if args.tensorboard:
        print(f"View the logs with: tensorboard --logdir {args.tensorboard}")


if __name__ == "__main__":
    main()
