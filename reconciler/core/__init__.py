"""The sidecar's logic: the reconciliation cycle and the job service. The loop (:mod:`.loop`) is a thin
cycle over parts built once (:mod:`.parts`): the active jobs (:mod:`.active_jobs`), the read of
Airflow (:mod:`.reads`, :mod:`.targeted`), the confirmation (:mod:`.confirmer`), the stops
(:mod:`.stops`) and the agents' sync (:mod:`.agent_sync`, :mod:`.catch_up`, :mod:`.agent_reports`),
decided by pure rules (:mod:`.decision` for Airflow's answers, :mod:`.outcome` for the agents').
:mod:`.job_service` is what the router API does, apart from HTTP; it raises
:mod:`reconciler.errors`. Every clock, sleep and I/O is injected, so the simulation
(:mod:`simulation`) runs this code unchanged. It uses :mod:`reconciler.airflow` and
:mod:`reconciler.fleet`, never :mod:`reconciler.api`."""
