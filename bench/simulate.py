"""Play the core's simulation (simulation/) for many worlds, or replay one.

    python -m bench.simulate --worlds 100000 --seed 0
    python -m bench.simulate --replay 1296          # one world's settings and full trace
    python -m bench.simulate --revert count-surplus # how many worlds find a fix taken out

Prints worlds per second and every world that broke an invariant (its seed and first violation);
exits 1 if any did. With ``--revert`` (simulation/mutants.py) it stops at the first world that finds
the defect, and exits 1 if none did.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from simulation.mutants import MUTANTS, reverted
from simulation.play import play


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, default=1000, help="how many worlds to play")
    parser.add_argument("--seed", type=int, default=0, help="the first world's seed (then +1 each)")
    parser.add_argument("--replay", type=int, help="play this one world and print its trace")
    parser.add_argument("--revert", choices=sorted(MUTANTS), help="play with this fix taken out")
    args = parser.parse_args()
    with reverted(args.revert) if args.revert else contextlib.nullcontext():
        if args.replay is not None:
            outcome = play(args.replay)
            print(outcome.report())
            return 1 if outcome.violations else 0
        return _many(args.worlds, args.seed, stop_at_first=args.revert is not None)


def _many(worlds: int, first: int, *, stop_at_first: bool) -> int:
    started, failed, jobs, world_seconds, played = time.perf_counter(), 0, 0, 0.0, 0
    for seed in range(first, first + worlds):
        outcome = play(seed)
        played += 1
        jobs, world_seconds = jobs + outcome.jobs, world_seconds + outcome.world_seconds
        if outcome.violations:
            failed += 1
            print(f"world {seed}: {outcome.violations[0]}", flush=True)
            if stop_at_first:
                print(f"found after {played} world(s), {time.perf_counter() - started:.1f} s")
                return 0
    if stop_at_first:
        print(f"not found in {played} worlds")
        return 1
    took = time.perf_counter() - started
    print(
        f"{worlds} worlds (seeds {first}..{first + worlds - 1}) in {took:.1f} s "
        f"({worlds / took:.1f} worlds/s; {jobs} jobs, {world_seconds / 3600:.1f} h of world time): "
        f"{failed} broke an invariant"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
