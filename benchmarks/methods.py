"""The training methods the benchmark compares, as configurations.

A configuration is a small dict (`method`, `k`) that `build` turns into a
compiled model plus the batch size its `fit` uses:

- `plain_b`: `keras.Model.fit` at the micro-batch size `b`.
- `plain_kb`: `keras.Model.fit` at the big batch `k * b` (what the
  accumulating methods emulate, when it fits in memory).
- `builtin`: Keras' own `optimizer(gradient_accumulation_steps=k)` at `b`.
- `keras_accum`: `keras_accum.AccumulatingModel(accumulate=k)` at `b`.
- `keras_accum_micro`: `keras_accum.AccumulatingModel(accumulate=1,
  micro_batch_size=b)` at the big batch `k * b`: `fit` hands the step a
  batch of `k * b`, which the compiled step splits into `k` micro-batches
  of `b` (`lax.scan` on JAX, `tf.while_loop` on TensorFlow); one update
  and one host call per `k * b` examples, in the memory of `b`. With
  `"jit": True` in the configuration (TensorFlow) it is compiled with
  `jit_compile=True` instead of Keras' CPU default (no XLA).
- `keras_accum_epoch`: `AccumulatingModel(accumulate="epoch")` at `b`.
- `keras_accum_skip`: `AccumulatingModel(accumulate=k,
  on_nonfinite="skip")`, whose step checks and scales every micro-batch's
  gradients: the cost of the library's step before it weighted the loss and
  moved the finiteness check to the window (profile only).
- `keras_accum_noise`: `AccumulatingModel(accumulate=k, noise_scale=True)`
  at `b`: the gradient noise scale measured on every window (issue 29;
  `noise_scale_cost.py` times it against `keras_accum`).
- `fwd_bwd`: the reference for the per-micro-step overhead: a model whose
  `train_step` does the forward and backward pass and nothing else
  (TensorFlow only).
"""

import keras
from models import build_model
from models import loss

import keras_accum

METHODS = (
    "plain_b",
    "plain_kb",
    "builtin",
    "keras_accum",
    "keras_accum_micro",
    "keras_accum_epoch",
    "fwd_bwd",
)

LABELS = {
    "plain_b": "plain fit @ b",
    "plain_kb": "plain fit @ k*b",
    "builtin": "Keras built-in (gradient_accumulation_steps=k)",
    "keras_accum": "keras_accum accumulate=k",
    "keras_accum_micro": "keras_accum micro_batch_size=b at batch k*b",
    "keras_accum_epoch": 'keras_accum accumulate="epoch"',
    "fwd_bwd": "forward+backward only (reference)",
    "keras_accum_skip": 'keras_accum accumulate=k, on_nonfinite="skip"',
    "keras_accum_xla_apply": "variant: XLA window apply only",
    "keras_accum_noise": "keras_accum accumulate=k, noise_scale=True",
}

# Private variants of the library step (variants.py), for profile_step.py.
VARIANTS = {
    "keras_accum_xla_apply": "XlaApplyAccumulatingModel",
}


