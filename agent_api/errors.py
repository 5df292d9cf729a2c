"""The error every parser of the agent's protocol raises: servers answer it with a 400."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A request or answer does not have the documented shape; the message names the field."""
