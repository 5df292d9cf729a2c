"""The sidecar's HTTP API: the router API's routes (:mod:`.server`), the read-only pages under
``/ui/`` (:mod:`.pages`) and the readiness judgement (:mod:`.readiness`). Routes parse, call the core
and answer; they decide nothing, and map the core's errors (:mod:`reconciler.errors`) to statuses.
Nothing below imports it."""
