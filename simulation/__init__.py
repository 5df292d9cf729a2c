"""A deterministic simulation of the sidecar's core: the real read, decision, confirmation, stop and
agent catch-up code, run against a simulated Airflow, simulated agents and a simulated router DB, on
virtual time, in seeded random worlds (:mod:`simulation.world`). After every step the world checks
the invariants the sidecar promises (:mod:`simulation.invariants`); a world that breaks one prints its
seed and a readable trace, and the seed replays it exactly.

Run many worlds with ``python -m bench.simulate --worlds N --seed S``; the test suite runs its share
in the fast tier (tests/test_simulation.py).
"""
