"""The sidecar's router API as both sides speak it (:mod:`sidecar_api.protocol`); standard library only."""
