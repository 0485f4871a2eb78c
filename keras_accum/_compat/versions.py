"""The installed Keras version and the guards of every private touchpoint.

Serves the other `_compat` modules: `KERAS_VERSION` for their
version-dependent branches, and `require`, `require_parameters` and
`missing` to raise `KerasInternalsError` where a private Keras API is
absent. `CHECKED_KERAS` is the range the version matrix proved (Keras
3.10.0 to 3.15.1).
"""

import inspect

import keras

from keras_accum.version import __version__

# The range proven by the version matrix (docs/compatibility.md); "Keras
# 3.10.0 to 3.15.1" in a `_compat` docstring means each of these releases.
CHECKED_KERAS = "3.10.0, 3.11.3, 3.12.4, 3.13.2, 3.14.1 and 3.15.1"


def _parse(version):
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


#: The installed Keras version as `(major, minor, patch)`.
KERAS_VERSION = _parse(keras.version())


class KerasInternalsError(RuntimeError):
    """The installed Keras lacks a private API keras_accum relies on."""


def missing(piece, checked=CHECKED_KERAS):
    """The `KerasInternalsError` for the absent private API `piece`."""
    return KerasInternalsError(
        f"keras_accum {__version__} relies on `{piece}`, a private Keras API "
        f"that the installed Keras {keras.version()} does not have (checked "
        f"on Keras {checked}). Install a Keras version from the supported "
        "range (docs/compatibility.md), e.g. `pip install 'keras>=3.10'`. "
        f"Received: keras.__version__={keras.version()!r}"
    )


def require(owner, name, piece):
    """`owner.name`, or `missing(piece)` raised where it is absent."""
    value = getattr(owner, name, None)
    if value is None:
        raise missing(piece)
    return value


def require_parameters(function, names, piece):
    """Raises `missing` unless `function` takes every parameter in
    `names`."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise missing(piece) from None
    if not set(names) <= set(parameters):
        raise missing(f"{piece}({', '.join(names)})")
