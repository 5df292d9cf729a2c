"""How a deferred task waits for its job: poll the sidecar until the job ends, riding out the rest.

A task must not fail because the path to the sidecar hiccups: the job keeps running on its VM, and a
failed task would make the reconciler stop it. So only two answers end the wait: the job's terminal
status, and the sidecar's own "job not found" (see
:func:`agentic_airflow.sidecar_client.classify_job_answer`).
Everything else (no connection, timeouts, 5xx, 429, 401/403, answers that are not the sidecar's, a
connection that cannot be resolved, a CA file that cannot be loaded) is logged and retried with capped
exponential backoff and jitter, so a fleet of triggers does not hammer a sidecar that is coming back.

No Airflow import: the trigger hands in how to resolve its connection and where to log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from agentic_airflow.sidecar_client import (
    OUTPUT_READ_SECONDS,
    AnswerKind,
    JobAnswer,
    SidecarEndpoint,
    SidecarError,
    TransientSubmitError,
    describe_failure,
    fetch_job_answer,
    log_tail,
    parse_object,
    status_update_request,
    submit_job,
)
from agentic_airflow.stopping import StopOnSigterm, TaskStopped
from sidecar_api.protocol import JobStatus

MAX_BACKOFF_SECONDS = 60.0
MIN_BACKOFF_SECONDS = 0.5  # retrying a failing sidecar faster than this helps nobody
REPORT_EVERY_SECONDS = 60.0  # the same kind of trouble is logged at most this often
RESUME_SETTLE_SECONDS = 8.0  # at least this long from the trigger's start to a success event (see run)
MAX_REPORT_KINDS = 32  # kinds of trouble remembered for that, the least recently reported forgotten
OUTPUT_CHUNK_BYTES = 64 * 1024  # of the job's output shown in the task's log per poll, at most
OUTPUT_BEHIND_CHUNKS = 4  # further behind than this many chunks, the task's log skips to the newest
OUTPUT_ACK_SECONDS = 1.0  # a cancelled trigger's last word on how far it showed the output
OUTPUT_HUNG_SECONDS = 30.0  # after an output read timed out, no other is tried for this long
LONG_POLL_SECONDS = 30.0  # the longest a poll waits at the sidecar for the job to change


def long_poll_seconds(poll_interval: float, *, streams_output: bool) -> float:
    """How long each ``GET /jobs/{id}`` may wait for the job to change (the sidecar answers at once
    when it does, so the end is heard at once however long this is). A trigger that shows the job's
    output reads it after each answer: it waits its poll interval, the pace the task's log grows at.
    One that shows nothing waits LONG_POLL_SECONDS: one cheap request per half minute. Never above
    it: proxies commonly cut requests idle for 60 s."""
    return min(poll_interval, LONG_POLL_SECONDS) if streams_output else LONG_POLL_SECONDS


class Log(Protocol):
    """What the poller needs of a logger (``logging.Logger`` and Airflow's structlog loggers)."""

    def info(self, msg: str, *args: Any) -> Any: ...

    def warning(self, msg: str, *args: Any) -> Any: ...

    def error(self, msg: str, *args: Any) -> Any: ...


@dataclass
class Backoff:
    """Delays after consecutive failures: each a random pick from the upper half of
    ``base * 2**failures`` (never below ``base``), capped at ``cap``."""

    base: float
    cap: float = MAX_BACKOFF_SECONDS
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self, *, at_least: float | None = None) -> float:
        """The wait before the next try; ``at_least`` (a ``Retry-After``) is honoured up to ``cap``."""
        self.failures += 1
        cap = max(self.cap, self.base)
        ceiling = min(cap, self.base * 2.0 ** min(self.failures, 32))
        delay = self.rng.uniform(max(self.base, ceiling / 2), ceiling)
        return max(delay, min(at_least or 0.0, cap))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class _Report:
    at: float
    held_back: int = 0


