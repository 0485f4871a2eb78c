"""Trains a convnet on scikit-learn's digits, with and without accumulation.

    python examples/train_digits.py                  # about a minute on 2 cores
    python examples/train_digits.py --tensorboard logs/digits

Four runs on the same data, from the same initial weights, in the same order:

1. `keras.Model.fit` at the micro-batch size (`--batch-size`, default 32).
2. `AccumulatingModel(accumulate="epoch")`: one update per epoch.
3. `AccumulatingModel(accumulate=N)` (`--accumulate`, default 8): a big batch
   of N x batch-size examples made of micro-batches. Saved to
   `saved_models/digits_accum.keras` and exported for serving.
4. `keras.Model.fit` at N x batch-size: the big-batch reference that run 3
   reproduces (their curves coincide).

It prints a comparison table (test accuracy, optimizer updates, peak RSS
increase during `fit`, `fit` wall time), and writes the curves to
`out/digits_curves.png` and the numbers to `out/digits_results.json`.

On Linux each run is a forked child of the launcher, so the memory figures do
not share a heap: the launcher imports TensorFlow but runs no op before
forking. Elsewhere the runs share one process.
"""

import argparse
import importlib.util
import json
import multiprocessing
import os
import pathlib
import sys
import threading
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import digits_config as config  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_accum  # noqa: E402

_FORK = sys.platform.startswith("linux")


class Run:
    """One training configuration.

    Args:
        key: Short name, used for TensorBoard sub-directories and JSON keys.
        label: Name printed in the table and the plot legend.
        batch_size: Mini-batch size given to the dataset.
        accumulate: `None` for a plain `keras.Model`, else the
            `AccumulatingModel` window (`"epoch"` or an int).
        save: Whether to save and export the trained model.
    """

    def __init__(self, key, label, batch_size, accumulate=None, save=False):
        self.key = key
        self.label = label
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.save = save

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
            f"accumulate={accumulate}",
            batch_size,
            accumulate=accumulate,
            save=True,
        ),
        Run("reference", f"plain fit, batch {big_batch}", big_batch),
    ]


def load_data():
    """The digits as (8, 8, 1) float32 images in [0, 1], split with a seed."""
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    labels = digits.target.astype("int32")
    return train_test_split(
        images,
        labels,
        train_size=config.TRAIN_SIZE,
        random_state=config.SPLIT_SEED,
        stratify=labels,
    )


def make_dataset(x, y, batch_size, shuffle):
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        # Shuffling before batching with a fixed seed gives every run the
        # same example order, whatever its batch size.
        dataset = dataset.shuffle(
            len(x), seed=config.SEED, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size)


