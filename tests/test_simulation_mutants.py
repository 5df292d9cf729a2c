"""The simulation's power: with each fix of a defect taken out (simulation/mutants.py), seeded worlds
find the defect, and name it as the invariant it breaks. bench/RESULTS.md records how many worlds
each took."""

from __future__ import annotations

import pytest

from simulation.mutants import MUTANTS, reverted
from simulation.play import play

# Each mutant: what it breaks, and the worlds allowed to find it (a few times what it took here).
FOUND_AS = {
    "forgotten-job": ("hang:", 100),  # world defect 3
    "outage-recheck": ("late stop:", 1500),
    "widened-lists": ("late stop:", 1500),
    "agents-inline": ("late stop:", 1000),
    "deferred-is-failed": ("false stop:", 20),
}
# World defect 5: the random worlds stopped reaching it once the widened-lists fix came in (bench/
# RESULTS.md); tests/test_simulation.py plays it as a scenario, with the fix and without.
IN_A_SCENARIO = {"count-surplus"}


def test_every_mutant_is_found_somewhere() -> None:
    assert set(FOUND_AS) | IN_A_SCENARIO == set(MUTANTS)


@pytest.mark.parametrize("name", sorted(FOUND_AS))
def test_the_simulation_finds_each_fix_taken_out(name: str) -> None:
    broken, budget = FOUND_AS[name]
    with reverted(name):
        for seed in range(budget):
            outcome = play(seed)
            if outcome.violations:
                break
        else:
            pytest.fail(f"{name}: not found in {budget} worlds")
    print(f"{name}: found in world {seed} ({seed + 1} worlds): {outcome.violations[0]}")
    assert outcome.violations[0].startswith(broken), outcome.report()
    assert not play(seed).violations  # the same world keeps every invariant with the fix in