class JobPoller:
    """Wait for ``job_id`` to end; :meth:`run` returns the trigger event's payload.

    ``resolve`` reads the sidecar's endpoint from the connection ``conn_id``; it is called again
    after a 401/403 (the token may have been rotated) and after any failure to resolve. ``sleep``,
    ``clock``, ``rng`` and ``transport`` exist for tests.
    """

    def __init__(
        self,
        *,
        job_id: str,
        conn_id: str,
        resolve: Callable[[str], Awaitable[SidecarEndpoint]],
        log: Log,
        poll_interval: float = 2.0,
        log_tail_bytes: int = 4000,
        log_offset: int | None = 0,
        output_chunk_bytes: int = OUTPUT_CHUNK_BYTES,
        max_backoff: float = MAX_BACKOFF_SECONDS,
        request_timeout: float = 10.0,
        report_every: float = REPORT_EVERY_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.job_id = job_id
        self.conn_id = conn_id
        self._resolve = resolve
        self._log = log
        self._poll_interval = poll_interval
        self._log_tail_bytes = log_tail_bytes
        # Where the task's log has got to in the job's output; None: it does not show the output.
        self.log_offset = log_offset
        self._told_offset = log_offset  # the offset the sidecar last heard (the agent's mark)
        self._output_hung_until = float("-inf")  # an output read timed out: none tried until then
        self._output_chunk = max(1, output_chunk_bytes)
        self._skipped_to: int | None = None  # the output was skipped up to here (mid-line, likely)
        self._request_timeout = request_timeout
        self._long_poll = long_poll_seconds(poll_interval, streams_output=log_offset is not None)
        self._known: str | None = None  # the job's status as last answered: what the long-poll waits on
        self._report_every = report_every
        self._sleep = sleep
        self._clock = clock
        self._transport = transport
        jitter = rng or random.Random()  # noqa: S311 (spreads retries out; nothing secret)
        self._backoff = Backoff(max(poll_interval, MIN_BACKOFF_SECONDS), max_backoff, jitter)
        # Kept across answers: a sidecar that throttles every other poll must not fill the log.
        self._reports: dict[str, _Report] = {}
        self._failing_since: float | None = None  # the first failure of the current streak
        self._streak_reported = False  # a line about this streak was written: so is its end

    async def run(self) -> dict[str, Any]:
        started = self._clock()
        event = await self._wait()
        # Airflow 3 (through 3.3 at least) fails a resumed task when the executor's late report of the
        # deferring process's exit arrives after the resumed try started (apache/airflow#72716). A
        # success fired at once (a job that ends within seconds) makes that likely: give the scheduler
        # time to take the old report first. A failure fails the task either way: no wait.
        settle = RESUME_SETTLE_SECONDS - (self._clock() - started)
        if event.get("status") == JobStatus.SUCCEEDED and settle > 0:
            await self._sleep(settle)
        return event

    async def _wait(self) -> dict[str, Any]:
        session: tuple[SidecarEndpoint, httpx.AsyncClient] | None = None
        try:
            while True:
                if session is None:
                    try:
                        endpoint = await self._resolve(self.conn_id)
                        session = endpoint, await self._client(endpoint)
                    except Exception as exc:  # whatever a secrets backend raises: retried all the same
                        await self._cannot_resolve(exc)
                        continue
                endpoint, client = session
                asked = self._clock()
                try:
                    answer = await fetch_job_answer(
                        client,
                        self.job_id,
                        wait=self._long_poll,
                        status=self._known,
                        timeout=self._request_timeout + self._long_poll,
                    )
                except httpx.HTTPError as exc:
                    detail = describe_failure(endpoint, exc)
                    # Read the connection again before the next try: the sidecar may have moved
                    # (a new address, https instead of http) since the task deferred.
                    session = None
                    await client.aclose()
                    await self._retry(
                        f"unreachable:{detail}", "job %s: %s; the job runs on, retrying in %.1f s%s", detail
                    )
                    continue
                if answer.kind is AnswerKind.JOB:
                    self._answered(endpoint)
                    if self.log_offset is not None:
                        await self._show_output(client, final=answer.final)
                    if answer.final:
                        return await self._ended(client, answer)
                    self._known = str((answer.job or {}).get("status"))
                    # At most one poll per poll interval: a long-poll that ran its course has waited
                    # already; a sidecar that predates ``wait`` answered at once, and so does one
                    # whose job moved on (QUEUED to RUNNING) but has not ended.
                    await self._sleep(max(0.0, self._poll_interval - (self._clock() - asked)))
                elif answer.kind is AnswerKind.NO_SUCH_JOB:
                    return self._gone(endpoint, answer)
                else:
                    if answer.kind is not AnswerKind.THROTTLED:
                        # Read the connection again: a rotated token, or a sidecar that moved (what
                        # answers at the old address may be a proxy's page or another service).
                        session = None
                        await client.aclose()
                    await self._refused(endpoint, answer)
        except asyncio.CancelledError:
            # A triggerer shutting down: tell the job how far its output was shown, so the trigger that
            # takes over starts there instead of repeating it. Bounded: a shutdown must not wait on us.
            if session is not None and self.log_offset is not None and self.log_offset != self._told_offset:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._read_output(session[1], 1), OUTPUT_ACK_SECONDS)
            raise
        finally:
            if session is not None:
                await session[1].aclose()

    async def _read_output(self, client: httpx.AsyncClient, limit: int) -> httpx.Response:
        assert self.log_offset is not None  # only a poller that shows the output reads it
        params: dict[str, int | str] = {"offset": self.log_offset, "limit": limit, "cursor": "true"}
        return await client.get(f"/jobs/{self.job_id}/log", params=params, timeout=OUTPUT_READ_SECONDS)

    async def _show_output(self, client: httpx.AsyncClient, *, final: bool) -> None:
        """Append the job's new output to the task's log: whole lines, one chunk a poll (up to
        ``OUTPUT_BEHIND_CHUNKS`` + 1 once the job ended, to show its last words).

        Best effort: a failed read shows nothing this time (the poll goes on, the next read catches
        up). The read carries ``cursor``, so the job's agent keeps the offset: a trigger started again
        (another triggerer) goes on where this one stopped, whatever offset it was deferred with.
        """
        if self._clock() < self._output_hung_until:
            return  # the last read timed out: the agent hangs; the job's end is not held up by it
        for _ in range(OUTPUT_BEHIND_CHUNKS + 1 if final else 1):
            if not await self._show_chunk(client, final=final):
                return

    async def _show_chunk(self, client: httpx.AsyncClient, *, final: bool) -> bool:
        """One read of the output; True when more is waiting."""
        asked = self.log_offset
        assert asked is not None
        try:
            response = await self._read_output(client, self._output_chunk)
            if response.status_code != 200:
                raise _Unusable(f"HTTP {response.status_code}")
            size, end = int(response.headers["X-Log-Size"]), int(response.headers["X-Next-Offset"])
            data = response.content
            start = end - len(data)  # past ``asked`` when an earlier trigger showed those bytes
            if not asked <= start <= end <= size:
                raise _Unusable(f"offsets that do not add up: {start}-{end} of {size}")
        except (httpx.HTTPError, KeyError, ValueError, _Unusable) as exc:
            if isinstance(exc, httpx.TimeoutException):
                self._output_hung_until = self._clock() + OUTPUT_HUNG_SECONDS
            detail = str(exc) if isinstance(exc, _Unusable) else type(exc).__name__
            self._report(
                f"output:{detail}",
                "warning",
                "job %s: cannot read the job's output (%s); the task's log shows it once a read works%s",
                self.job_id,
                detail,
            )
            return False
        self._told_offset = asked
        if start == self._skipped_to and b"\n" in data:  # past a skip: from the next whole line
            cut = data.index(b"\n") + 1
            start, data = start + cut, data[cut:]
        self._skipped_to = None
        shown = output_to_show(data, full_chunk=len(data) >= self._output_chunk, final=final)
        if shown:
            # One record a read, not one a line: a chunk of short lines must not hold up the
            # triggerer's event loop, which every trigger shares.
            self._log.info("%s", shown.decode("utf-8", errors="replace").rstrip("\n"))
        self.log_offset = start + len(shown)
        if size - self.log_offset > OUTPUT_BEHIND_CHUNKS * self._output_chunk:
            # A job writing faster than the task's log may show: skip to its newest output (the whole
            # output stays with the agent) rather than fall ever further behind.
            skip_to = size - self._output_chunk
            self._log.warning(
                "job %s: %d bytes of output not shown here; the whole output: GET /jobs/%s/log?offset=%d",
                self.job_id,
                skip_to - self.log_offset,
                self.job_id,
                self.log_offset,
            )
            self.log_offset = self._skipped_to = skip_to
        return bool(shown) and self.log_offset < size

    async def _client(self, endpoint: SidecarEndpoint) -> httpx.AsyncClient:
        return await open_client(endpoint, timeout=self._request_timeout, transport=self._transport)

    async def _cannot_resolve(self, exc: Exception) -> None:
        # SidecarError texts are ours and never carry the token; other exceptions might quote a
        # connection URI, so only their type is shown.
        reason = str(exc) if isinstance(exc, SidecarError) else type(exc).__name__
        await self._retry(
            f"resolve:{reason}",
            "job %s: cannot use the connection %s (%s); retrying in %.1f s%s",
            self.conn_id,
            reason,
            level="error",
        )

    async def _refused(self, endpoint: SidecarEndpoint, answer: JobAnswer) -> None:
        where, detail = endpoint.base_url, answer.detail
        if answer.kind is AnswerKind.THROTTLED:
            await self._retry(
                "throttled",
                "job %s: sidecar at %s is rate-limiting polls (%s); retrying in %.1f s%s",
                where,
                detail,
                at_least=answer.retry_after,
            )
        elif answer.kind is AnswerKind.UNAUTHORIZED:
            await self._retry(
                "unauthorized",
                "job %s: sidecar at %s refused the token of connection %s (%s); "
                "reading the connection again, retrying in %.1f s%s",
                where,
                self.conn_id,
                detail,
                level="error",
            )
        elif answer.kind is AnswerKind.UNAVAILABLE:
            await self._retry(
                f"unavailable:{detail}",
                "job %s: sidecar at %s failed (%s); the job runs on, retrying in %.1f s%s",
                where,
                detail,
                at_least=answer.retry_after,
            )
        else:
            await self._retry(
                f"unusable:{detail}",
                "job %s: unusable answer from the sidecar at %s (%s); retrying in %.1f s%s",
                where,
                detail,
            )

    async def _retry(
        self, kind: str, message: str, *fields: object, level: str = "warning", at_least: float | None = None
    ) -> None:
        """Log ``message`` (the job id, ``fields``, the delay, a note of lines held back) unless the
        same ``kind`` of trouble was reported less than ``report_every`` ago; then wait."""
        if self._failing_since is None:
            self._failing_since = self._clock()
        delay = self._backoff.next_delay(at_least=at_least)
        if self._report(kind, level, message, self.job_id, *fields, delay):
            self._streak_reported = True
        await self._sleep(delay)

    def _report(self, kind: str, level: str, message: str, *args: object) -> bool:
        """Log ``message`` with ``args`` and a note of lines held back, unless the same ``kind`` of
        trouble was reported less than ``report_every`` ago; True when it was logged."""
        now = self._clock()
        report = self._reports.get(kind)
        if report is not None and now - report.at < self._report_every:
            report.held_back += 1
            return False
        held_back = report.held_back if report is not None else 0
        note = f" ({held_back} more like this since the last report)" if held_back else ""
        write = self._log.error if level == "error" else self._log.warning
        write(message, *args, note)
        self._reports.pop(kind, None)
        self._reports[kind] = _Report(now)
        if len(self._reports) > MAX_REPORT_KINDS:  # texts that vary (request ids) must not pile up
            del self._reports[next(iter(self._reports))]
        return True

    def _answered(self, endpoint: SidecarEndpoint) -> None:
        if self._failing_since is not None and self._streak_reported:
            self._log.info(
                "job %s: sidecar at %s answers again; failed polls: %d over %.0f s",
                self.job_id,
                endpoint.base_url,
                self._backoff.failures,
                self._clock() - self._failing_since,
            )
        self._failing_since = None
        self._streak_reported = False
        self._backoff.reset()

    async def _ended(self, client: httpx.AsyncClient, answer: JobAnswer) -> dict[str, Any]:
        job = answer.job or {}
        if job.get("status") == JobStatus.SUCCEEDED:
            tail = ""
        elif self._clock() < self._output_hung_until:
            tail = f"(log unavailable: the job's agent did not answer within {OUTPUT_READ_SECONDS:g} s)"
        else:
            tail = await log_tail(client, self.job_id, self._log_tail_bytes)
        return {**summary(job), "log_tail": tail}

    def _gone(self, endpoint: SidecarEndpoint, answer: JobAnswer) -> dict[str, Any]:
        error = f"sidecar at {endpoint.base_url} has no such job ({answer.detail})"
        self._log.error("job %s: %s; ending the task", self.job_id, error)
        return {"job_id": self.job_id, "status": "ERROR", "error": error}


