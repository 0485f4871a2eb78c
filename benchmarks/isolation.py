"""Runs one measurement in a fresh child process and returns its JSON result.

Two ways to get a fresh process:

- `fork` (default): `run.py` imports TensorFlow, Keras and keras_accum once,
  without running any TensorFlow op, then forks one child per measurement.
  The child starts with no TensorFlow runtime, no graph, no allocation and
  no model: the same state as a new interpreter, without paying the ~7 s
  import again for each of the ~70 memory measurements.
- `spawn`: a new Python interpreter per measurement
  (`python benchmarks/isolation.py MODULE FUNCTION KWARGS_JSON OUT_JSON`).
  `run.py --isolation spawn` uses it everywhere; the distributed run always
  uses it, since logical devices must be configured in a pristine process.

A child that raises, crashes or outlives `timeout` is recorded as
`{"ok": False, "error": ...}` instead of stopping the benchmark.

This module also holds the resident-set-size helpers of the memory
measurement.
"""

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _call(module, function, kwargs):
    try:
        value = getattr(importlib.import_module(module), function)(**kwargs)
        return {"ok": True, "value": value}
    except BaseException as error:  # noqa: BLE001 - reported, not raised
        return {
            "ok": False,
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc()[-6000:],
        }


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_forked(module, function, kwargs, timeout):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # Child.
        os.close(read_end)
        try:
            payload = json.dumps(_call(module, function, kwargs)).encode()
        except BaseException as error:  # noqa: BLE001
            payload = json.dumps(
                {"ok": False, "error": f"unserialisable result: {error}"}
            ).encode()
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(pid)
                os.waitpid(pid, 0)
                return {"ok": False, "error": f"timed out after {timeout} s"}
            ready, _, _ = select.select([pipe], [], [], left)
            if not ready:
                continue
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        return {"ok": False, "error": f"child died (wait status {status})"}
    return json.loads(data)


def _run_spawned(module, function, kwargs, timeout):
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "result.json")
        command = [
            sys.executable, os.path.join(HERE, "isolation.py"),
            module, function, json.dumps(kwargs), out,
        ]
        try:
            completed = subprocess.run(
                command, timeout=timeout, capture_output=True, text=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout} s"}
        if not os.path.exists(out):
            return {
                "ok": False,
                "error": f"child exited with {completed.returncode}",
                "traceback": completed.stderr[-6000:],
            }
        with open(out) as handle:
            return json.load(handle)


def run_isolated(module, function, kwargs, timeout, mode="fork"):
    """Calls `module.function(**kwargs)` in a fresh process.

    Returns:
        `{"ok": True, "value": ...}` or `{"ok": False, "error": ...}`.
    """
    if mode == "fork":
        return _run_forked(module, function, kwargs, timeout)
    if mode == "spawn":
        return _run_spawned(module, function, kwargs, timeout)
    raise ValueError(f"`mode` must be 'fork' or 'spawn'. Received: {mode!r}")


# Resident set size --------------------------------------------------------

# glibc `mallopt` parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def make_rss_track_live_memory(mmap_threshold=128 * 1024, arenas=2):
    """Makes RSS follow the live allocations closely (glibc only).

    By default glibc raises its mmap threshold dynamically once large
    blocks are freed, after which freed tensors stay in the heap, and it
    creates one arena per thread: how much freed memory stays resident then
    depends on thread timing, and the peak RSS of identical runs varied by
    +-6 MiB (of ~60 MiB) in this benchmark. A fixed threshold (large blocks
    are mmap-ed and returned on free) and at most two arenas cut that to
    < 1 MiB. Called at the start of each memory child only: timing children
    keep the default allocator behaviour.

    Returns:
        Whether both settings were applied.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_ARENA_MAX, arenas)
        )
    except (OSError, AttributeError):
        return False



def _status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss():
    return _status_bytes("VmRSS")


class PeakRss:
    """High-water mark of this process's RSS from `start()` on.

    Uses the kernel's own counter (`VmHWM`), reset through
    `/proc/self/clear_refs`; where that file is not writable, falls back to
    sampling `VmRSS` every millisecond in a thread (which can miss spikes
    shorter than that).
    """

    def __init__(self):
        self.method = None
        self._peak = 0
        self._stop = None
        self._thread = None

    def start(self):
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.method = "VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
            self._peak = current_rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return current_rss()

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            time.sleep(0.001)

    def stop(self):
        if self._thread is None:
            return _status_bytes("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, current_rss())


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    module_name, function_name, kwargs_json, out_path = sys.argv[1:5]
    result = _call(module_name, function_name, json.loads(kwargs_json))
    with open(out_path, "w") as handle:
        json.dump(result, handle)
