"""Read-only pages for the people on call, under ``/ui/``: jobs (filterable), one job, the agents.

A person logs in with a viewer token (``[http] viewer_token_env`` / ``viewer_token_file``) or any API
token and gets a session cookie: HttpOnly (no script can read it), SameSite=Strict (no other site's
page sends it), ``Path=/ui``, Secure when the sidecar serves TLS, for :data:`SESSION_SECONDS`. Scripts
may send ``Authorization: Bearer <token>`` instead, as to the API. A page asked for without either
redirects to the login form (303), which returns to ``next``: a path under ``/ui/`` only, so a link
cannot send a person elsewhere. A session ends when the token that opened it is no longer accepted
(rotated out of its file), at logout, or after its lifetime.

Nothing here changes a job: besides the pages (GET) there are only the login and logout forms. There
is no JavaScript at all; every value shown goes through :func:`html.escape`, and every answer under
``/ui`` carries a Content-Security-Policy allowing no script, should a value ever slip through.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from reconciler.airflow.task_instances import AirflowError
from reconciler.api.statuses import status_of
from reconciler.core.job_service import JobService
from reconciler.errors import Refused
from reconciler.fleet.agent_state import AgentReport
from reconciler.fleet.agents import NoAgent
from reconciler.fleet.liveness import Fleet
from router_db import EventRecord, JobRecord, RouterDB, TaskInstanceKey
from servicekit.credentials import Secret
from servicekit.http import read_bounded
from servicekit.ratelimit import RateLimiter
from servicekit.text import text_problem
from sidecar_api.protocol import MAX_NAME_CHARS, JobStatus, WireError, parse_status, validate_job_id

log = logging.getLogger(__name__)

PREFIX = "/ui/"
LOGIN = "/ui/login"
HOME = "/ui/jobs"
COOKIE = "agentic_session"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000  # beyond this the oldest session ends: memory stays bounded under a login flood
MAX_FORM_BYTES = 16 * 1024
MAX_NEXT_CHARS = 2000
# A path's characters, percent-encoded as needed (RFC 3986), less quotes: nothing to break out of.
_NEXT = re.compile(r"/ui/[A-Za-z0-9\-._~!$&()*+,;=:@/?%]*")
LIST_LIMIT = 200  # newest jobs shown; the filters narrow it down
TAIL_BYTES = 8 * 1024  # the end of the job's output shown
REFRESH_SECONDS = 2  # a running job's page reloads itself this often (no JavaScript: a meta refresh)
AGENT_WAIT_SECONDS = 3.0  # for the output; a page must not hang on a silent agent
AIRFLOW_WAIT_SECONDS = 1.0  # for the API version (the task's link), when "auto" has not found it yet

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class PageConfig:
    """What the pages need beyond the API's parts (:func:`add_pages`)."""

    airflow_url: str  # [airflow] base_url: the task's link goes to its UI
    airflow_version: Callable[[], Awaitable[str]]  # "v2" (Airflow 3) or "v1" (Airflow 2), as detected
    viewer_tokens: Secret[tuple[str, ...]] | None = None  # log in to the pages only; None: none
    secure: bool = False  # served over TLS: the cookie is Secure


def e(value: object) -> str:
    """Every value put in a page, quotes included (values also land in attributes)."""
    return html.escape(str(value), quote=True)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# --------------------------------------------------------------------------------- pure helpers


def safe_next(value: str | None) -> str:
    """Where a login returns to: ``value`` if it is a path under ``/ui/`` of this site, else the jobs
    page. No scheme or host, no backslash (browsers read it as a slash), no dot segment (even
    percent-encoded: browsers resolve those too), only the characters of an encoded path and query."""
    if not value or len(value) > MAX_NEXT_CHARS or _NEXT.fullmatch(value) is None:
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith(PREFIX):
        return HOME
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return HOME
    return value


