"""Every private Keras API keras_accum relies on, one module per concern.

keras_accum hooks into Keras below its public API: the reduction every
`Loss` goes through, the compiled-loss container, the functional graph, the
trainer's state. These are not stable across Keras releases, so each one is
reached only through a wrapper in this package, and guarded in exactly one
place. Each wrapper's docstring names the Keras versions it was checked on
(the compatibility matrix, docs/compatibility.md, produced by
`scripts/version_matrix.py`), and `tests/compat_test.py` fails if a Keras
release changes one.

- `versions`: the installed Keras version, `KerasInternalsError` and the
  guards the other modules use;
- `losses`: `keras.src.losses.loss` (the reduction hook, masks,
  distribution scaling);
- `regularisers`: how `Layer.__call__` applies activity
  regularisers;
- `functional`: functional models, `Sequential`'s graph, `clone_model`;
- `trainer`: `keras.Model`/`Trainer` internals (the loss entry point, the
  loss tracker, the compiled losses, the JAX trainer's state passing);
- `variables`: the `keras.Variable` arguments of replica-local variables.

Callers import the module they need under a `compat_` alias, e.g.
`from keras_accum._compat import losses as compat_losses`. On a Keras that
lacks a touchpoint, the wrapper raises `KerasInternalsError`, naming the
installed Keras version and the missing piece, instead of a deep traceback
or a silently wrong answer: module-level touchpoints when their module is
imported (each is imported by `import keras_accum`), attribute-level ones
(on a model) when they are first used. Where the installed Keras'
*semantics* differ between supported versions (activity regularisation,
the masked-loss divisor), the branch is taken here too, so the rest of the
library reads one answer.
"""
