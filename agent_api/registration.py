"""Agent registration as both sides speak it: ``PUT /agents/{agent_id}`` and its answer.

An agent configured with the sidecar's URL registers at start and heartbeats with the same request:
the URL the sidecar reaches it at, a random ``instance`` id new at each start of the agent process
(another instance at the same URL is that agent restarted; at another URL while the first still
heartbeats, it is a second agent claiming the id, and refused), its labels and capacity, and how often
it heartbeats. Standard library only. Parsing is strict; :class:`~agent_api.protocol.ProtocolError`
names the field (a 400).

An agent also proves which home it runs on, so that it may move its registration to a new URL while
its jobs run: ``identity_proof`` is derived from a secret kept in its home (:mod:`agent.identity`), and
``previous_instances`` are the instances that home ran before this one. The sidecar keeps only the
proof's :func:`identity_fingerprint`; the agent shows that fingerprint, and its instance, in its
``/healthz`` (under ``registration``), where the sidecar's call-back checks them.

That proof is the agent's credential. The fleet token is a bootstrap token: it registers an agent id
once (a new one, or one whose holder is lost), and the heartbeat that does so carries the proof in
the :data:`CREDENTIAL_HEADER`. From then on the agent speaks for its id with that credential alone
(heartbeats, job reports, restarts and moves), and the fleet token is neither needed nor enough. Each
heartbeat also carries ``call_token``: what the sidecar presents when it calls this agent, derived
from the same secret; the agent accepts it, and never the fleet token. When the sidecar's answer says
``renew_credential``, the agent makes a new secret and sends the proof and call token derived from it
(``next_identity_proof``, ``next_call_token``) with its current credential; an answer saying
``credential_renewed`` means the sidecar holds the new one. All of these are bearer secrets: never
in a log, an error or a repr; and no request carrying them follows a redirect.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent_api.fencing import FenceTerms
from agent_api.maintenance import Maintenance, Unwell
from agent_api.protocol import CURSOR_PATTERN, JOB_ID_PATTERN, JobInfo, ProtocolError

_T = TypeVar("_T")
MAX_INT = 2**31 - 1  # max_jobs, jobs_running: as the router DB's integers

AGENT_ID_PATTERN = JOB_ID_PATTERN  # a host name fits; also a safe path segment and log field
INSTANCE_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=-]{0,99}")
MAX_LABELS = 32
MAX_URL_CHARS = 2000
MAX_VERSION_CHARS = 100
MAX_PUSHED_JOBS = 500  # more changes than this in one heartbeat are left to the sidecar's catch-up read
IDENTITY_PROOF_PATTERN = re.compile(r"[0-9a-f]{64}")
CREDENTIAL_HEADER = "X-Agent-Credential"  # a registered agent's identity proof: its credential
MAX_PREVIOUS_INSTANCES = 16  # a home's instance history: a move must cite the instance it succeeds
KNOWN_FIELDS = frozenset(
    {
        "url",
        "instance",
        "labels",
        "max_jobs",
        "jobs_running",
        "draining",
        "version",
        "heartbeat_seconds",
        "jobs",
        "cursor",
        "leaving",
        "identity_proof",
        "previous_instances",
        "call_token",
        "next_identity_proof",
        "next_call_token",
        "fence",
        "maintenance",
        "unwell",
    }
)


@dataclass(frozen=True)
class Heartbeat:
    """One agent's registration or heartbeat (the same request)."""

    url: str
    instance: str
    labels: tuple[str, ...] = ()
    max_jobs: int = 0  # 0: no limit
    jobs_running: int = 0
    draining: bool = False
    version: str = ""
    heartbeat_seconds: float = 10.0  # how often it comes: the sidecar calls it suspect after a few missed
    # The jobs that changed since the last heartbeat the sidecar accepted (each as it is now), and the
    # agent's change cursor after them (see the agent's GET /jobs?changed_since=).
    jobs: tuple[JobInfo, ...] = ()
    cursor: str | None = None
    leaving: bool = False  # the agent's last heartbeat before it stops: forget it if it has no job
    # A secret: never in a repr, a log or an error. Empty from an agent older than identities.
    identity_proof: str = field(default="", repr=False)
    previous_instances: tuple[str, ...] = ()  # this home's earlier instances, oldest first
    # Secrets too: what the sidecar presents to this agent, and a renewal's new credential.
    call_token: str = field(default="", repr=False)
    next_identity_proof: str = field(default="", repr=False)
    next_call_token: str = field(default="", repr=False)
    fence: FenceTerms | None = None  # how it fences (agent_api/fencing.py); None: not said (an older agent)
    maintenance: Maintenance | None = None  # while draining: by whom, since when, why (maintenance.py)
    unwell: Unwell | None = None  # why it takes no new job by itself (its automatic maintenance)
    # Entries of ``jobs`` the sidecar could not read (a newer agent's word): skipped, the rest recorded.
    unreadable_jobs: int = field(default=0, compare=False)
    # Fields of a newer agent: never in a repr (a newer agent's secrets would be among them).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "instance": self.instance,
            "labels": list(self.labels),
            "max_jobs": self.max_jobs,
            "jobs_running": self.jobs_running,
            "draining": self.draining,
            "version": self.version,
            "heartbeat_seconds": self.heartbeat_seconds,
            "jobs": [job.to_json() for job in self.jobs],
            "cursor": self.cursor,
            "leaving": self.leaving,
            **({"identity_proof": self.identity_proof} if self.identity_proof else {}),
            "previous_instances": list(self.previous_instances),
            **({"fence": self.fence.to_json()} if self.fence is not None else {}),
            "maintenance": self.maintenance.to_json() if self.maintenance is not None else None,
            "unwell": self.unwell.to_json() if self.unwell is not None else None,
            **{
                name: value
                for name, value in (
                    ("call_token", self.call_token),
                    ("next_identity_proof", self.next_identity_proof),
                    ("next_call_token", self.next_call_token),
                )
                if value
            },
        }


