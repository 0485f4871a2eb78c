"""Runs the test slice on every supported TensorFlow/Keras combination.

Each combination gets its own virtual environment (reused when it exists)
with exactly that TensorFlow and Keras, the test requirements, and keras_accum
installed from this checkout or from a built wheel (`--wheel`), then runs the
tests marked `slice` (exactness, normalisation, saving round trips of every
model form, schedules, one distribution test, the private-Keras checks).
A combination that names a JAX version (jaxlib the same) has it installed in
the same environment where pip can install it beside that TensorFlow, and
also runs the tests marked `slice` and `jax` on JAX (`KERAS_BACKEND=jax`).
Where pip cannot (TensorFlow 2.16 pins `ml-dtypes~=0.3.1`; JAX 0.4.29 and
>= 0.4.35 need `ml-dtypes>=0.4`; `JAX_APART` names such combinations, so
that no run pays for finding out), the JAX slice gets a second, small
environment: that Keras and JAX and no TensorFlow, as `keras-accum[jax]` on
a TPU runtime has it (tests/conftest.py then leaves out the modules that
need TensorFlow). A combination that names a PyTorch version (the
`torch-*` rows: Keras and PyTorch, no TensorFlow, no JAX, as
`keras-accum[torch]` has it) runs its slice on PyTorch
(`KERAS_BACKEND=torch`). Which tests each backend's slice selects is one
table, `SLICES`. `--install-only` builds the environments and checks them
(requirements, imports) without running tests or recording results. Each
combination's last result is kept in
`scripts/version_matrix.json` (merged, so combinations can be run one at a
time); the Markdown table (versions x pass/fail) is made from it, and
`--readme` writes it into docs/compatibility.md between the `version-matrix`
markers.

Usage:

    python scripts/version_matrix.py                    # the whole matrix
    python scripts/version_matrix.py --only lowest      # one combination
    python scripts/version_matrix.py --only lowest --wheel dist/*.whl
    python scripts/version_matrix.py --only torch-lowest --install-only
    python scripts/version_matrix.py --readme           # and into the docs
    python scripts/version_matrix.py --table-only --readme  # runs nothing

Environments live in `--venvs` (default `/tmp/venvs`); pip's cache makes a
rebuild cheap. `tensorflow-cpu` is installed: lighter, same Python code.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_FLOOR = "0.4.29"
# The floor in pyproject.toml's `torch` extra. Below it Keras fails with
# PyTorch, found with a fit/evaluate/save/load smoke test on CPU
# (docs/compatibility.md): < 2.1 lacks `torch.float8_e4m3fn` (Keras 3.10
# fails at import), 2.1 and 2.2 need NumPy < 2 (pip installs NumPy 2 beside
# them: `torch.as_tensor` fails) and fail at import with Keras 3.15
# (`torch.utils._pytree.register_pytree_node(flatten_with_keys_fn=...)`).
TORCH_FLOOR = "2.3.0"
RESULTS = ROOT / "scripts" / "version_matrix.json"

# The tests each backend's slice runs (`pytest -m`), and the module whose
# `__version__` the log records. The tests that run on every backend carry
# the `backends` marker.
SLICES = {
    "tensorflow": "slice",
    "jax": "slice and backends",
    "torch": "slice and backends",
}

# (TensorFlow, Keras, JAX, PyTorch), each but Keras possibly None (not
# installed; a backend whose version is None is not run): the supported
# range's ends and the
# versions where Keras' behaviour changes (3.12: JAX state shardings in
# `jit`; 3.13: masked divisor; 3.14: activity regularisation; 3.15:
# functional get_config), each with a JAX of its time. Every TensorFlow
# pins a Keras floor: 2.16 >= 3.0,
# 2.17 >= 3.2, 2.18/2.19 >= 3.5, 2.20 >= 3.10, 2.21 >= 3.12. The lowest JAX
# is the floor in pyproject.toml's `jax` extra (docs/compatibility.md).
MATRIX = {
    "lowest": ("2.16.2", "3.10.0", JAX_FLOOR, None),
    "tf2.17-keras3.11": ("2.17.1", "3.11.3", "0.6.2", None),
    "tf2.18-keras3.12": ("2.18.1", "3.12.4", "0.7.2", None),
    "tf2.19-keras3.13": ("2.19.1", "3.13.2", "0.8.3", None),
    "tf2.19-keras3.14": ("2.19.1", "3.14.1", "0.9.2", None),
    "tf2.20-keras3.15": ("2.20.0", "3.15.1", "0.10.0", None),
    "newest": ("2.21.0", "3.15.1", "0.10.2", None),
    # PyTorch: Keras and PyTorch only, like `keras-accum[torch]`; the
    # lowest Keras with the lowest PyTorch, the newest with the newest
    # (2.13.0: the CPU build, `torch-2.13.0+cpu`, where pip finds it).
    "torch-lowest": (None, "3.10.0", None, TORCH_FLOOR),
    "torch-newest": (None, "3.15.1", None, "2.13.0"),
}
# Combinations whose JAX pip cannot install beside their TensorFlow, so its
# slice goes straight to an environment of its own (trying costs CI ~25 s):
# TensorFlow 2.16 pins `ml-dtypes~=0.3.1`, JAX 0.4.29 needs >= 0.4.
JAX_APART = {"lowest"}
TEST_REQUIREMENTS = ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6",
                     "psutil>=5"]
BEGIN = "<!-- version-matrix:begin (scripts/version_matrix.py) -->"
END = "<!-- version-matrix:end -->"


def _run(command, log, **kwargs):
    log.write(f"$ {' '.join(map(str, command))}\n")
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                          **kwargs).returncode


class ResolutionError(RuntimeError):
    """pip could not install a combination's packages together."""


