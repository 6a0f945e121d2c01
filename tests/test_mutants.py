"""bench/mutants.py stays runnable: every mutant's text is still in its file (as often as it says), its test
files exist, and the names are unique. (Running the mutants takes minutes: `python bench/mutants.py`.)"""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("lorart_bench_mutants", os.path.join(ROOT, "bench", "mutants.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


MUT = load()


def test_names_unique_and_enough():
    names = [m.name for m in MUT.MUTANTS]
    assert len(names) == len(set(names)) >= 16


@pytest.mark.parametrize("m", MUT.MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_to_the_tree(m):
    why = MUT.check_applies(m)
    assert why is None, f"mutant {m.name}: {why} (update bench/mutants.py with the code)"
    assert m.old != m.new and m.tests
