"""Version of the `keras_accum` package."""

__version__ = "0.1.0"