def environment(venvs, name, tensorflow, keras, wheel, log, jax=None,
                torch=None):
    """Creates (or reuses) the venv of one combination; returns its python.

    `tensorflow`, `jax` and `torch` may each be `None` (not installed);
    jaxlib is installed at `jax`'s version.
    """
    packages = [f"keras=={keras}"]
    if tensorflow is not None:
        packages.insert(0, f"tensorflow-cpu=={tensorflow}")
    if jax is not None:
        packages += [f"jax=={jax}", f"jaxlib=={jax}"]
    if torch is not None:
        packages.append(f"torch=={torch}")
    venv = venvs / "-".join(
        part for part in (
            tensorflow and f"tf{tensorflow}", f"keras{keras}",
            jax and f"jax{jax}", torch and f"torch{torch}",
        ) if part
    )
    python = venv / "bin" / "python"
    if not python.exists():
        if _run([sys.executable, "-m", "venv", venv], log):
            raise RuntimeError(f"{name}: venv creation failed")
        _run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
        if _run([python, "-m", "pip", "install", "-q", *packages,
                 *TEST_REQUIREMENTS], log):
            # Not reused half-installed by the next run.
            shutil.rmtree(venv)
            raise ResolutionError(f"{name}: pip could not install "
                                  f"{' '.join(packages)}")
    # keras_accum itself, without letting pip move TensorFlow or Keras
    # (`tensorflow-cpu` does not satisfy a `tensorflow` requirement for pip,
    # so the declared requirements are checked by `_REQUIREMENTS_CHECK`).
    target = str(wheel) if wheel else str(ROOT)
    if _run([python, "-m", "pip", "install", "-q", "--force-reinstall",
             "--no-deps", target], log):
        raise RuntimeError(f"{name}: could not install {target}")
    extras = [name for name, version in (("tensorflow", tensorflow),
                                         ("jax", jax), ("torch", torch))
              if version]
    if _run([python, "-c", _REQUIREMENTS_CHECK, *extras], log, cwd="/"):
        raise RuntimeError(f"{name}: keras-accum's requirements exclude "
                           f"{' '.join(packages)}")
    return python


# Fails when the installed TensorFlow, Keras or Python is outside what
# keras-accum's metadata declares (the pins in pyproject.toml), and those
# of the extras named as arguments (`tensorflow`, `jax`, `torch`).
_REQUIREMENTS_CHECK = """
import platform
import sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.version import Version

declared = metadata.metadata("keras-accum")
python = Version(platform.python_version())
problems = []
if python not in Requirement("python" + declared["Requires-Python"]).specifier:
    problems.append(f"python {python} not in {declared['Requires-Python']}")
for text in metadata.requires("keras-accum") or []:
    requirement = Requirement(text)
    if requirement.marker is not None and not any(
        requirement.marker.evaluate({"extra": extra})
        for extra in sys.argv[1:]
    ):
        continue  # an extra not checked
    names = [requirement.name]
    if requirement.name == "tensorflow":
        names.append("tensorflow-cpu")
    versions = []
    for name in names:
        try:
            versions.append(Version(metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    if not any(v in requirement.specifier for v in versions):
        problems.append(f"{requirement} not met by {versions}")
print("requirements:", "; ".join(problems) or "met")
raise SystemExit(1 if problems else 0)
"""


