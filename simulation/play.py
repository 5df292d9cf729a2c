"""Play worlds by seed: one (:func:`play`), or many in a row (:func:`play_many`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

from simulation.virtual_time import VirtualLoop, run
from simulation.world import Settings, World


@dataclass(frozen=True)
class Outcome:
    seed: int
    settings: Settings
    violations: list[str]
    trace: list[str]
    jobs: int
    world_seconds: float

    def report(self) -> str:
        """What a person needs to see a failed world: its seed, settings, and what happened."""
        lines = [f"world {self.seed}: {len(self.violations)} violation(s)", f"settings: {self.settings}"]
        lines += [f"violation: {v}" for v in self.violations]
        lines += ["trace:", *self.trace]
        lines.append(f"replay: python -m bench.simulate --replay {self.seed}")
        return "\n".join(lines)


def play(seed: int) -> Outcome:
    """Play world ``seed`` to its end (or its first violation). The same seed plays the same world."""
    rng = random.Random(seed)  # noqa: S311 (a world to replay, not a secret)
    random.seed(seed)  # the stop retries' jitter draws from the global generator
    settings = Settings.draw(rng)

    async def main(loop: VirtualLoop) -> Outcome:
        world = World(seed, settings, rng, loop)
        violations = await world.run()
        return Outcome(seed, settings, violations, world.trace, len(world.db.jobs), loop.time())

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the core logs as in production: thousands of lines a world
    try:
        return run(main)
    finally:
        logging.disable(previous)


def play_many(first: int, count: int) -> Iterator[Outcome]:
    for seed in range(first, first + count):
        yield play(seed)