def airflow_task_url(base_url: str, version: str, key: TaskInstanceKey) -> str:
    """The task instance in Airflow's UI: Airflow 3 (API v2) ``/dags/{dag}/runs/{run}/tasks/{task}``
    (``/mapped/{i}`` for a mapped one), Airflow 2 (v1) the grid view with the run and task selected.
    Each part is URL-encoded; a ``user:password@`` in the base URL is left out (everyone sees it)."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    base = urlunsplit(parts)
    dag = quote(key.dag_id, safe="")
    if version == "v1":
        query = {"dag_run_id": key.run_id, "task_id": key.task_id}
        if key.map_index >= 0:
            query["map_index"] = str(key.map_index)
        return f"{base}/dags/{dag}/grid?{urlencode(query, quote_via=quote)}"
    url = f"{base}/dags/{dag}/runs/{quote(key.run_id, safe='')}/tasks/{quote(key.task_id, safe='')}"
    return url + (f"/mapped/{key.map_index}" if key.map_index >= 0 else "")


class Sessions:
    """Login sessions, in this process's memory: each replica keeps its own (a person moved to another
    replica by the load balancer logs in again there), and a restart ends them all. Only a digest of
    each session id is kept, with the digest of the token that opened it."""

    def __init__(
        self,
        *,
        lifetime: float = SESSION_SECONDS,
        limit: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._clock = clock
        self._live: dict[bytes, tuple[float, bytes]] = {}  # id digest -> (expiry, token digest)

    def open(self, token: bytes) -> str:
        """A new session id for a login with the token whose digest is ``token``."""
        now = self._clock()
        for key, (expires, _) in list(self._live.items()):
            if expires <= now:
                del self._live[key]
        while len(self._live) >= self._limit:
            del self._live[next(iter(self._live))]  # the oldest: sessions are kept in opening order
        session = secrets.token_urlsafe(32)
        self._live[_digest(session)] = (now + self._lifetime, token)
        return session

    def token(self, session: str) -> bytes | None:
        """The digest of the token that opened ``session``, or None if it is unknown or over."""
        found = self._live.get(_digest(session))
        if found is None or found[0] <= self._clock():
            return None
        return found[1]

    def close(self, session: str) -> None:
        self._live.pop(_digest(session), None)

    def __len__(self) -> int:
        return len(self._live)


class _PageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Match:
    client: str  # the rate limiter's key, as the API's: "token#<i>", or "viewer#<i>"
    token: bytes  # the token's digest


# --------------------------------------------------------------------------------------- the pages


class Pages:
    def __init__(
        self,
        config: PageConfig,
        *,
        jobs: JobService,
        db: RouterDB,
        fleet: Fleet | None,
        tokens: Secret[tuple[str, ...]],
        limiter: RateLimiter | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self._config = config
        self._jobs = jobs
        self._db = db
        self._fleet = fleet
        self._tokens = tokens
        self._limiter = limiter
        self.sessions = sessions or Sessions()

    def register(self, app: web.Application) -> None:
        app.router.add_get("/ui/", self._page(self.home))
        app.router.add_get("/ui/login", self._public(self.login_form))
        app.router.add_post("/ui/login", self._public(self.login))
        app.router.add_post("/ui/logout", self._public(self.logout))
        app.router.add_get("/ui/jobs", self._page(self.jobs))
        app.router.add_get("/ui/jobs/{job_id}", self._page(self.job))
        app.router.add_get("/ui/agents", self._page(self.agents))
        app.on_response_prepare.append(_security_headers)

    # --- access ------------------------------------------------------------------------------

    def _match(self, presented: str) -> _Match | None:
        """The accepted token ``presented`` is, compared as the API compares: digests, each in
        constant time, no early exit."""
        given = _digest(presented)
        found: _Match | None = None
        viewers = self._config.viewer_tokens.current() if self._config.viewer_tokens else ()
        for kind, tokens in (("token", self._tokens.current()), ("viewer", viewers)):
            for index, token in enumerate(tokens):
                digest = _digest(token)
                if hmac.compare_digest(given, digest):
                    found = _Match(f"{kind}#{index}", digest)
        return found if presented else None

    def _accepted(self, token: bytes) -> bool:
        viewers = self._config.viewer_tokens.current() if self._config.viewer_tokens else ()
        return any(hmac.compare_digest(token, _digest(t)) for t in (*self._tokens.current(), *viewers))

    def _limited(self, request: web.Request, match: _Match | None) -> web.Response | None:
        """The API's rate limit, with the API's keys: a token's position, or the address."""
        if self._limiter is None:
            return None
        retry_after = self._limiter.acquire(match.client if match else f"addr:{request.remote}")
        if not retry_after:
            return None
        message = f"Too many requests; try again in {retry_after} s."
        response = _html(_document("Too many requests", f"<p>{e(message)}</p>", nav=False), status=429)
        response.headers["Retry-After"] = str(retry_after)
        return response

    def _gate(self, request: web.Request) -> web.Response | None:
        """None when the request may see a page: a live session, or a bearer token (rate limited
        like the API; a session's views are not, as a running job's page reloads every few seconds).
        Else the answer: the login form (303), or 401 for a wrong bearer token."""
        session = request.cookies.get(COOKIE)
        if session:
            token = self.sessions.token(session)
            if token is not None and self._accepted(token):
                return None
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            match = self._match(value.strip())
            refused = self._limited(request, match)
            if refused is not None:
                return refused
            if match is None:
                return _html(_login_document("The token sent is not accepted.", HOME), status=401)
            return None
        back = safe_next(request.rel_url.raw_path_qs)  # as sent: still percent-encoded
        return _redirect(LOGIN + (f"?{urlencode({'next': back})}" if back != HOME else ""))

    def _page(self, handler: Callable[[web.Request], Awaitable[web.Response]]) -> Handler:
        async def page(request: web.Request) -> web.StreamResponse:
            refused = self._gate(request)
            if refused is not None:
                return refused
            return await _rendered(handler, request)

        return page

    def _public(self, handler: Callable[[web.Request], Awaitable[web.Response]]) -> Handler:
        async def public(request: web.Request) -> web.StreamResponse:
            return await _rendered(handler, request)

        return public

    # --- login -------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        back = safe_next(request.query.get("next"))
        return _html(_login_document(None, back))

    async def login(self, request: web.Request) -> web.Response:
        form = await _form(request)
        back = safe_next(form.get("next"))
        if "token" not in form:  # the form always sends the field, if empty: this is no login form
            raise _PageError(400, "The form has no token field.")
        match = self._match(form["token"].strip())
        refused = self._limited(request, match)
        if refused is not None:
            return refused
        if match is None:
            # The address only: never what was typed, which may be a real token pasted in the wrong place.
            log.warning(
                "page login refused: wrong token",
                extra={"action": "ui_login_refused", "remote": request.remote},
            )
            return _html(_login_document("Wrong token.", back), status=401)
        log.info("page login", extra={"action": "ui_login", "client": match.client, "remote": request.remote})
        previous = request.cookies.get(COOKIE)
        if previous:
            self.sessions.close(previous)  # a login always gets a new id: none is ever chosen for it
        response = _redirect(back)
        response.set_cookie(
            COOKIE,
            self.sessions.open(match.token),
            max_age=SESSION_SECONDS,
            path="/ui",
            secure=self._config.secure,
            httponly=True,
            samesite="Strict",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = request.cookies.get(COOKIE)
        if session:
            self.sessions.close(session)
        response = _redirect(LOGIN)
        response.del_cookie(COOKIE, path="/ui", secure=self._config.secure, httponly=True, samesite="Strict")
        return response

    # --- pages -------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        return _redirect(HOME)

    async def jobs(self, request: web.Request) -> web.Response:
        dag_id, run_id, status = (_filter(request, name) for name in ("dag_id", "run_id", "status"))
        for name, value in (("dag_id", dag_id), ("run_id", run_id)):
            if value is not None and len(value) > MAX_NAME_CHARS:
                raise _PageError(400, f"{name} must be at most {MAX_NAME_CHARS} characters")
        statuses = [parse_status(status)] if status is not None else None
        found = await asyncio.to_thread(
            self._db.search,
            dag_id=dag_id,
            run_id=run_id,
            statuses=statuses,
            limit=LIST_LIMIT,
            newest_first=True,
        )
        return _html(_jobs_document(found, dag_id=dag_id, run_id=run_id, status=status))

    async def job(self, request: web.Request) -> web.Response:
        job, events = await self._jobs.events(validate_job_id(request.match_info["job_id"]))
        output, note = await self._output(job)
        link = airflow_task_url(self._config.airflow_url, await self._airflow_version(), job.key)
        return _html(_job_document(job, events, link=link, output=output, note=note))

    async def agents(self, request: web.Request) -> web.Response:
        # The data GET /agents answers with: the fleet's reports and the router DB's active jobs.
        reports = [self._fleet.report(a) for a in self._fleet.ids()] if self._fleet is not None else []
        load = await asyncio.to_thread(self._db.active_counts) if reports else {}
        return _html(_agents_document(reports, load))

    async def _output(self, job: JobRecord) -> tuple[str, str]:
        """The end of the job's output and a line saying what it is (or why there is none)."""
        try:
            async with asyncio.timeout(AGENT_WAIT_SECONDS):
                size = (await self._jobs.log(job, offset=0, limit=0)).size
                start = max(0, size - TAIL_BYTES)
                chunk = await self._jobs.log(job, offset=start, limit=TAIL_BYTES)
        except Refused as exc:
            return "", f"No output: {exc}"
        except NoAgent:  # taken out of the configuration since the job ran
            return "", f"No output: agent {job.agent_id} is not configured."
        except TimeoutError:
            return "", f"No output: agent {job.agent_id} did not answer within {AGENT_WAIT_SECONDS:g} s."
        text = chunk.data.decode("utf-8", "replace")
        if start > 0:
            text = text.partition("\n")[2]  # the first line is cut: start at the next one
            return text, f"The last {len(text.encode())} of {size} bytes, from agent {job.agent_id}."
        return text, f"All {size} bytes, from agent {job.agent_id}."

    async def _airflow_version(self) -> str:
        """The API version the sidecar reads Airflow with; Airflow 3's when it cannot tell now."""
        try:
            return await asyncio.wait_for(self._config.airflow_version(), AIRFLOW_WAIT_SECONDS)
        except (AirflowError, TimeoutError):
            return "v2"


def add_pages(
    app: web.Application,
    config: PageConfig,
    *,
    jobs: JobService,
    db: RouterDB,
    fleet: Fleet | None,
    tokens: Secret[tuple[str, ...]],
    limiter: RateLimiter | None,
) -> Pages:
    """Serve the pages on ``app`` (the API's: one port); the API's auth middleware must be wrapped
    in :func:`except_pages`."""
    pages = Pages(config, jobs=jobs, db=db, fleet=fleet, tokens=tokens, limiter=limiter)
    pages.register(app)
    return pages


def except_pages(auth: Middleware) -> Middleware:
    """``auth`` for every route but the pages, which check their own login (a session cookie, or a
    bearer token as ``auth`` does). Decided by the route matched, never by the path's text: a path
    that only starts with /ui/ but routes elsewhere still meets ``auth``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = request.match_info
        resource = info.route.resource
        if resource is not None and resource.canonical.startswith(PREFIX):
            return await handler(request)
        # A method no page has: its 405 serves nothing, and says so without a token first.
        if isinstance(info.http_exception, web.HTTPMethodNotAllowed) and request.path.startswith(PREFIX):
            return await handler(request)
        return await auth(request, handler)

    return middleware


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/ui" or request.path.startswith(PREFIX):
        response.headers.update(HEADERS)


async def _rendered(
    handler: Callable[[web.Request], Awaitable[web.Response]], request: web.Request
) -> web.Response:
    """The page, or an error page saying what was wrong with the request."""
    try:
        return await handler(request)
    except _PageError as exc:
        status, message = exc.status, exc.message
    except WireError as exc:
        status, message = 400, str(exc)
    except Refused as exc:
        status, message = status_of(exc), str(exc)
    return _html(_document("Not shown", f'<p class="error">{e(message)}</p>'), status=status)


async def _form(request: web.Request) -> dict[str, str]:
    """A form's fields (the first of each name): bounded, UTF-8, storable text."""
    too_large = _PageError(413, f"The form is larger than {MAX_FORM_BYTES} bytes.")
    body = await read_bounded(request, MAX_FORM_BYTES, too_large)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20, errors="strict")
    except ValueError:  # not UTF-8, before or after percent-decoding; too many fields
        raise _PageError(400, "The form could not be read.") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    if text_problem(fields) is not None:
        raise _PageError(400, "The form holds characters no field takes.")
    return fields


