"""Starts real services (Airflow, agents, the sidecar) on loopback for the demo, tests and bench.

Not installed with the package: it is development tooling that lives beside it.
"""