class _Unusable(Exception):
    """An answer to an output read that shows nothing (its text is ours)."""


def output_to_show(data: bytes, *, full_chunk: bool, final: bool) -> bytes:
    """The part of ``data`` to show now: up to its last newline (the rest waits for its line to end);
    all of it once the job ended; a whole chunk with no newline (one very long line) up to its last
    complete UTF-8 character, so no character is split between two reads."""
    if final:
        return data
    cut = data.rfind(b"\n")
    if cut >= 0:
        return data[: cut + 1]
    return data[: _complete_utf8(data)] if full_chunk else b""


def _complete_utf8(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 sequence cut short at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: nothing is cut
        if byte >= 0xF8:
            break  # no UTF-8 lead byte
        if byte >= 0xC0:  # the lead byte of the last sequence: complete when all its bytes are here
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= needed else len(data) - back
    return len(data)  # not UTF-8 at all: shown as it is (decoded with replacement characters)


async def open_client(
    endpoint: SidecarEndpoint, *, timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An httpx client for the sidecar, built off the event loop: loading a CA bundle takes tens of
    milliseconds, more under load, and the triggerer's loop is every trigger's. A CA file that cannot
    be loaded raises SidecarError."""
    verify = await asyncio.to_thread(endpoint.verify)
    return await asyncio.to_thread(
        httpx.AsyncClient,
        base_url=endpoint.base_url,
        headers=endpoint.headers,
        timeout=timeout,
        verify=verify,
        transport=transport,
    )


KILL_REPORT_SECONDS = 25.0  # within Airflow's [triggerer] on_kill_timeout (30 s by default)


async def report_kill(
    *,
    job_id: str,
    conn_id: str,
    resolve: Callable[[str], Awaitable[SidecarEndpoint]],
    log: Log,
    deadline: float = KILL_REPORT_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any] | None:
    """Tell the sidecar that Airflow killed the trigger waiting on ``job_id`` (a person marked the task
    failed or success, or cleared it), so that the job stops now rather than at the sidecar's next
    poll. The sidecar stops it only once its own direct read of the task instance confirms that
    Airflow no longer wants it: a report that is wrong or late stops nothing.

    Transient failures are retried until ``deadline``; never raises (the poll remains the safety net).
    Returns the sidecar's answer, or None when none came."""
    started = clock()
    delay = 0.5
    body = status_update_request(status="killed", reason="Airflow killed the task's trigger", job_id=job_id)
    while True:
        try:
            endpoint = await resolve(conn_id)
            timeout = max(1.0, deadline - (clock() - started))
            async with await open_client(endpoint, timeout=timeout, transport=transport) as client:
                response = await client.post("/jobs/update_status", json=body)
            code = response.status_code
            answer = parse_object(response.content) or {}
            if code < 500 and code not in (401, 403, 429) and "action" in answer:
                log.info(
                    "job %s: told the sidecar that Airflow killed this task: %s (%s)",
                    job_id,
                    answer.get("action"),
                    answer.get("message"),
                )
                return answer
            detail = f"HTTP {code}"
        except httpx.HTTPError as exc:
            detail = type(exc).__name__
        except Exception as exc:  # a connection that cannot be read: its type only, never its text
            detail = str(exc) if isinstance(exc, SidecarError) else type(exc).__name__
        if clock() - started + delay > deadline:
            log.warning(
                "job %s: could not tell the sidecar that Airflow killed this task (%s); its poll will see it",
                job_id,
                detail,
            )
            return None
        await sleep(delay)
        delay = min(delay * 2, 5.0)


def summary(job: dict[str, Any]) -> dict[str, Any]:
    """The fields of a finished job that the operator's ``execute_complete`` reads."""
    return {k: job.get(k) for k in ("job_id", "status", "rc", "reason", "agent_id", "finished_at")}


SUBMIT_PATIENCE_SECONDS = 600.0  # how long a task waits for the sidecar to take its job
# What becomes of the job of a task that stopped (reconciler/core/decision.py), said in its log.
RECONCILER_STOPS = (
    "the sidecar's reconciler stops it once Airflow no longer runs this task instance "
    "(failed, up for retry, cleared)"
)


@dataclass
class Submission:
    """How far a task's submission got: what its log says when SIGTERM stops it."""

    attempts: int = 0
    in_flight: bool = False  # a request is on its way to the sidecar
    answer_lost: bool = False  # an earlier request may have reached the sidecar, and no answer came
    last_error: str = ""
    job_id: str | None = None

    def failed(self, exc: TransientSubmitError) -> None:
        self.in_flight = False
        self.answer_lost = self.answer_lost or exc.answer_lost
        self.last_error = str(exc)

    def describe(self) -> str:
        """Why the task stopped and what became of its job, in the words of its log."""
        if self.job_id is not None:
            return f"stopped by SIGTERM after submitting job {self.job_id}; {RECONCILER_STOPS}"
        if self.in_flight:
            return (
                f"stopped by SIGTERM while submitting (attempt {self.attempts}): the request was cut off "
                f"before its answer, so the sidecar may have started a job; if it did, {RECONCILER_STOPS}"
            )
        tried = f" ({self.attempts} attempt(s), the last: {self.last_error})" if self.last_error else ""
        if self.answer_lost:
            return (
                f"stopped by SIGTERM while waiting to submit{tried}: an earlier submission got no answer, "
                f"so the sidecar may have started a job; if it did, {RECONCILER_STOPS}"
            )
        return f"stopped by SIGTERM while waiting to submit{tried}; no job was started"


def submit_patiently(
    resolve: Callable[[], SidecarEndpoint],
    request: dict[str, Any],
    *,
    conn_id: str,
    log: Log,
    patience: float = SUBMIT_PATIENCE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    backoff: Backoff | None = None,
    terminated: Callable[[str], BaseException] = TaskStopped,
) -> dict[str, Any]:
    """``POST /jobs`` until the sidecar takes the job, riding out what may pass (no connection, 5xx,
    429 with its Retry-After, 401/403 while a token rotates: the connection is read again) for up to
    ``patience`` seconds. Safe because a submission is idempotent per task instance. A refusal (4xx)
    or a certificate that does not verify fails at once: waiting would not change it.

    SIGTERM (Airflow stopping the task, or a person) ends the wait at once, during a backoff or a
    request, and once the connection is read when it comes while Airflow reads it: the reason is
    logged and ``terminated(reason)`` raised (see :mod:`agentic_airflow.stopping`)."""
    backoff = backoff or Backoff(base=1.0)
    deadline = clock() + patience
    endpoint: SidecarEndpoint | None = None
    progress = Submission()
    with StopOnSigterm(progress.describe, log=log, terminated=terminated) as stop:
        while True:
            try:
                progress.attempts += 1
                if endpoint is None:
                    endpoint = _resolve(resolve, conn_id)
                with stop.interruptible():
                    progress.in_flight = True
                    job = submit_job(endpoint, request)
                progress.in_flight = False
                progress.job_id = str(job["job_id"])  # a SIGTERM held back till now says so
                return job
            except TransientSubmitError as exc:
                progress.failed(exc)
                delay = backoff.next_delay(at_least=exc.retry_after)
                if clock() + delay > deadline:
                    raise SidecarError(f"{exc}; still failing after {patience:.0f} s") from None
                if exc.unauthorized:
                    log.error(
                        "sidecar refused the token of connection %s (%s); reading it again", conn_id, exc
                    )
                    endpoint = None
                else:
                    log.warning("job not submitted yet: %s; retrying in %.1f s", exc, delay)
                with stop.interruptible():
                    sleep(delay)


def _resolve(resolve: Callable[[], SidecarEndpoint], conn_id: str) -> SidecarEndpoint:
    """The connection, read now; a failure to read it (a secrets backend throttling) may pass."""
    try:
        return resolve()
    except SidecarError as exc:
        raise TransientSubmitError(f"connection {conn_id}: {exc}") from None
    except Exception as exc:  # its text may quote the connection's URI, token included: the type only
        raise TransientSubmitError(f"connection {conn_id} cannot be read: {type(exc).__name__}") from None