def _filter(request: web.Request, name: str) -> str | None:
    """A filter of the jobs page: an empty field (a form sends every field) is no filter."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _PageError(400, f"{name} is given {len(values)} times; give it at most once.")
    value = values[0].strip() if values else ""
    if text_problem({name: value}) is not None:
        raise _PageError(400, f"{name} holds characters no {name} has.")
    return value or None


def _html(document: str, *, status: int = 200) -> web.Response:
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8")


def _redirect(location: str) -> web.Response:
    note = f'<!doctype html><title>See other</title><a href="{e(location)}">{e(location)}</a>'
    return web.Response(status=303, text=note, content_type="text/html", headers={"Location": location})


# ------------------------------------------------------------------------------------- rendering

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#1b1b1b}
nav{display:flex;gap:1.2em;align-items:center;border-bottom:1px solid #ccc;padding-bottom:.5em}
nav form{margin-left:auto}
table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
pre{background:#111;color:#eee;padding:.8em;overflow:auto;max-height:32em;white-space:pre-wrap}
.status{font-weight:600}.RUNNING,.QUEUED{color:#0b57d0}.STOPPING{color:#b06000}
.SUCCEEDED{color:#137333}.FAILED{color:#c5221f}.error{color:#c5221f}.muted{color:#666}
"""


