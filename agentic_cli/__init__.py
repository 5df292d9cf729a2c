"""``agentic``: the sidecar's API for people on call (tables) and scripts (``--json``)."""
