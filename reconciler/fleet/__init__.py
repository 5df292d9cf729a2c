"""The agents, as the sidecar knows them: who they are and how to call them (:mod:`.agents`, the pool
of clients, and :mod:`.routing`, where a job may go), whether they live (:mod:`.liveness`: health
checks and heartbeats, loss, orphans, drains), who may join (:mod:`.registry`, with :mod:`.scope` and
:mod:`.versions`), and how long a cut-off agent's fenced jobs may still run (:mod:`.fencing`). It
knows no Airflow and no jobs' decisions: the core asks it. The rule modules (routing, scope, versions,
fencing) import nothing of the sidecar, so its configuration may use them."""