def probe(python, log, backend):
    """Imports Keras on `backend`, the backend and keras_accum, and logs
    their versions; returns the exit status."""
    environment = {**os.environ, "KERAS_BACKEND": backend}
    code = (f"import keras, {backend}, keras_accum; "
            "print('keras_accum from', keras_accum.__file__, 'keras', "
            f"keras.version(), 'backend', keras.backend.backend(), "
            f"'{backend}', {backend}.__version__)")
    return _run([python, "-c", code], log, cwd="/", env=environment)


def run_slice(python, log, workers, backend="tensorflow"):
    """Runs `backend`'s slice (`SLICES`) on the *installed* keras_accum:
    `python -P` keeps the checkout off the front of `sys.path`, and
    `--import-mode=append` adds it at the end, only for `tests`."""
    environment = {**os.environ, "KERAS_BACKEND": backend}
    probe(python, log, backend)
    command = [python, "-P", "-m", "pytest",
               "-m", SLICES[backend], "-q", "-rs",
               "--durations=6", "-p", "no:cacheprovider",
               "--import-mode=append", "-n", str(workers)]
    start = time.monotonic()
    code = _run(command, log, cwd=ROOT, env=environment)
    return code, time.monotonic() - start


def summary(log_path):
    text = log_path.read_text(errors="replace")
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", text,
                       re.MULTILINE)
    if not found:
        return "no pytest summary"
    return re.sub(r", \d+ deselected", "", found[-1].strip(" ="))


