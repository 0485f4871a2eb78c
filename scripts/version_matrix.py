"""Runs the test slice on every supported TensorFlow/Keras combination.

Each combination gets its own virtual environment (reused when it exists)
with exactly that TensorFlow and Keras, the test requirements, and keras_accum
installed from this checkout or from a built wheel (`--wheel`), then runs the
tests marked `slice` (exactness, normalisation, saving round trips of every
model form, schedules, one distribution test, the Keras-internals checks).
Each combination's last result is kept in `scripts/version_matrix.json`
(merged, so combinations can be run one at a time); the Markdown table
(versions x pass/fail) is made from it, and `--readme` writes it into
README.md between the `version-matrix` markers.

Usage:

    python scripts/version_matrix.py                    # the whole matrix
    python scripts/version_matrix.py --only lowest      # one combination
    python scripts/version_matrix.py --only lowest --wheel dist/*.whl
    python scripts/version_matrix.py --readme           # and into README
    python scripts/version_matrix.py --table-only --readme  # runs nothing

Environments live in `--venvs` (default `/tmp/venvs`); pip's cache makes a
rebuild cheap. `tensorflow-cpu` is installed: lighter, same Python code.
"""

import argparse
import datetime
import json
import pathlib
import platform
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "version_matrix.json"

# (TensorFlow, Keras): the supported range's ends and the versions where
# Keras' behaviour changes (3.13: masked divisor; 3.14: activity
# regularisation; 3.15: functional get_config). Every TensorFlow pins a Keras
# floor: 2.16 >= 3.0, 2.17 >= 3.2, 2.18/2.19 >= 3.5, 2.20 >= 3.10, 2.21 >= 3.12.
MATRIX = {
    "lowest": ("2.16.2", "3.10.0"),
    "tf2.17-keras3.11": ("2.17.1", "3.11.3"),
    "tf2.18-keras3.12": ("2.18.1", "3.12.4"),
    "tf2.19-keras3.13": ("2.19.1", "3.13.2"),
    "tf2.19-keras3.14": ("2.19.1", "3.14.1"),
    "tf2.20-keras3.15": ("2.20.0", "3.15.1"),
    "newest": ("2.21.0", "3.15.1"),
}
TEST_REQUIREMENTS = ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6",
                     "psutil>=5"]
BEGIN = "<!-- version-matrix:begin (scripts/version_matrix.py) -->"
END = "<!-- version-matrix:end -->"


def _run(command, log, **kwargs):
    log.write(f"$ {' '.join(map(str, command))}\n")
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                          **kwargs).returncode


def environment(venvs, name, tensorflow, keras, wheel, log):
    """Creates (or reuses) the venv of one combination; returns its python."""
    venv = venvs / f"tf{tensorflow}-keras{keras}"
    python = venv / "bin" / "python"
    if not python.exists():
        if _run([sys.executable, "-m", "venv", venv], log):
            raise RuntimeError(f"{name}: venv creation failed")
        _run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
        if _run([python, "-m", "pip", "install", "-q",
                 f"tensorflow-cpu=={tensorflow}", f"keras=={keras}",
                 *TEST_REQUIREMENTS], log):
            raise RuntimeError(f"{name}: pip could not install "
                               f"tensorflow-cpu=={tensorflow} keras=={keras}")
    # keras_accum itself, without letting pip move TensorFlow or Keras
    # (`tensorflow-cpu` does not satisfy a `tensorflow` requirement for pip,
    # so the declared requirements are checked by `_REQUIREMENTS_CHECK`).
    target = str(wheel) if wheel else str(ROOT)
    if _run([python, "-m", "pip", "install", "-q", "--force-reinstall",
             "--no-deps", target], log):
        raise RuntimeError(f"{name}: could not install {target}")
    if _run([python, "-c", _REQUIREMENTS_CHECK], log, cwd="/"):
        raise RuntimeError(f"{name}: keras-accum's requirements exclude "
                           f"tensorflow {tensorflow} / keras {keras}")
    return python


# Fails when the installed TensorFlow, Keras or Python is outside what
# keras-accum's metadata declares (the pins in pyproject.toml).
_REQUIREMENTS_CHECK = """
import platform
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
    if requirement.marker is not None:
        continue  # an extra
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


def run_slice(python, log, workers):
    """Runs the slice on the *installed* keras_accum: `python -P` keeps the
    checkout off the front of `sys.path`, and `--import-mode=append` adds it
    at the end, only for `tests`."""
    probe = ("import keras, tensorflow, keras_accum; "
             "print('keras_accum from', keras_accum.__file__, 'keras', "
             "keras.version(), 'tensorflow', tensorflow.__version__)")
    _run([python, "-c", probe], log, cwd="/")
    command = [python, "-P", "-m", "pytest", "-m", "slice", "-q", "-rs",
               "--durations=6", "-p", "no:cacheprovider",
               "--import-mode=append", "-n", str(workers)]
    start = time.monotonic()
    code = _run(command, log, cwd=ROOT)
    return code, time.monotonic() - start


def summary(log_path):
    text = log_path.read_text(errors="replace")
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", text,
                       re.MULTILINE)
    return found[-1].strip(" =") if found else "no pytest summary"


def table(results):
    lines = [
        "| TensorFlow | Keras | Python | slice | result | date |",
        "|---|---|---|---|---|---|",
    ]
    for name in MATRIX:
        row = results.get(name)
        if row is None:
            continue
        lines.append(
            f"| {row['tensorflow']} | {row['keras']} | {row['python']} | "
            f"{row['summary']} | {'pass' if row['ok'] else '**fail**'} | "
            f"{row['date']} |"
        )
    lines.append("")
    lines.append(
        "Produced by `scripts/version_matrix.py` (Linux x86-64, "
        "`tensorflow-cpu`, keras_accum installed from the checkout)."
    )
    return "\n".join(lines)


def write_readme(markdown):
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MATRIX),
                        help="combinations to run (default: all)")
    parser.add_argument("--venvs", type=pathlib.Path,
                        default=pathlib.Path("/tmp/venvs"))
    parser.add_argument("--wheel", type=pathlib.Path,
                        help="install this built wheel instead of the checkout")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readme", action="store_true",
                        help="write the table into README.md")
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
        tensorflow, keras = MATRIX[name]
        log_path = arguments.venvs / f"{name}.log"
        with log_path.open("w") as log:
            try:
                python = environment(arguments.venvs, name, tensorflow, keras,
                                     arguments.wheel, log)
                code, seconds = run_slice(python, log, arguments.workers)
            except RuntimeError as error:
                log.write(f"{error}\n")
                code, seconds = 1, 0.0
        row = {
            "tensorflow": tensorflow, "keras": keras,
            "python": python_version, "ok": code == 0,
            "summary": summary(log_path),
            "date": datetime.date.today().isoformat(),
            "seconds": round(seconds),
        }
        ok = ok and row["ok"]
        print(f"{name}: TF {tensorflow}, Keras {keras}: "
              f"{'pass' if row['ok'] else 'FAIL'} ({row['summary']}, "
              f"{seconds:.0f} s; log {log_path})", flush=True)
        if not row["ok"]:
            lines = log_path.read_text(errors="replace").splitlines()
            print("\n".join(lines[-60:]), flush=True)
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
