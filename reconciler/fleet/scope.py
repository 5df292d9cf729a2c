"""What a registration may claim: which ids and labels, which addresses, and how many agents.

The fleet token is held by every VM, so whoever holds it could register an agent claiming any label
(and receive the jobs routed by it, their payloads and ``env`` secrets with them), or have the sidecar
call any address. ``[fleet]`` narrows that, and every heartbeat is judged against it:

- ``registration_ids`` and ``registration_labels``: shell-style patterns (``vm-*``, ``pool-?``); an id
  or a label matching none is refused. Default ``["*"]``: anything, as before.
- ``require_https``: a registered URL must be ``https://``.
- ``allowed_networks``: CIDRs every address of a registered URL's host must fall in (the host is
  resolved before the sidecar calls it back). Default: none, any address.
- ``max_agents``: registered agents at most (a new id beyond it is refused; 0: no cap).

Pure decisions here; the registry applies them (a 403 naming the key, counted as ``out_of_scope``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``ValueError`` naming the value that is no CIDR."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a network (CIDR, e.g. 10.0.0.0/8)") from None
    return tuple(networks)


@dataclass(frozen=True)
class Scope:
    ids: tuple[str, ...] = ("*",)
    labels: tuple[str, ...] = ("*",)
    require_https: bool = False
    networks: tuple[Network, ...] = ()
    max_agents: int = 0

    def claim_problem(self, agent_id: str, labels: Sequence[str], url: str) -> str | None:
        """Why this heartbeat claims what it may not (None: it may)."""
        if not _matches(agent_id, self.ids):
            return f"agent id {agent_id!r} matches none of [fleet] registration_ids"
        outside = [label for label in labels if not _matches(label, self.labels)]
        if outside:
            return f"label {outside[0]!r} matches none of [fleet] registration_labels"
        if self.require_https and urlsplit(url).scheme != "https":
            return "the url must be https:// ([fleet] require_https)"
        return None

    def address_problem(self, host: str, addresses: Sequence[str]) -> str | None:
        """Why a URL whose host resolved to ``addresses`` may not be called (None: it may)."""
        if not self.networks:
            return None
        if not addresses:
            return f"{host!r} resolves to no address"
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not any(ip in network for network in self.networks):
                return f"{host!r} resolves to {address}, outside [fleet] allowed_networks"
        return None

    def full(self, registered: int, *, new: bool) -> str | None:
        """Why a new agent id cannot join ``registered`` ones (None: it can)."""
        if new and self.max_agents and registered >= self.max_agents:
            return f"{registered} agents are registered already: [fleet] max_agents = {self.max_agents}"
        return None


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)