def table(results):
    lines = [
        "| TensorFlow | Keras | JAX | PyTorch | Python | slice | JAX slice "
        "| PyTorch slice | result | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MATRIX:
        row = results.get(name)
        if row is None:
            continue
        tensorflow, jax, torch = (row.get(key) for key in
                                  ("tensorflow", "jax", "torch"))
        lines.append(
            f"| {tensorflow or '-'} | {row['keras']} | {jax or '-'} | "
            f"{torch or '-'} | {row['python']} | "
            f"{row.get('summary', '-') if tensorflow else '-'} | "
            f"{row.get('jax_summary', '-') if jax else '-'} | "
            f"{row.get('torch_summary', '-') if torch else '-'} | "
            f"{'pass' if row['ok'] else '**fail**'} | {row['date']} |"
        )
    lines.append("")
    lines.append(
        "Produced by `scripts/version_matrix.py` (Linux x86-64, "
        "`tensorflow-cpu`, keras_accum installed from the checkout; the "
        "JAX slice with JAX and jaxlib of the JAX column, in the same "
        "environment or, where pip cannot install them beside that "
        "TensorFlow (or with `--backends jax`), one without TensorFlow; "
        "the PyTorch slice with Keras and PyTorch only)."
    )
    return "\n".join(lines)


def write_readme(markdown):
    readme = ROOT / "docs" / "compatibility.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


def _print_log_tail(log_path):
    """Prints the end of a failed combination's log."""
    lines = log_path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-60:]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MATRIX),
                        help="combinations to run (default: all)")
    parser.add_argument("--venvs", type=pathlib.Path,
                        default=pathlib.Path("/tmp/venvs"))
    parser.add_argument("--wheel", type=pathlib.Path,
                        help="install this built wheel instead of the checkout")
    parser.add_argument("--backends", nargs="+", default=list(SLICES),
                        choices=list(SLICES),
                        help="slices to run (default: all); a backend not "
                             "run keeps its recorded result. A JAX-only run "
                             "installs no TensorFlow")
    parser.add_argument("--install-only", action="store_true",
                        help="build (or reuse) the environments and check "
                             "them (requirements, imports); run no tests, "
                             "record nothing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readme", action="store_true",
                        help="write the table into docs/compatibility.md")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print (and with --readme write) "
                             "the table of the recorded results")
    arguments = parser.parse_args()
    # Absolute: the checks run with another working directory.
    arguments.venvs = arguments.venvs.resolve()
    if arguments.wheel is not None:
        arguments.wheel = arguments.wheel.resolve()
    arguments.venvs.mkdir(parents=True, exist_ok=True)
    python_version = platform.python_version()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ok = True
    names = [] if arguments.table_only else arguments.only or MATRIX
    for name in names:
        tensorflow, keras, jax, torch = MATRIX[name]
        # A backend not run keeps its recorded fields.
        row = dict(results.get(name, {}))
        row.update({
            "tensorflow": tensorflow, "keras": keras, "jax": jax,
            "torch": torch, "python": python_version,
            "date": datetime.date.today().isoformat(),
        })
        python = None
        together = (name not in JAX_APART
                    and "tensorflow" in arguments.backends)
        versions = {"tensorflow": tensorflow, "jax": jax, "torch": torch}
        backends = [b for b in SLICES
                    if b in arguments.backends and versions[b]]
        for backend in backends:
            on_jax = backend == "jax"
            # Result fields: `summary`/`seconds`/`tf_ok` for TensorFlow (as
            # recorded before JAX), `jax_summary`/`jax_seconds`/`jax_ok`
            # for JAX, `torch_...` for PyTorch.
            field = "" if backend == "tensorflow" else f"{backend}_"
            suffix = "" if backend == "tensorflow" else f"-{backend}"
            log_path = arguments.venvs / f"{name}{suffix}.log"
            start = time.monotonic()
            with log_path.open("w") as log:
                try:
                    if backend == "torch":
                        # Keras and PyTorch only: an environment of its own.
                        python = environment(
                            arguments.venvs, name, None, keras,
                            arguments.wheel, log, torch=torch,
                        )
                    elif together and python is None:
                        try:
                            # Both slices in one environment where pip can
                            # install TensorFlow, Keras and JAX together.
                            python = environment(
                                arguments.venvs, name, tensorflow, keras,
                                arguments.wheel, log, jax=jax,
                            )
                        except ResolutionError as error:
                            if jax is None:
                                raise
                            log.write(f"{error}; the JAX slice gets an "
                                      "environment of its own\n")
                            together = False
                    if backend != "torch" and not together:
                        python = environment(
                            arguments.venvs, name,
                            None if on_jax else tensorflow, keras,
                            arguments.wheel, log,
                            jax=jax if on_jax else None,
                        )
                    if arguments.install_only:
                        code, seconds = probe(python, log, backend), 0.0
                    else:
                        code, seconds = run_slice(python, log,
                                                  arguments.workers, backend)
                except RuntimeError as error:
                    log.write(f"{error}\n")
                    code, seconds = 1, 0.0
            what = {"tensorflow": "TF", "jax": "JAX",
                    "torch": "PyTorch"}[backend] + f" {versions[backend]}"
            if arguments.install_only:
                ok = ok and code == 0
                print(f"{name}: {what}, Keras {keras}: environment "
                      f"{'ready' if code == 0 else 'FAILED'} (in all "
                      f"{time.monotonic() - start:.0f} s; log {log_path})",
                      flush=True)
                if code != 0:
                    _print_log_tail(log_path)
                continue
            row["tf_ok" if backend == "tensorflow" else f"{field}ok"] = (
                code == 0)
            row[f"{field}summary"] = summary(log_path)
            row[f"{field}seconds"] = round(seconds)
            print(f"{name}: {what}, Keras {keras}: "
                  f"{'pass' if code == 0 else 'FAIL'} "
                  f"({row[f'{field}summary']}, tests {seconds:.0f} s, "
                  f"in all {time.monotonic() - start:.0f} s; log {log_path})",
                  flush=True)
            if code != 0:
                _print_log_tail(log_path)
        if arguments.install_only:
            continue
        if "jax" in backends:
            row["jax_environment"] = "shared" if together else "own"
        # Results recorded before `tf_ok` existed kept it in `ok`.
        row["ok"] = (
            (row.get("tf_ok", row.get("ok", False)) if tensorflow else True)
            and (row.get("jax_ok", False) if jax else True)
            and (row.get("torch_ok", False) if torch else True)
        )
        ok = ok and row["ok"]
        if arguments.wheel is None:
            # Results of the checkout only (a wheel run is CI's check),
            # written at once so an interrupted run keeps what it measured.
            results[name] = row
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True)
                               + "\n")
    markdown = table(results)
    print(markdown)
    if arguments.readme:
        write_readme(markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
