"""The mutant list of `scripts/mutation_check.py` still fits the source.

The mutation check itself is not run in CI (minutes); this quick test keeps
its list from rotting as `keras_accum/` and the tests change.
"""

import importlib.util
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mutation_check():
    path = REPO / "scripts" / "mutation_check.py"
    spec = importlib.util.spec_from_file_location("mutation_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_once_and_names_existing_tests():
    """Catches a rotted mutant list: search text no longer found exactly
    once in the source, or a test node id that no longer exists."""
    mutants = _mutation_check().MUTANTS
    assert len({m.name for m in mutants}) == len(mutants)
    for mutant in mutants:
        source = (REPO / mutant.path).read_text()
        assert mutant.path.startswith("keras_accum/"), mutant.name
        assert source.count(mutant.old) == 1, (
            f"{mutant.name}: search text found {source.count(mutant.old)} "
            f"times in {mutant.path}"
        )
        assert mutant.old != mutant.new, mutant.name
        assert mutant.tests, mutant.name
        for node_id in mutant.tests:
            file, *names = re.sub(r"\[.*\]$", "", node_id).split("::")
            test_source = (REPO / file).read_text()
            for name in names:
                keyword = "class" if name[0].isupper() else "def"
                assert re.search(rf"^\s*{keyword} {name}\b", test_source,
                                 re.MULTILINE), f"{mutant.name}: {node_id}"
