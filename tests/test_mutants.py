"""The mutation check (tests/mutants.py) stays applicable: every mutant's text is still in its
file exactly once and the tests it runs exist (run the check itself: python -m tests.mutants)."""

import pytest

from tests.mutants import MUTANTS, ROOT, _source


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies(m):
    text = _source(ROOT, m).read_text()
    assert text.count(m.old) == 1, f"{m.name}: its text is not in {m.path} exactly once"
    assert (ROOT / m.tests[0]).is_file()


def test_mutant_names_are_unique():
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
