"""scripts/mutation_pass.py: a mutant is applied to a copy of the tree (never to the tree itself), killed
by its tests, and the README's table covers every mutant the script holds."""
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("mutation_pass", os.path.join(ROOT, "scripts", "mutation_pass.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_mutant_is_killed_in_a_copy_and_the_tree_is_left_alone():
    mp = _script()
    path = os.path.join(ROOT, mp.MUTANTS[0][0])
    before = open(path).read()
    (row,) = mp.main(["--only", "1"])  # DPO's sign flipped: tests/test_dpo_utils.py fails
    assert row[0] == 1 and row[4] == "killed" and open(path).read() == before


def test_every_mutant_matches_its_code_once_and_the_readme_shows_them_all():
    mp = _script()
    for i, (path, old, new, tests, what) in enumerate(mp.MUTANTS, 1):
        assert open(os.path.join(ROOT, path)).read().count(old) == 1 and old != new, f"mutant {i}: {path}"
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme[readme.index(mp.README_MARKS[0]):readme.index(mp.README_MARKS[1])]
    assert re.search(rf"Mutation score: \d+ of {len(mp.MUTANTS)} killed", table), "rerun python scripts/mutation_pass.py --update_readme"
    assert [w for _, _, _, _, w in mp.MUTANTS] == re.findall(r"^\| \d+ \| `[^`]+` \| (.*?) \| `", table, re.M)
