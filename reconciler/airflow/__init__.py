"""Airflow, as the sidecar reaches it: the stable REST API's client (:mod:`.client`), which reads task
instances (one, a batch, the ones changed since a moment, counts) and says what went wrong in
:class:`~reconciler.airflow.client.AirflowError`, and ``check-config --connect``'s checks
(:mod:`.checks`). I/O only: what to read and what an answer means is the core's
(:mod:`reconciler.core.reads`, :mod:`reconciler.core.decision`). Imports nothing of the sidecar but
its configuration and metrics."""
