"""`StepFunctions`: what a model keeps about its compiled steps."""


class StepFunctions:
    """The model's own compiled functions, kept off the model so that
    neither Keras nor SavedModel export tracks them.

    Attributes:
        apply: The compiled epoch-end apply (`apply_accumulated_gradients`).
        xla_batch_step: Under `jit_compile` on one device, the XLA-compiled
            accumulation of a batch (see `make_train_function`), else
            `None`.
        xla_window_update: Likewise, the XLA-compiled window update.
        accumulations: Mini-batches accumulated by traced steps (a Python
            count, incremented at trace time; see `custom_steps`).
        terms: The number of Keras loss terms a step computes, once a
            step was traced or counted (`None` before).
        tracing: Whether a JAX step is being traced (accumulators may not
            be created then).
        purged: On JAX, `(variable, value)` pairs `fit` purged, kept until
            the state is synced back (see the JAX trainer).
        micro_batch_override: On JAX, the micro-batch size a candidate
            step of `micro_batch_size="auto"` is compiled with, else `None`.
        micro_batch_choices: Under `"auto"`, the size chosen per input
            shape.
        checked_losses: On torch, the `loss_attribution` check's verdict
            per loss structure `(terms, losses)`, as a trace keeps it.
    """

    def __init__(self):
        self.apply = None
        self.xla_batch_step = None
        self.xla_window_update = None
        self.accumulations = 0
        self.tracing = False
        self.purged = []
        self.terms = None
        self.checked_losses = {}
        self.micro_batch_override = None
        self.micro_batch_choices = {}
