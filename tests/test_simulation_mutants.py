"""The simulation's power: with each fix of a defect taken out (simulation/mutants.py), seeded worlds
find the defect, and name it as the invariant it breaks. bench/RESULTS.md records how many worlds
each took.

The worlds play in a process of their own at the lowest priority (``nice``): they are pure CPU for a
minute, and the suite's other worker runs tests that time real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulation.mutants import MUTANTS
from simulation.play import play

ROOT = Path(__file__).resolve().parent.parent

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
    command = [
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "bench.simulate",
        "--revert",
        name,
        "--worlds",
        str(budget),
    ]
    found = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert found.returncode == 0, f"{name}: not found in {budget} worlds\n{found.stdout}{found.stderr}"
    first = re.search(r"^world (\d+): (.*)$", found.stdout, re.MULTILINE)
    assert first is not None, found.stdout
    seed, violation = int(first.group(1)), first.group(2)
    print(f"{name}: found in world {seed} ({seed + 1} worlds): {violation}")
    assert violation.startswith(broken), found.stdout
    assert not play(seed).violations  # the same world keeps every invariant with the fix in
