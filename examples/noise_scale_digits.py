"""The gradient noise scale, and `accumulate="auto"`, on scikit-learn's digits.

    python examples/noise_scale_digits.py    # under a minute on 2 CPU cores
    KERAS_BACKEND=jax python examples/noise_scale_digits.py

`accumulate="auto"` measures the gradient noise scale
`B_noise = tr(S) / |G|^2` (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training") from the gradients of each window's micro-batches,
and at the start of every epoch sets the window to
`round(B_noise / examples per micro-batch)`, clipped to [2, 64].

Part 1 trains a small MLP with `accumulate="auto"` (micro-batches of 16)
and prints, per epoch, the window in force, the noise scale logged at the
epoch's end (`history.history["noise_scale"]`, which sets the next
epoch's window) and the validation loss; it plots the noise scale and the
effective batch to `out/noise_scale.png`.

Part 2 counts the examples and the optimizer updates each run needs to
first reach a validation loss (`--target`): the auto run against fixed
windows chosen badly on either side (`--small`, default 1: plain `fit` at
the micro-batch; `--large`, default 64: batches of 1024), with the same
optimizer, learning rate, initial weights and example order. The
validation loss is measured after every update. Against the too-large
window the fair measure is the examples (the same compute per example);
against the too-small one, the updates (the sequential steps, which a
bigger batch cuts when its examples run in parallel). Both are printed.

Every number goes to `out/noise_scale_results.json`. It runs on the
backend `KERAS_BACKEND` names (TensorFlow when unset). On torch, on a busy
machine, `OMP_NUM_THREADS=1` keeps the small steps from waiting on
threads.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import noise_scale_config as config  # noqa: E402
import numpy as np  # noqa: E402
from digits_data import ShuffledBatches  # noqa: E402
from digits_data import load_data  # noqa: E402

import keras_accum  # noqa: E402


def build_model(accumulate):
    """The MLP, as an `AccumulatingModel`, from seeded initial weights."""
    keras.utils.set_random_seed(config.SEED)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(config.HIDDEN_UNITS, activation="relu")(
        inputs
    )
    outputs = keras.layers.Dense(config.NUM_CLASSES, activation="softmax")(
        hidden
    )
    return keras_accum.AccumulatingModel(
        inputs, outputs, accumulate=accumulate, name="digits_mlp"
    )


class UpdateTracker(keras.callbacks.Callback):
    """After every optimizer update, the validation loss, the examples
    processed and the updates so far; optionally stops at a target loss.

    Args:
        data: The training `ShuffledBatches` (for the examples per batch).
        validation: `(x, y)` of the validation set.
        target: The validation loss to reach.
        stop_at_target: Whether to stop training once it is reached.
        schedule: The run's `NoiseScaleSchedule`, or `None`; its `current`
            is the window of each epoch.
        window: The fixed window of a run without a schedule.
    """

    def __init__(self, data, validation, target, stop_at_target,
                 schedule=None, window=None):
        super().__init__()
        self.data, self.validation = data, validation
        self.target, self.stop_at_target = target, stop_at_target
        self.schedule, self.window = schedule, window
        self.examples = 0
        self.updates = 0
        self.curve = []  # (examples, updates, validation loss)
        self.windows = []  # The window of each epoch.
        self.epoch_ends = []  # The index in `curve` at each epoch's end.
        self.reached = None  # The first point at or below the target.

    def on_train_begin(self, logs=None):
        self._record(self._validation_loss())

    def on_epoch_begin(self, epoch, logs=None):
        # `fit`'s own callback has set the epoch's window already.
        self.windows.append(
            self.window if self.schedule is None else self.schedule.current
        )

    def on_train_batch_end(self, batch, logs=None):
        self.examples += self.data.batch_examples(batch)
        self._check_update()

    def on_epoch_end(self, epoch, logs=None):
        # The window left over at the epoch's end is applied before this.
        self._check_update()
        self.epoch_ends.append(len(self.curve) - 1)

    def _check_update(self):
        updates = int(keras.ops.convert_to_numpy(
            self.model.optimizer.iterations
        ))
        if updates == self.updates:
            return
        self.updates = updates
        loss = self._validation_loss()
        self._record(loss)
        if self.reached is None and loss <= self.target:
            self.reached = {"examples": self.examples, "updates": updates,
                            "val_loss": loss}
            if self.stop_at_target:
                self.model.stop_training = True

    def _validation_loss(self):
        x, y = self.validation
        probabilities = np.asarray(
            keras.ops.convert_to_numpy(self.model.predict_on_batch(x)),
            dtype="float64",
        )
        return float(-np.mean(np.log(probabilities[np.arange(len(y)), y])))

    def _record(self, loss):
        self.curve.append((self.examples, self.updates, loss))


def train(label, accumulate, epochs, stop_at_target, args, data):
    """Trains one run; returns its numbers."""
    keras.backend.clear_session()
    x_train, x_val, y_train, y_val = data
    batches = ShuffledBatches(
        x_train, y_train, args.batch_size, seed=config.SEED
    )
    model = build_model(accumulate)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    schedule = (
        accumulate if isinstance(accumulate, keras_accum.NoiseScaleSchedule)
        else None
    )
    tracker = UpdateTracker(
        batches, (x_val, y_val), args.target, stop_at_target,
        schedule=schedule, window=None if schedule else accumulate,
    )
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        callbacks=[tracker],
        shuffle=False,  # `ShuffledBatches` shuffles the examples itself.
        verbose=0,
    )
    seconds = time.perf_counter() - start
    epochs_run = len(history.history["loss"])
    print(
        f"{label}: {epochs_run} epochs, {tracker.updates} updates, "
        f"{tracker.examples} examples, {seconds:.1f} s; target "
        + ("not reached" if tracker.reached is None else
           f"reached after {tracker.reached['examples']} examples, "
           f"{tracker.reached['updates']} updates"),
        flush=True,
    )
    return {
        "label": label,
        "accumulate": (
            "auto" if schedule else accumulate
        ),
        "epochs": epochs_run,
        "windows": tracker.windows,
        "epoch_ends": tracker.epoch_ends,
        "updates": tracker.updates,
        "examples": tracker.examples,
        "reached": tracker.reached,
        "curve": tracker.curve,
        "history": {
            k: [float(v) for v in h] for k, h in history.history.items()
        },
        "estimate": (
            None if model.noise_scale_estimate is None
            else model.noise_scale_estimate._asdict()
        ),
        "fit_seconds": seconds,
    }


def format_epoch_table(run, batch_size):
    """Part 1: the auto run, epoch by epoch, as Markdown."""
    history = run["history"]
    lines = [
        (
            "| epoch | window | effective batch | updates "
            "| B_noise (examples) | B_noise / batch | val loss |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    updates_by_epoch = _updates_by_epoch(run)
    for epoch, window in enumerate(run["windows"]):
        noise = history["noise_scale"][epoch]
        lines.append(
            f"| {epoch} | {window} | {window * batch_size} "
            f"| {updates_by_epoch[epoch]} | {noise:,.0f} "
            f"| {noise / batch_size:,.1f} "
            f"| {_val_loss_after_epoch(run, epoch):.3f} |"
        )
    return "\n".join(lines)


def _updates_by_epoch(run):
    ends = run["epoch_ends"]
    totals = [run["curve"][i][1] for i in ends]
    return [b - a for a, b in zip([0] + totals[:-1], totals)]


def _val_loss_after_epoch(run, epoch):
    return run["curve"][run["epoch_ends"][epoch]][2]


def format_comparison(runs, target):
    """Part 2: examples and updates to the target, as Markdown."""
    auto = runs["auto"]["reached"]
    lines = [
        (
            f"| run | effective batch | examples to val loss {target} "
            "| vs auto | updates to it | vs auto |"
        ),
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in runs.values():
        reached = run["reached"]
        if reached is None:
            lines.append(
                f"| {run['label']} | {run['batch']} "
                f"| not in {run['examples']:,} | - "
                f"| not in {run['updates']:,} | - |"
            )
            continue
        ratios = ["-", "-"] if auto is None else [
            f"{reached[k] / auto[k]:.2f}x" for k in ("examples", "updates")
        ]
        lines.append(
            f"| {run['label']} | {run['batch']} "
            f"| {reached['examples']:,} | {ratios[0]} "
            f"| {reached['updates']:,} | {ratios[1]} |"
        )
    return "\n".join(lines)


def conclusion(runs):
    """One line per fixed run: where the auto run wins and where not."""
    auto = runs["auto"]["reached"]
    if auto is None:
        return ["The auto run did not reach the target: no comparison."]
    lines = []
    for key, measure in (("small", "updates"), ("large", "examples")):
        run = runs[key]
        reached = run["reached"]
        if reached is None:
            lines.append(
                f"{run['label']}: did not reach the target within "
                f"{run['examples']:,} examples and {run['updates']:,} "
                "updates; the auto run did."
            )
            continue
        other = "examples" if measure == "updates" else "updates"
        verdict = "fewer" if auto[measure] < reached[measure] else "not fewer"
        lines.append(
            f"{run['label']} (fair measure: {measure}): auto needs "
            f"{verdict} {measure} ({auto[measure]:,} vs "
            f"{reached[measure]:,}); {other}: {auto[other]:,} vs "
            f"{reached[other]:,}."
        )
    return lines


def plot(runs, batch_size, target, train_size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (noise_axes, examples_axes, updates_axes) = plt.subplots(
        1, 3, figsize=(16, 4.4), constrained_layout=True
    )
    auto = runs["auto"]
    windows = np.asarray(auto["windows"]) * batch_size
    ends = np.arange(1, len(windows) + 1)
    noise = np.asarray(auto["history"]["noise_scale"])
    # Epoch e (from e to e + 1 on the axis) trains with the window chosen
    # from the estimate at its start, the point at x = e.
    noise_axes.step(
        np.append(ends - 1, ends[-1]), np.append(windows, windows[-1]),
        where="post", color="tab:blue", linewidth=2,
        label=f"effective batch of the epoch (window x {batch_size})",
    )
    noise_axes.plot(
        ends, np.where(noise > 0, noise, np.nan), "o-", color="tab:red",
        label="B_noise at the epoch's end (history)",
    )
    noise_axes.axhline(
        train_size, color="grey", linestyle=":",
        label=f"the training set ({train_size} examples)",
    )
    noise_axes.set(
        xlabel="epochs completed", ylabel="examples", yscale="log",
        title='accumulate="auto": noise scale and window',
    )
    noise_axes.xaxis.set_major_locator(
        matplotlib.ticker.MaxNLocator(integer=True)
    )
    noise_axes.legend(fontsize="small")

    colours = {"small": "tab:orange", "auto": "tab:blue", "large": "black"}
    for key, run in runs.items():
        curve = np.asarray(run["curve"], dtype="float64")[1:]
        for axes, column in ((examples_axes, 0), (updates_axes, 1)):
            axes.plot(curve[:, column], curve[:, 2], color=colours[key],
                      label=run["label"])
            if run["reached"] is not None:
                axes.plot(
                    run["reached"]["examples" if column == 0 else "updates"],
                    run["reached"]["val_loss"], "o", color=colours[key],
                )
    for axes, xlabel in ((examples_axes, "examples processed"),
                         (updates_axes, "optimizer updates")):
        axes.axhline(target, color="grey", linestyle=":",
                     label=f"target {target}")
        axes.set(xlabel=xlabel, ylabel="validation loss", xscale="log",
                 yscale="log")
        axes.grid(alpha=0.3, which="both")
    examples_axes.set_title("Validation loss by examples")
    updates_axes.set_title("Validation loss by updates")
    examples_axes.legend(fontsize="small")
    noise_axes.grid(alpha=0.3, which="both")
    figure.suptitle(
        "load_digits, MLP, Adam: the window follows the measured noise "
        "scale (left); examples and updates to the target loss (right)"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=config.EPOCHS,
                        help="epochs of the auto run")
    parser.add_argument("--batch-size", type=int, default=config.BATCH_SIZE,
                        help="micro-batch size")
    parser.add_argument("--learning-rate", type=float,
                        default=config.LEARNING_RATE)
    parser.add_argument("--max-window", type=int, default=config.MAX_WINDOW,
                        help="the auto run's largest window")
    parser.add_argument("--target", type=float, default=config.TARGET_LOSS,
                        help="the validation loss to reach")
    parser.add_argument("--small", type=int, default=config.SMALL_WINDOW,
                        help="the too-small fixed window")
    parser.add_argument("--large", type=int, default=config.LARGE_WINDOW,
                        help="the too-large fixed window")
    parser.add_argument("--max-epochs", type=int, default=config.MAX_EPOCHS,
                        help="epochs after which a fixed run stops "
                        "short of the target")
    parser.add_argument("--out", default=config.OUT_DIR,
                        help="directory for the plot and the results JSON")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "small", "large", "max_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_window < 2:
        parser.error("--max-window must be >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The MLP reads the 64 pixels of each image as one vector.
    data = [
        part.reshape(len(part), -1) if part.ndim > 1 else part
        for part in load_data()
    ]
    start = time.perf_counter()
    bs = args.batch_size
    print(f"Backend: {keras.backend.backend()}", flush=True)
    schedule = keras_accum.NoiseScaleSchedule(max_window=args.max_window)
    runs = {}
    runs["auto"] = train(
        'accumulate="auto"', schedule, args.epochs, False, args, data
    )
    runs["auto"]["batch"] = "window x " + str(bs)
    for key, window in (("small", args.small), ("large", args.large)):
        runs[key] = train(
            f"accumulate={window}", window, args.max_epochs, True, args, data
        )
        runs[key]["batch"] = str(window * bs)
    # Order the table small, auto, large.
    runs = {key: runs[key] for key in ("small", "auto", "large")}
    total_seconds = time.perf_counter() - start

    epoch_table = format_epoch_table(runs["auto"], bs)
    comparison = format_comparison(runs, args.target)
    print(
        f"\nPart 1: accumulate=\"auto\", micro-batches of {bs}. B_noise is "
        "history.history['noise_scale'] at the epoch's end, in examples; "
        "it sets the next epoch's window.\n"
    )
    print(epoch_table)
    print(
        f"\nPart 2: examples and updates until the validation loss first "
        f"reaches {args.target} (Adam, learning rate {args.learning_rate}, "
        "the same initial weights and example order).\n"
    )
    print(comparison)
    print()
    lines = conclusion(runs)
    for line in lines:
        print(line)

    plot_path = out / config.PLOT_FILE
    plot(runs, bs, args.target, len(data[0]), plot_path)
    summary = {
        "command": " ".join(
            ["python", "examples/noise_scale_digits.py"] + sys.argv[1:]
        ),
        "backend": keras.backend.backend(),
        "arguments": vars(args),
        "runs": runs,
        "epoch_table": epoch_table,
        "comparison": comparison,
        "conclusion": lines,
        "total_seconds": total_seconds,
    }
    results_path = out / config.RESULTS_FILE
    results_path.write_text(json.dumps(summary, indent=1))
    print(f"\nWrote {plot_path} and {results_path}")
    print(f"Total time {total_seconds:.0f} s.")
    return summary


if __name__ == "__main__":
    main()