def _document(title: str, body: str, *, refresh: bool = False, nav: bool = True) -> str:
    """A whole page; ``body`` is HTML built here, every value in it escaped where it was put."""
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    menu = (
        '<nav><a href="/ui/jobs">Jobs</a><a href="/ui/agents">Agents</a>'
        '<form method="post" action="/ui/logout"><button type="submit">Log out</button></form></nav>'
        if nav
        else ""
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"{meta}<title>{e(title)} - agentic sidecar</title><style>{_CSS}</style></head>"
        f"<body>{menu}<h1>{e(title)}</h1>{body}</body></html>"
    )


def _login_document(problem: str | None, back: str) -> str:
    error = f'<p class="error">{e(problem)}</p>' if problem else ""
    form = (
        f'{error}<form method="post" action="/ui/login">'
        f'<input type="hidden" name="next" value="{e(back)}">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" '
        "autofocus required></label> "
        '<button type="submit">Log in</button></form>'
        '<p class="muted">A viewer token, or a token of the sidecar\'s API.</p>'
    )
    return _document("Log in", form, nav=False)


def _when(moment: datetime | None) -> str:
    return moment.isoformat(sep=" ", timespec="seconds") if moment is not None else ""


def _status(status: JobStatus | str) -> str:
    return f'<span class="status {e(status)}">{e(status)}</span>'