class ForwardBackwardModel(keras.Model):
    """Runs the forward and backward pass of a step and applies nothing.

    Its time is the floor that any training step pays; the difference to it
    is the cost of applying (plain fit) or accumulating (keras_accum) the
    gradients. The step returns the sum of one element of every gradient:
    gradients that feed no output are pruned by TensorFlow, and a
    `tf.control_dependencies` on them was measured *not* to keep the
    backward matmuls alive (the pruned step ran 2x faster than a real
    backward pass). One element per gradient costs microseconds.
    """

    def train_step(self, data):
        import tensorflow as tf  # A TensorFlow step (not run on JAX).

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss_value = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            self._loss_tracker.update_state(
                loss_value,
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
        gradients = tape.gradient(loss_value, self.trainable_variables)
        probes = []
        for gradient in gradients:
            if isinstance(gradient, tf.IndexedSlices):
                gradient = gradient.values
            if gradient is not None:
                probes.append(tf.cast(tf.reshape(gradient, [-1])[0], "float32"))
        metrics = self.compute_metrics(x, y, y_pred, sample_weight)
        metrics["gradient_probe"] = tf.add_n(probes)
        return metrics


def config_key(config):
    """A stable name, e.g. `builtin_k8`, `keras_accum_epoch` or
    `plain_b_jit`."""
    method, k = config["method"], config.get("k")
    key = method if method in ("plain_b", "keras_accum_epoch", "fwd_bwd") \
        else f"{method}_k{k}"
    if config.get("jit"):
        key += "_jit"
    return key


def configurations(ks, include_reference=True, include_epoch=True,
                   include_micro_xla=False, micro_ks=None):
    """Every configuration of one (model, optimizer) group, k-independent
    ones first. `keras_accum` at k=1 only when 1 is in `ks`.

    Args:
        include_micro_xla: Also `keras_accum_micro` compiled with
            `jit_compile=True` at every k >= 2 (TensorFlow: its CPU
            default is no XLA).
        micro_ks: The k of the `keras_accum_micro` rows; every k >= 2 of
            `ks` when `None`.
    """
    configs = [{"method": "plain_b", "k": 1}]
    for k in ks:
        if k >= 2:
            configs.append({"method": "plain_kb", "k": k})
            configs.append({"method": "builtin", "k": k})
        configs.append({"method": "keras_accum", "k": k})
        if k >= 2 and (micro_ks is None or k in micro_ks):
            configs.append({"method": "keras_accum_micro", "k": k})
            if include_micro_xla:
                configs.append(
                    {"method": "keras_accum_micro", "k": k, "jit": True}
                )
    if include_epoch:
        configs.append({"method": "keras_accum_epoch", "k": None})
    if include_reference:
        configs.append({"method": "fwd_bwd", "k": 1})
    return configs


def make_optimizer(name, learning_rate, accumulation_steps=None):
    classes = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    return classes[name](
        learning_rate=learning_rate,
        gradient_accumulation_steps=accumulation_steps,
    )


def build(config, model_name, optimizer_name, learning_rate, micro_batch,
          jit_compile=False, seed=0):
    """Returns `(compiled_model, batch_size)` for one configuration.

    `config["jit"]`, when present, overrides `jit_compile`.
    """
    method, k = config["method"], config.get("k")
    jit_compile = config.get("jit", jit_compile)
    accumulation_steps = None
    batch_size = micro_batch
    if method in ("plain_b", "plain_kb"):
        model = build_model(model_name, seed=seed)
        if method == "plain_kb":
            batch_size = k * micro_batch
    elif method == "builtin":
        model = build_model(model_name, seed=seed)
        accumulation_steps = k
    elif method == "keras_accum":
        model = build_model(
            model_name, keras_accum.AccumulatingModel, seed=seed,
            accumulate=k,
        )
    elif method == "keras_accum_micro":
        model = build_model(
            model_name, keras_accum.AccumulatingModel, seed=seed,
            accumulate=1, micro_batch_size=micro_batch,
        )
        batch_size = k * micro_batch
    elif method == "keras_accum_epoch":
        model = build_model(
            model_name, keras_accum.AccumulatingModel, seed=seed,
            accumulate="epoch",
        )
    elif method == "keras_accum_noise":
        model = build_model(
            model_name, keras_accum.AccumulatingModel, seed=seed,
            accumulate=k, noise_scale=True,
        )
    elif method == "keras_accum_skip":
        model = build_model(
            model_name, keras_accum.AccumulatingModel, seed=seed,
            accumulate=k, on_nonfinite="skip",
        )
    elif method in VARIANTS:
        # Private experiments of profile_step.py, not the shipped library.
        import variants

        model = build_model(
            model_name, getattr(variants, VARIANTS[method]), seed=seed,
            accumulate=k,
        )
    elif method == "fwd_bwd":
        model = build_model(model_name, ForwardBackwardModel, seed=seed)
    else:
        raise ValueError(f"Unknown method. Received: method={method!r}")
    model.compile(
        optimizer=make_optimizer(
            optimizer_name, learning_rate, accumulation_steps
        ),
        loss=loss(),
        jit_compile=jit_compile,
    )
    return model, batch_size
