"""Starts real services (Airflow, agents, the sidecar) on loopback for the demo, tests and bench, and
serves in-process stand-ins (``served``: an aiohttp app, the Airflow stand-in; ``scripted``: Airflow's
answers, no server).

Not installed with the package: it is development tooling that lives beside it.
"""