def identity_fingerprint(proof: str) -> str:
    """What the sidecar stores of an identity proof, and the agent shows in ``/healthz``: its SHA-256.
    The proof is 256 random-looking bits, so the fingerprint cannot be turned back into it. "" for
    no proof (an older agent)."""
    return hashlib.sha256(proof.encode("ascii")).hexdigest() if proof else ""


def validate_agent_id(value: str) -> str:
    if AGENT_ID_PATTERN.fullmatch(value) is None:
        raise ProtocolError("agent id must match ^" + AGENT_ID_PATTERN.pattern + "$")
    return value


def agent_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an agent's address (None: it can): http(s), a host, no credentials,
    nothing after the path."""
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http://host:port or https://host:port"
    if not parts.netloc.isascii():
        # Name resolvers disagree on international names (IDNA 2003 and 2008): what the sidecar checks
        # must be what it connects to. Punycode (xn--...) is accepted.
        return "must be ASCII: give an international host name in its xn-- form"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "must not contain white space or control characters"
    return None


def _lenient(parse: Callable[[object], _T | None], value: object) -> _T | None:
    """``parse(value)``, or None for a value it refuses."""
    try:
        return parse(value)
    except ProtocolError:
        return None


def parse_heartbeat(body: object) -> Heartbeat:
    """A ``PUT /agents/{agent_id}`` body; unknown fields are kept aside (a newer agent's)."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    url = body.get("url")
    if not isinstance(url, str) or (problem := agent_url_problem(url)) is not None:
        raise ProtocolError(f"url: {problem if isinstance(url, str) else 'required, a string'}")
    instance = body.get("instance")
    if not isinstance(instance, str) or INSTANCE_PATTERN.fullmatch(instance) is None:
        raise ProtocolError("instance must match ^" + INSTANCE_PATTERN.pattern + "$")
    labels = body.get("labels", [])
    if not isinstance(labels, list) or len(labels) > MAX_LABELS:
        raise ProtocolError(f"labels must be a list of at most {MAX_LABELS} strings")
    for label in labels:
        if not isinstance(label, str) or LABEL_PATTERN.fullmatch(label) is None:
            raise ProtocolError("each label must match ^" + LABEL_PATTERN.pattern + "$")
    version = body.get("version", "")
    if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS:
        raise ProtocolError(f"version must be a string of at most {MAX_VERSION_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in version):  # C0, DEL and C1
        raise ProtocolError("version must not contain control characters")
    draining = body.get("draining", False)
    if not isinstance(draining, bool):
        raise ProtocolError("draining must be true or false")
    every = body.get("heartbeat_seconds", 10.0)
    if isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every):
        raise ProtocolError("heartbeat_seconds must be a number")
    if not 0.1 <= every <= 3600:
        raise ProtocolError("heartbeat_seconds must be between 0.1 and 3600")
    jobs = body.get("jobs", [])
    if not isinstance(jobs, list) or len(jobs) > MAX_PUSHED_JOBS:
        raise ProtocolError(f"jobs must be a list of at most {MAX_PUSHED_JOBS} jobs")
    if not all(isinstance(job, dict) for job in jobs):  # an object the sidecar cannot read is skipped
        raise ProtocolError("each of jobs must be an object")
    cursor = body.get("cursor")
    if cursor is not None and (not isinstance(cursor, str) or CURSOR_PATTERN.fullmatch(cursor) is None):
        raise ProtocolError("cursor must be null or match ^" + CURSOR_PATTERN.pattern + "$")
    leaving = body.get("leaving", False)
    if not isinstance(leaving, bool):
        raise ProtocolError("leaving must be true or false")
    secrets = {}
    for name in ("identity_proof", "call_token", "next_identity_proof", "next_call_token"):
        value = body.get(name, "")
        if not isinstance(value, str) or (value and IDENTITY_PROOF_PATTERN.fullmatch(value) is None):
            # Never the value: it may be a secret sent by mistake.
            raise ProtocolError(f"{name} must be 64 lowercase hexadecimal digits")
        secrets[name] = value
    if bool(secrets["next_identity_proof"]) != bool(secrets["next_call_token"]):
        raise ProtocolError("next_identity_proof and next_call_token come together")
    previous = body.get("previous_instances", [])
    if not isinstance(previous, list) or len(previous) > MAX_PREVIOUS_INSTANCES:
        raise ProtocolError(
            f"previous_instances must be a list of at most {MAX_PREVIOUS_INSTANCES} instances"
        )
    for earlier in previous:
        if not isinstance(earlier, str) or INSTANCE_PATTERN.fullmatch(earlier) is None:
            raise ProtocolError("each of previous_instances must match ^" + INSTANCE_PATTERN.pattern + "$")
    # One job the sidecar cannot read must not cost the agent its liveness: it is skipped (the
    # catch-up read will see that job again), and the heartbeat stands.
    readable = []
    for job in jobs:
        with contextlib.suppress(ProtocolError):
            readable.append(JobInfo.from_json(job))
    return Heartbeat(
        jobs=tuple(readable),
        unreadable_jobs=len(jobs) - len(readable),
        leaving=leaving,
        identity_proof=secrets["identity_proof"],
        call_token=secrets["call_token"],
        next_identity_proof=secrets["next_identity_proof"],
        next_call_token=secrets["next_call_token"],
        previous_instances=tuple(previous),
        # What it says of its fence and maintenance is read leniently: a field the sidecar cannot read
        # (a newer agent's, or one past a bound) must not cost the agent its liveness.
        fence=_lenient(FenceTerms.from_json, body.get("fence")),
        maintenance=_lenient(Maintenance.from_json, body.get("maintenance")),
        unwell=_lenient(Unwell.from_json, body.get("unwell")),
        cursor=cursor,
        url=url.rstrip("/"),
        instance=instance,
        labels=tuple(dict.fromkeys(labels)),
        max_jobs=_count(body, "max_jobs"),
        jobs_running=_count(body, "jobs_running"),
        draining=draining,
        version=version,
        heartbeat_seconds=float(every),
        extra={key: value for key, value in body.items() if key not in KNOWN_FIELDS},
    )


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 0.0 is the integer 0 (fractions stay refused)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"{name} must be an integer from 0 to {MAX_INT}")
    return value
