"""Play the core's simulation (simulation/) for many worlds, or replay one.

    python -m bench.simulate --worlds 100000 --seed 0
    python -m bench.simulate --replay 1296          # one world's settings and full trace

Prints worlds per second and every world that broke an invariant (its seed and first violation);
exits 1 if any did.
"""

from __future__ import annotations

import argparse
import time

from simulation.play import play


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, default=1000, help="how many worlds to play")
    parser.add_argument("--seed", type=int, default=0, help="the first world's seed (then +1 each)")
    parser.add_argument("--replay", type=int, help="play this one world and print its trace")
    args = parser.parse_args()
    if args.replay is not None:
        outcome = play(args.replay)
        print(outcome.report())
        return 1 if outcome.violations else 0
    started, failed, jobs, world_seconds = time.perf_counter(), 0, 0, 0.0
    for seed in range(args.seed, args.seed + args.worlds):
        outcome = play(seed)
        jobs, world_seconds = jobs + outcome.jobs, world_seconds + outcome.world_seconds
        if outcome.violations:
            failed += 1
            print(f"world {seed}: {outcome.violations[0]}", flush=True)
    took = time.perf_counter() - started
    print(
        f"{args.worlds} worlds (seeds {args.seed}..{args.seed + args.worlds - 1}) in {took:.1f} s "
        f"({args.worlds / took:.1f} worlds/s; {jobs} jobs, {world_seconds / 3600:.1f} h of world time): "
        f"{failed} broke an invariant"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
