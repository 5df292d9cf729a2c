"""The agent's HTTP API as both sides speak it: wire shapes (:mod:`agent_api.protocol`) and the client."""