def _rows(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table; ``rows`` hold HTML (each value escaped by the caller)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_JOB_COLUMNS = ("job", "status", "DAG", "task", "run", "map index", "try", "agent", "created", "rc", "reason")


def _jobs_document(
    jobs: Sequence[JobRecord], *, dag_id: str | None, run_id: str | None, status: str | None
) -> str:
    options = "".join(
        f'<option value="{e(s)}"{" selected" if s == status else ""}>{e(s)}</option>' for s in JobStatus
    )
    form = (
        '<form method="get" action="/ui/jobs">'
        f'<label>DAG <input name="dag_id" value="{e(dag_id or "")}"></label> '
        f'<label>Run <input name="run_id" value="{e(run_id or "")}"></label> '
        f'<label>Status <select name="status"><option value="">any</option>{options}</select></label> '
        '<button type="submit">Filter</button></form>'
    )
    rows = [
        [
            f'<a href="/ui/jobs/{e(quote(j.job_id, safe=""))}">{e(j.job_id)}</a>',
            _status(j.status),
            e(j.key.dag_id),
            e(j.key.task_id),
            e(j.key.run_id),
            e(j.key.map_index),
            e(j.key.try_number),
            e(j.agent_id),
            e(_when(j.created_at)),
            e("" if j.rc is None else j.rc),
            e(j.reason or ""),
        ]
        for j in jobs
    ]
    shown = f'<p class="muted">Newest first; at most {LIST_LIMIT} shown.</p>'
    table = _rows(_JOB_COLUMNS, rows) if rows else '<p class="muted">No job matches.</p>'
    return _document("Jobs", form + shown + table)


def _job_document(job: JobRecord, events: Sequence[EventRecord], *, link: str, output: str, note: str) -> str:
    key = job.key
    facts = [
        ("status", _status(job.status)),
        ("rc", e("" if job.rc is None else job.rc)),
        ("reason", e(job.reason or "")),
        ("agent", f'<a href="/ui/agents">{e(job.agent_id)}</a>'),
        ("command", f"<code>{e(job.command)}</code>"),
        ("created", e(_when(job.created_at))),
        ("finished", e(_when(job.finished_at))),
    ]
    ti = (
        f"DAG <b>{e(key.dag_id)}</b>, task <b>{e(key.task_id)}</b>, run <b>{e(key.run_id)}</b>, "
        f"map index {e(key.map_index)}, try {e(key.try_number)} "
        f'(<a href="{e(link)}" rel="noreferrer noopener">the task in Airflow</a>)'
    )
    facts.insert(1, ("task instance", ti))
    table = "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"
    timeline = _rows(
        ["at", "change", "source", "reason"],
        [
            [
                e(_when(ev.at)),
                e(f"{ev.old_status or 'new'} -> {ev.new_status}"),
                e(ev.source),
                e(ev.reason or ""),
            ]
            for ev in events
        ],
    )
    refreshing = (
        f'<p class="muted">The job is active: this page reloads every {REFRESH_SECONDS} s.</p>'
        if job.active
        else ""
    )
    body = (
        f"{refreshing}{table}<h2>Timeline</h2>{timeline}"
        f'<h2>Output</h2><p class="muted">{e(note)}</p><pre>{e(output)}</pre>'
    )
    return _document(f"Job {job.job_id}", body, refresh=job.active)


_AGENT_COLUMNS = (
    "agent",
    "url",
    "labels",
    "state",
    "last answer",
    "active jobs",
    "running",
    "max jobs",
    "version",
    "maintenance",
)


def _agents_document(reports: Sequence[AgentReport], load: dict[str, int]) -> str:
    rows = [
        [
            e(r.agent_id),
            e(r.url),
            e(", ".join(r.labels)),
            f'<span class="status">{e(r.state)}</span>',
            e(_when(r.last_contact_at)),
            e(load.get(r.agent_id, 0)),
            e("" if r.jobs_running is None else r.jobs_running),
            e("" if r.max_jobs is None else (r.max_jobs or "no limit")),
            e(r.version or ""),
            e(r.maintenance.describe() if r.maintenance is not None else ""),
        ]
        for r in reports
    ]
    table = _rows(_AGENT_COLUMNS, rows) if rows else '<p class="muted">No agent is configured.</p>'
    note = '<p class="muted">As this replica sees them; active jobs are the router DB\'s count.</p>'
    return _document("Agents", note + table)