def build_model(accumulate):
    """The convnet: a `keras.Model`, or an `AccumulatingModel`."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for filters in config.FILTERS:
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            x
        )
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(config.DENSE_UNITS, activation="relu")(x)
    outputs = keras.layers.Dense(
        config.NUM_CLASSES, activation="softmax", name="probabilities"
    )(x)
    if accumulate is None:
        return keras.Model(inputs, outputs, name="digits")
    return keras_accum.AccumulatingModel(
        inputs, outputs, accumulate=accumulate, name="digits"
    )


class PeakRSS:
    """Peak resident memory of this process while the block runs.

    A thread samples the RSS every `interval` seconds; `increase_mb` is the
    highest sample minus the RSS when the block was entered.
    """

    def __init__(self, interval=config.MEMORY_SAMPLE_INTERVAL):
        self._interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = self.peak = 0

    def _sample(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self):
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def increase_mb(self):
        return (self.peak - self.baseline) / 2**20


def train(run, args):
    """Trains one configuration; returns its numbers as a JSON-able dict."""
    keras.utils.set_random_seed(config.SEED)
    x_train, x_test, y_train, y_test = load_data()
    train_data = make_dataset(x_train, y_train, run.batch_size, shuffle=True)
    test_data = make_dataset(x_test, y_test, 256, shuffle=False)

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
    with PeakRSS() as memory:
        history = model.fit(
            train_data,
            epochs=args.epochs,
            validation_data=test_data,
            callbacks=callbacks,
            shuffle=False,  # The dataset shuffles itself.
            verbose=2,
        )
    fit_seconds = time.perf_counter() - start

    if run.save:
        save_artifacts(model, args.saved_models)
    return {
        "label": run.label,
        "batch_size": run.batch_size,
        "effective_batch": run.effective_batch(len(x_train)),
        "updates": int(model.optimizer.iterations.numpy()),
        "test_accuracy": float(history.history["val_accuracy"][-1]),
        "peak_rss_increase_mb": memory.increase_mb,
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
    # images to probabilities: no Python class needed to load it.
    model.export(str(directory / config.EXPORT_DIR), verbose=False)
    print(
        f"Saved {directory / config.MODEL_FILE} and "
        f"{directory / config.EXPORT_DIR}/",
        flush=True,
    )


def _child(connection, run, args):
    try:
        connection.send(("ok", train(run, args)))
    except BaseException:  # Reported by the parent, which re-raises.
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_isolated(run, args):
    """Runs `train(run, args)` in a forked child on Linux, else in-process."""
    if not _FORK:
        keras.backend.clear_session()
        return train(run, args)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, run, args))
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the child process died without a result"
    process.join()
    if status != "ok":
        raise RuntimeError(f"Run {run.label!r} failed:\n{payload}")
    return payload


def format_table(results):
    """The comparison table, as Markdown (readable in a terminal too)."""
    header = (
        "| run | micro-batch | effective batch | updates | test accuracy "
        "| peak RSS increase (MB) | fit time (s) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        lines.append(
            f"| {result['label']} | {result['batch_size']} "
            f"| {result['effective_batch']} | {result['updates']} "
            f"| {result['test_accuracy']:.3f} "
            f"| {result['peak_rss_increase_mb']:.0f} "
            f"| {result['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def curve_differences(first, second):
    """Per epoch, the largest difference between two runs' logged values."""
    return np.max(
        [np.abs(np.subtract(first[k], second[k])) for k in first], axis=0
    ).tolist()


def plot_curves(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (loss_axes, accuracy_axes) = plt.subplots(
        1, 2, figsize=(10, 4), constrained_layout=True
    )
    # The accumulated run is drawn wide and its reference dashed on top.
    styles = [
        {"linewidth": 1.5},
        {"linewidth": 1.5},
        {"linewidth": 4, "alpha": 0.5},
        {"linewidth": 1.5, "linestyle": "--"},
    ]
    for result, style in zip(results, styles):
        history = result["history"]
        epochs = np.arange(1, len(history["loss"]) + 1)
        label = f"{result['label']} ({result['updates']} updates)"
        loss_axes.plot(epochs, history["loss"], label=label, **style)
        accuracy_axes.plot(
            epochs, history["val_accuracy"], label=label, **style
        )
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log")
    loss_axes.set_title("Training loss (mean over the epoch's mini-batches)")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    accuracy_axes.set_title("Test accuracy after each epoch")
    accuracy_axes.legend(loc="lower right", fontsize="small")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(
            matplotlib.ticker.MaxNLocator(integer=True)
        )
    figure.suptitle(
        "load_digits: the accumulated run (wide) and its big-batch reference "
        "(dashed) coincide"
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
        "--saved-models",
        default=config.SAVED_MODELS_DIR,
        help="directory for the .keras file and the serving export",
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
    runs = make_runs(args.batch_size, args.accumulate)
    results = [run_isolated(run, args) for run in runs]
    total_seconds = time.perf_counter() - start

    table = format_table(results)
    differences = curve_differences(
        results[2]["history"], results[3]["history"]
    )
    print(f"\n{table}\n")
    print(
        f"{results[2]['label']} vs {results[3]['label']}: their logged losses "
        f"and accuracies differ by at most {differences[0]:.0e} after epoch 1 "
        f"and {max(differences):.0e} over all {len(differences)} epochs "
        "(float32 round-off, which training amplifies)."
    )
    plot_path = out / config.PLOT_FILE
    plot_curves(results, plot_path)
    summary = {
        "command": " ".join(
            ["python", "examples/train_digits.py"] + sys.argv[1:]
        ),
        "runs": {run.key: result for run, result in zip(runs, results)},
        "reference_differences": differences,
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
