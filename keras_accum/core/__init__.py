"""The backend-neutral core of accumulation, written with `keras.ops`."""
