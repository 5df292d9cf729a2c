"""The read-only pages under /ui/: login, escaping, the redirect guard, headers; and a real browser.

The fast tests serve the sidecar's real application in-process (router DB on SQLite, no agent
listening, Airflow never asked: its API version is configured). The last test runs everything as in
production (an agent and a sidecar as processes, Airflow's REST stand-in) and drives Debian's
Chromium, headless, over the DevTools protocol: it logs in through the form and watches a job's page
as the job runs, ends, or is stopped. ``AGENTIC_REFRESH_SCREENSHOT=1`` also writes its screenshot of a
job's page to docs/job-page.png.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import Morsel
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientResponse, DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer

from harness.agent import AgentProcess
from harness.browser import chromium
from harness.processes import free_port, wait_until
from harness.served import ServedAirflow
from harness.sidecar import AgentRef, SidecarProcess
from reconciler.api.pages import COOKIE, HEADERS, PageConfig, Sessions, airflow_task_url, safe_next
from reconciler.api.server import SidecarAPI
from reconciler.config import load_secrets, parse_config
from reconciler.service import build
from router_db import JobStatus, NewJob, RouterDB, TaskInstanceKey
from servicekit.credentials import Secret, token_list
from servicekit.ratelimit import RateLimiter

ROOT = Path(__file__).resolve().parent.parent
API, VIEWER = "pages-api-token-3k9w", "pages-viewer-token-7q2x"
AIRFLOW = "http://airflow.example:8080/base"
EVIL = "<script>alert(1)</script>"
AGENT = "agent<b>1</b>"


# ------------------------------------------------------------------------------ in-process sidecar


@dataclass
class Stand:
    client: TestClient[Any, Any]
    db: RouterDB

    async def get(self, path: str, *, token: str | None = None, session: str | None = None) -> ClientResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if session:
            headers["Cookie"] = f"{COOKIE}={session}"
        return await self.client.get(path, headers=headers, allow_redirects=False)

    async def login(self, token: str, next_: str | None = None) -> ClientResponse:
        form = {"token": token} | ({"next": next_} if next_ is not None else {})
        return await self.client.post("/ui/login", data=form, allow_redirects=False)

    async def session(self, token: str = VIEWER) -> str:
        answer = await self.login(token)
        assert answer.status == 303, await answer.text()
        return answer.cookies[COOKIE].value

    def job(self, *, dag_id: str = "dag", command: str = "echo hi", task_id: str = "task") -> str:
        key = TaskInstanceKey(dag_id=dag_id, task_id=task_id, run_id="run 1/2", map_index=-1, try_number=1)
        job, _ = self.db.submit(NewJob(key, AGENT, command))
        return job.job_id


@asynccontextmanager
async def stand(
    tmp: Path,
    *,
    viewer: Secret[tuple[str, ...]] | None = None,
    secure: bool = False,
    limiter: RateLimiter | None = None,
    api_version: str = "v2",
) -> AsyncIterator[Stand]:
    nowhere = f"http://127.0.0.1:{free_port()}"  # the agent: nothing listens there
    raw = {
        "router_db": {"url": f"sqlite:///{tmp / 'router.db'}"},
        "airflow": {"base_url": AIRFLOW, "api_version": api_version},
        "agents": [{"id": AGENT, "url": nowhere, "labels": ["<i>gpu</i>"]}],
    }
    config = parse_config(raw, {})
    env = {"AIRFLOW_PASSWORD": "pw", "AGENTIC_SIDECAR_TOKEN": API, "AGENTIC_AGENT_TOKEN": "agent-token"}
    secrets = load_secrets(config, env | {"AGENTIC_VIEWER_TOKEN": VIEWER})
    parts = build(config, secrets)
    api = SidecarAPI(
        jobs=parts.job_service(),
        db=parts.db,
        metrics=parts.metrics,
        loop=parts.loop,
        fleet=parts.fleet,
        tokens=secrets.http_tokens,
        ready_after=1,
        rate_limiter=limiter,
        pages=PageConfig(
            airflow_url=AIRFLOW,
            airflow_version=parts.airflow.api_version,
            viewer_tokens=viewer or secrets.viewer_tokens,
            secure=secure,
        ),
    )
    try:
        # No cookie jar: each request carries exactly the session it is given.
        async with TestClient(TestServer(api.app()), cookie_jar=DummyCookieJar()) as client:
            yield Stand(client, parts.db)
    finally:
        await parts.close()


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


# ----------------------------------------------------------------------------------------- fast


@pytest.mark.fast
def test_every_value_is_escaped_on_every_page(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            job_id = s.job(dag_id=f"dag{EVIL}", command=f"echo '{EVIL}' \"quoted\" & more", task_id=EVIL)
            s.db.mark_running(job_id, source="test")
            s.db.finish(
                job_id, status=JobStatus.FAILED, rc=1, reason='<img src=x onerror="alert(2)">', source="test"
            )
            pages = [
                await s.get("/ui/jobs", token=API),
                await s.get(f"/ui/jobs?dag_id=dag{EVIL}&run_id=&status=", token=API),
                await s.get(f"/ui/jobs/{job_id}", token=API),
                await s.get("/ui/agents", token=API),
            ]
            for page in pages:
                text = await page.text()
                assert page.status == 200, text
                assert page.content_type == "text/html"
                assert "<script" not in text and "<img" not in text and "<b>1" not in text, text
                assert "onerror=" not in text.replace("onerror=&quot;", "")  # only as escaped text
            listing, filtered, job, agents = [await p.text() for p in pages]
            assert f"dag{EVIL}".replace("<", "&lt;").replace(">", "&gt;") in listing
            assert job_id in filtered and "&lt;script&gt;alert(1)&lt;/script&gt;" in filtered
            assert "&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27; &quot;quoted&quot; &amp; more" in job
            assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in job
            assert "agent&lt;b&gt;1&lt;/b&gt;" in agents and "&lt;i&gt;gpu&lt;/i&gt;" in agents

    run(scenario())


@pytest.mark.fast
@pytest.mark.parametrize(
    ("asked", "goes_to"),
    [
        ("/ui/jobs/abc?x=1", "/ui/jobs/abc?x=1"),
        ("/ui/agents", "/ui/agents"),
        (None, "/ui/jobs"),
        ("", "/ui/jobs"),
        ("https://evil.example/ui/jobs", "/ui/jobs"),
        ("//evil.example/ui/jobs", "/ui/jobs"),
        ("/\\evil.example", "/ui/jobs"),
        ("/ui/\\evil.example", "/ui/jobs"),
        ("/ui/../jobs", "/ui/jobs"),
        ("/ui/%2e%2e/jobs", "/ui/jobs"),
        ("/ui/jobs/%2E%2E/%2E%2E/metrics", "/ui/jobs"),
        ("/jobs", "/ui/jobs"),
        ("/uievil", "/ui/jobs"),
        ("/ui/jobs\r\nSet-Cookie: x=1", "/ui/jobs"),
        ("/ui/j\u00f6bs", "/ui/jobs"),
        ("javascript:alert(1)", "/ui/jobs"),
        ("/ui/" + "a" * 3000, "/ui/jobs"),
    ],
)
def test_a_login_returns_only_to_a_page_under_ui(asked: str | None, goes_to: str) -> None:
    assert safe_next(asked) == goes_to


@pytest.mark.fast
def test_the_login_form_keeps_next_and_the_login_goes_there_and_nowhere_else(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            job_id = s.job()
            bounced = await s.get(f"/ui/jobs/{job_id}")
            assert bounced.status == 303
            assert bounced.headers["Location"] == f"/ui/login?next=%2Fui%2Fjobs%2F{job_id}"
            form = await (await s.get(bounced.headers["Location"])).text()
            assert f'name="next" value="/ui/jobs/{job_id}"' in form
            assert (await s.login(VIEWER, f"/ui/jobs/{job_id}")).headers["Location"] == f"/ui/jobs/{job_id}"
            for elsewhere in ("https://evil.example/", "//evil.example/x", "/ui/../metrics"):
                assert (await s.login(VIEWER, elsewhere)).headers["Location"] == "/ui/jobs"
            hostile = await (await s.get('/ui/login?next=/ui/"><script>x</script>')).text()
            assert "<script>" not in hostile and 'value="/ui/jobs"' in hostile

    run(scenario())


@pytest.mark.fast
def test_a_page_without_a_login_redirects_to_the_form(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            for path, location in (
                ("/ui/jobs", "/ui/login"),
                ("/ui/jobs?status=FAILED", "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3DFAILED"),
                ("/ui/agents", "/ui/login?next=%2Fui%2Fagents"),
                ("/ui/", "/ui/login?next=%2Fui%2F"),
            ):
                answer = await s.get(path)
                assert (answer.status, answer.headers["Location"]) == (303, location), path
                assert "Set-Cookie" not in answer.headers
            unknown = await s.get("/ui/jobs/no-such-job", token=API)
            assert unknown.status == 404 and "no-such-job" in await unknown.text()
            bad = await s.get("/ui/jobs/bad!id", token=API)
            assert bad.status == 400

    run(scenario())


def test_behind_a_tls_proxy_the_session_cookie_is_secure_though_the_sidecar_serves_http(
    tmp_path: Path, airflow: ServedAirflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[http] cookie_secure (here from its environment variable): the sidecar serves plain HTTP to a
    proxy that terminates TLS, and the browser must send the cookie over HTTPS only."""
    for secure in (False, True):
        monkeypatch.setenv("AGENTIC_RECONCILER_HTTP_COOKIE_SECURE", "true" if secure else "false")
        viewer = f"viewer-token-{secure}-" + "v" * 24
        with (
            SidecarProcess(
                workdir=tmp_path / str(secure),
                airflow_url=airflow.url,
                airflow_password="unused",
                agents=[],
                api_version="v2",
                viewer_token=viewer,
            ) as sidecar,
            httpx.Client(base_url=sidecar.url, timeout=10) as browser,
        ):
            answer = browser.post("/ui/login", data={"token": viewer})
            assert answer.status_code == 303, answer.text
            header = answer.headers["Set-Cookie"]
            assert "HttpOnly" in header and ("Secure" in header) is secure, header


@pytest.mark.fast
def test_login_sets_an_httponly_strict_session_cookie_for_ui_only(tmp_path: Path) -> None:
    async def scenario(secure: bool) -> Morsel[str]:
        async with stand(tmp_path / str(secure), secure=secure) as s:
            (tmp_path / str(secure)).mkdir(exist_ok=True)
            answer = await s.login(VIEWER)
            assert (answer.status, answer.headers["Location"]) == (303, "/ui/jobs")
            (header,) = answer.headers.getall("Set-Cookie")
            assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/ui" in header
            assert ("Secure" in header) is secure
            cookie = answer.cookies[COOKIE]
            assert len(cookie.value) >= 40 and VIEWER not in header
            page = await s.get("/ui/jobs", session=cookie.value)
            assert page.status == 200 and "Jobs" in await page.text()
            return cookie

    (tmp_path / "False").mkdir()
    (tmp_path / "True").mkdir()
    plain = run(scenario(False))
    assert plain["max-age"] == str(8 * 3600) and plain["path"] == "/ui" and plain["samesite"] == "Strict"
    assert plain["httponly"] is True and not plain["secure"]
    assert run(scenario(True))["secure"] is True


@pytest.mark.fast
def test_a_wrong_token_gets_401_no_cookie_and_never_shows_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            for wrong in ("not-the-token", "", f"{VIEWER}x", "<script>"):
                answer = await s.login(wrong, "/ui/agents")
                text = await answer.text()
                assert answer.status == 401 and "Wrong token" in text
                assert "Set-Cookie" not in answer.headers
                assert 'name="next" value="/ui/agents"' in text  # the form keeps where to go
                if wrong:
                    assert wrong not in text
            assert (await s.get("/ui/jobs", session="forged-session-id")).status == 303
            # The API's own tokens log in too; a page with a wrong bearer token is a 401, not a redirect.
            assert (await s.login(API)).status == 303
            assert (await s.get("/ui/jobs", token="not-the-token")).status == 401

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert "page login refused" in caplog.text
    assert "not-the-token" not in caplog.text and VIEWER not in caplog.text and API not in caplog.text


@pytest.mark.fast
def test_bearer_tokens_keep_working_and_a_viewer_token_opens_only_the_pages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            job_id = s.job()
            assert (await s.get("/jobs", token=API)).status == 200
            assert (await s.get(f"/jobs/{job_id}/events", token=API)).status == 200
            assert (await s.get("/jobs")).status == 401
            assert (await s.get("/ui/jobs", token=API)).status == 200
            assert (await s.get(f"/ui/jobs/{job_id}", token=API)).status == 200
            assert (await s.get("/ui/agents", token=VIEWER)).status == 200
            # A viewer token, as a bearer token or as a session, opens no API route.
            session = await s.session(VIEWER)
            for path in ("/jobs", f"/jobs/{job_id}", "/agents"):
                assert (await s.get(path, token=VIEWER)).status == 401
                assert (await s.get(path, session=session)).status == 401
            # Only the pages' own routes skip the API's auth: not a path that merely starts with /ui/.
            for path in ("/ui/..%2Fjobs", "/ui/%2e%2e/jobs", "/ui/nope"):
                answer = await s.get(path)
                assert answer.status in (401, 404) and "jobs" not in await answer.text(), path

    run(scenario())


@pytest.mark.fast
def test_every_answer_under_ui_carries_the_security_headers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            job_id = s.job()
            session = await s.session()
            answers = [
                await s.get("/ui/login"),
                await s.get("/ui/jobs"),  # 303
                await s.login("wrong"),  # 401
                await s.login(VIEWER),  # 303 with the cookie
                await s.get("/ui/jobs", session=session),
                await s.get(f"/ui/jobs/{job_id}", session=session),
                await s.get("/ui/agents", session=session),
                await s.get("/ui/jobs/no-such-job", session=session),  # 404
                await s.get("/ui/jobs?status=BOGUS", session=session),  # 400
                await s.client.put("/ui/jobs", headers={"Authorization": f"Bearer {API}"}),  # 405: JSON
            ]
            assert [a.status for a in answers] == [200, 303, 401, 303, 200, 200, 200, 404, 400, 405]
            for answer in answers:
                for name, value in HEADERS.items():
                    assert answer.headers.get(name) == value, (answer.status, name)
            assert HEADERS["Content-Security-Policy"].startswith("default-src 'none'")
            assert "script-src" not in HEADERS["Content-Security-Policy"]  # default-src 'none' covers it
            assert "Content-Security-Policy" not in (await s.get("/jobs", token=API)).headers

    run(scenario())


@pytest.mark.fast
def test_a_running_job_page_refreshes_until_the_job_ends_and_links_to_the_task(tmp_path: Path) -> None:
    async def scenario(api_version: str) -> tuple[str, str]:
        async with stand(tmp_path / api_version, api_version=api_version) as s:
            job_id = s.job(task_id="t/1 #x")
            s.db.mark_running(job_id, source="test")
            running = await (await s.get(f"/ui/jobs/{job_id}", token=API)).text()
            s.db.finish(job_id, status=JobStatus.SUCCEEDED, rc=0, reason="exited 0", source="agent")
            ended = await (await s.get(f"/ui/jobs/{job_id}", token=API)).text()
        assert '<meta http-equiv="refresh" content="2">' in running
        assert "refresh" not in ended.replace("reloads", "")
        assert running.index("QUEUED -&gt; RUNNING") > 0
        assert ended.index("QUEUED -&gt; RUNNING") < ended.index("RUNNING -&gt; SUCCEEDED")
        assert "No output: agent agent&lt;b&gt;1&lt;/b&gt;" in ended  # nothing listens at its URL
        return running, ended

    for version in ("v2", "v1"):
        (tmp_path / version).mkdir()
    _, v2 = run(scenario("v2"))
    assert 'href="http://airflow.example:8080/base/dags/dag/runs/run%201%2F2/tasks/t%2F1%20%23x"' in v2
    _, v1 = run(scenario("v1"))
    link = "http://airflow.example:8080/base/dags/dag/grid?dag_run_id=run%201%2F2&amp;task_id=t%2F1%20%23x"
    assert f'href="{link}"' in v1


@pytest.mark.fast
def test_the_task_link_has_airflow_3_and_airflow_2_forms() -> None:
    mapped = TaskInstanceKey(
        dag_id="d/x", task_id="t", run_id="manual__2024-01-01T00:00:00+00:00", map_index=3
    )
    plain = TaskInstanceKey(dag_id="d", task_id="t", run_id="r", map_index=-1)
    base = "https://user:secret@airflow.example/"
    assert airflow_task_url(base, "v2", plain) == "https://airflow.example/dags/d/runs/r/tasks/t"
    assert airflow_task_url(base, "v2", mapped) == (
        "https://airflow.example/dags/d%2Fx/runs/manual__2024-01-01T00%3A00%3A00%2B00%3A00/tasks/t/mapped/3"
    )
    assert airflow_task_url(base, "v1", plain) == "https://airflow.example/dags/d/grid?dag_run_id=r&task_id=t"
    assert airflow_task_url("http://a:8080", "v1", mapped) == (
        "http://a:8080/dags/d%2Fx/grid?dag_run_id=manual__2024-01-01T00%3A00%3A00%2B00%3A00&task_id=t&map_index=3"
    )


@pytest.mark.fast
def test_the_jobs_page_shows_the_newest_first_and_filters(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            ids = [s.job(task_id=f"task{i}") for i in range(3)]
            other = s.job(dag_id="other")
            s.db.finish(ids[1], status=JobStatus.FAILED, rc=None, reason="gone", source="test")
            listing = await (await s.get("/ui/jobs", token=API)).text()
            assert [listing.index(j) for j in (other, ids[2], ids[1], ids[0])] == sorted(
                listing.index(j) for j in (other, ids[2], ids[1], ids[0])
            )
            failed = await (await s.get("/ui/jobs?status=FAILED&dag_id=&run_id=", token=API)).text()
            assert ids[1] in failed and ids[0] not in failed and other not in failed
            by_dag = await (await s.get("/ui/jobs?dag_id=other", token=API)).text()
            assert other in by_dag and ids[0] not in by_dag
            assert 'value="other"' in by_dag  # the form shows the filter applied
            for query in (
                "status=BOGUS",
                "status=FAILED&status=QUEUED",
                "dag_id=a%00b",
                "run_id=" + "r" * 251,
            ):
                answer = await s.get(f"/ui/jobs?{query}", token=API)
                assert answer.status == 400 and answer.content_type == "text/html", query
            # The API keeps its order: oldest first.
            api = await (await s.get("/jobs", token=API)).json()
            assert [j["job_id"] for j in api["jobs"]] == [*ids, other]

    run(scenario())


@pytest.mark.fast
def test_the_pages_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            job_id = s.job()
            s.db.mark_running(job_id, source="test")

            def state() -> Any:
                return [(j.job_id, j.status, j.rc, j.updated_at) for j in s.db.search()], s.db.events(job_id)

            before = state()
            session = await s.session()
            for path in ("/ui/jobs", f"/ui/jobs/{job_id}", "/ui/agents", "/ui/login"):
                assert (await s.get(path, session=session)).status == 200
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                for path in ("/ui/jobs", f"/ui/jobs/{job_id}", "/ui/agents"):
                    for auth in ({"Cookie": f"{COOKIE}={session}"}, {"Authorization": f"Bearer {API}"}, {}):
                        answer = await s.client.request(method, path, headers=auth)
                        assert answer.status == 405, (method, path, auth)
            assert state() == before

    run(scenario())


@pytest.mark.fast
def test_a_session_ends_at_logout_and_when_its_token_is_removed(tmp_path: Path) -> None:
    viewers = tmp_path / "viewers"
    viewers.write_text(f"{VIEWER}\nviewer-two\n")
    secret = Secret((VIEWER, "viewer-two"), what="viewers", file=viewers, parse=token_list)

    async def scenario() -> None:
        async with stand(tmp_path, viewer=secret) as s:
            first, second = await s.session(VIEWER), await s.session("viewer-two")
            # Logging in again replaces the session the browser had: its id is never reused.
            again = await s.client.post(
                "/ui/login",
                data={"token": VIEWER},
                headers={"Cookie": f"{COOKIE}={first}"},
                allow_redirects=False,
            )
            assert (await s.get("/ui/jobs", session=first)).status == 303
            first = again.cookies[COOKIE].value
            assert (await s.get("/ui/jobs", session=first)).status == 200
            logout = await s.client.post(
                "/ui/logout", headers={"Cookie": f"{COOKIE}={first}"}, allow_redirects=False
            )
            assert (logout.status, logout.headers["Location"]) == (303, "/ui/login")
            assert (
                'agentic_session=""' in logout.headers["Set-Cookie"]
                and "Max-Age=0" in logout.headers["Set-Cookie"]
            )
            assert (await s.get("/ui/jobs", session=first)).status == 303
            assert (await s.get("/ui/jobs", session=second)).status == 200
            viewers.write_text(f"{VIEWER}\n")  # viewer-two is rotated out
            assert secret.refresh(force=True)
            assert (await s.get("/ui/jobs", session=second)).status == 303
            assert (await s.login("viewer-two")).status == 401

    run(scenario())


@pytest.mark.fast
def test_sessions_expire_and_stay_bounded() -> None:
    now = [0.0]
    sessions = Sessions(lifetime=100, limit=3, clock=lambda: now[0])
    first = sessions.open(b"t")
    assert sessions.token(first) == b"t" and sessions.token("unknown") is None
    now[0] = 99.9
    assert sessions.token(first) == b"t"
    now[0] = 100.0
    assert sessions.token(first) is None
    opened = [sessions.open(b"t") for _ in range(5)]
    assert len(sessions) == 3  # the expired one purged, the two oldest pushed out
    assert [sessions.token(s) for s in opened] == [None, None, b"t", b"t", b"t"]


@pytest.mark.fast
def test_logins_are_rate_limited_like_the_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path, limiter=RateLimiter(rate=0.01, burst=2)) as s:
            # Guesses count against the address, as the API's unauthenticated requests do.
            assert [(await s.login(f"guess-{i}")).status for i in range(2)] == [401, 401]
            limited = await s.login("guess-3")
            assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
            assert "Set-Cookie" not in limited.headers and "guess-3" not in await limited.text()
            assert (await s.get("/jobs")).status == 429  # the API's bucket for this address: the same one
            assert (await s.get("/ui/jobs", token="guess-4")).status == 429
            # A right token has a bucket of its own, as on the API.
            assert (await s.login(VIEWER)).status == 303

    run(scenario())


@pytest.mark.fast
def test_bad_login_forms_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stand(tmp_path) as s:
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            for body, status in (
                (b"token=%ff%fe", 400),
                (b"token=\xff", 400),
                (b"token=a%00b", 400),
                (b"&".join(b"f%d=1" % i for i in range(50)), 400),
                (b"token=" + b"x" * 20_000, 413),
                (b"", 400),  # no token field: no login form
                (b'{"token": "x"}', 400),
                (b"token", 401),  # an empty token: a wrong one
                (b"token=&next=/ui/agents", 401),
            ):
                answer = await s.client.post("/ui/login", data=body, headers=form, allow_redirects=False)
                assert answer.status == status, body[:40]
                assert "Set-Cookie" not in answer.headers and answer.content_type == "text/html"
            assert (await s.get("/healthz")).status == 200

    run(scenario())


@pytest.mark.fast
def test_a_viewer_token_is_optional(tmp_path: Path) -> None:
    config = parse_config({"router_db": {"url": f"sqlite:///{tmp_path / 'r.db'}"}}, {})
    env = {"AIRFLOW_PASSWORD": "pw", "AGENTIC_SIDECAR_TOKEN": API}
    assert load_secrets(config, env).viewer_tokens is None
    assert load_secrets(config, env | {"AGENTIC_VIEWER_TOKEN": " "}).viewer_tokens is None
    viewers = load_secrets(config, env | {"AGENTIC_VIEWER_TOKEN": "a,b"}).viewer_tokens
    assert viewers is not None and viewers.current() == ("a", "b") and "a" not in repr(viewers)
    missing = parse_config({"http": {"viewer_token_file": str(tmp_path / "nope")}}, {})
    with pytest.raises(Exception, match=r"viewer_token_file .*nope: cannot read"):
        load_secrets(missing, env)


# --------------------------------------------------------------------------------- a real browser


@pytest.fixture
def airflow() -> Iterator[ServedAirflow]:
    served = ServedAirflow()
    for task in ("quick", "stopped"):
        served.standin.add("pages", "r", task, -1, state="deferred", try_number=1)
    served.start()
    yield served
    served.stop()


def submit(client: httpx.Client, task: str, command: str) -> str:
    body = {"command": command, "agent_id": "agent-1", "dag_id": "pages", "task_id": task, "run_id": "r"}
    answer = client.post("/jobs", json={**body, "try_number": 1})
    assert answer.status_code == 201 and answer.json()["status"] == "RUNNING", answer.text
    return str(answer.json()["job_id"])


def test_a_person_logs_in_and_watches_jobs_run_end_and_stop_in_chromium(
    tmp_path: Path, airflow: ServedAirflow
) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("chromium is missing: run scripts/ensure-tools (scripts/test does)")
    with (
        AgentProcess(tmp_path / "agent", agent_id="agent-1") as agent,
        SidecarProcess(
            workdir=tmp_path / "sidecar",
            airflow_url=airflow.url,
            airflow_password="unused",
            agents=[AgentRef("agent-1", agent.url, agent.token, labels=["default"])],
            api_version="v2",
            interval_seconds=0.3,
            viewer_token=VIEWER,
        ) as sidecar,
        sidecar.client() as api,
    ):
        stopped = submit(api, "stopped", "echo waiting for work; sleep 600")
        shot = asyncio.run(watch(sidecar, api, airflow, stopped, tmp_path / "browser"))
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    (tmp_path / "job-page.png").write_bytes(shot)
    if os.environ.get("AGENTIC_REFRESH_SCREENSHOT") == "1":
        (ROOT / "docs" / "job-page.png").write_bytes(shot)


async def watch(
    sidecar: SidecarProcess, api: httpx.Client, airflow: ServedAirflow, stopped: str, workdir: Path
) -> bytes:
    """The person's visit; returns the screenshot of the job that ran to its end."""
    async with chromium(workdir) as page:
        # No session: the job's page sends to the login form, which keeps where to return.
        await page.navigate(f"{sidecar.url}/ui/jobs/{stopped}")
        assert await page.url() == f"{sidecar.url}/ui/login?next=%2Fui%2Fjobs%2F{stopped}"
        await page.fill_and_submit("token", "not-the-viewer-token")
        assert "Wrong token." in await page.text() and await page.cookies() == []
        await page.fill_and_submit("token", VIEWER)
        assert await page.url() == f"{sidecar.url}/ui/jobs/{stopped}"
        (cookie,) = await page.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
            COOKIE, True, "Strict", "/ui",
        )  # fmt: skip
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

        # A running job: its page shows the timeline so far and reloads itself until the job ends.
        quick = submit(
            api, "quick", "echo 'fetching <input>'; sleep 1; echo 'processed 3 files'; sleep 2; echo done"
        )
        await page.navigate(f"{sidecar.url}/ui/jobs/{quick}")
        text = await page.text()
        assert "RUNNING" in text and "QUEUED -> RUNNING" in text and "-> SUCCEEDED" not in text, text
        assert await page.evaluate("!!document.querySelector('meta[http-equiv=refresh]')")
        link = await page.evaluate("document.querySelector('a[rel~=noreferrer]').href")
        assert link == f"{airflow.url}/dags/pages/runs/r/tasks/quick"
        started = time.monotonic()
        text = await page.wait_text(lambda t: "RUNNING -> SUCCEEDED" in t, timeout=15, what="the job's end")
        assert time.monotonic() - started >= 1  # seen by the page's own reloads: nothing navigated
        assert "processed 3 files" in text and "fetching <input>" in text
        assert not await page.evaluate("!!document.querySelector('meta[http-equiv=refresh]')")
        shot = await page.screenshot()

        # A job stopped because its task was marked failed in Airflow.
        airflow.mark(("pages", "r", "stopped", -1), "failed")

        def stop_recorded() -> bool:
            return bool(api.get(f"/jobs/{stopped}").json()["status"] == "FAILED")

        await asyncio.to_thread(wait_until, stop_recorded, timeout=15, what="the stop")
        await page.navigate(f"{sidecar.url}/ui/jobs/{stopped}")
        text = await page.text()
        assert "RUNNING -> STOPPING" in text and "STOPPING -> FAILED" in text, text
        assert re.search(r"reason\s+.*failed", text), text

        await page.navigate(f"{sidecar.url}/ui/agents")
        assert re.search(r"agent-1\s+" + re.escape(sidecar.agents[0].url), await page.text())

        # Logging out ends the session: the next page asks for a login again.
        await page.click("Log out")
        assert await page.url() == f"{sidecar.url}/ui/login" and await page.cookies() == []
        await page.navigate(f"{sidecar.url}/ui/agents")
        assert await page.url() == f"{sidecar.url}/ui/login?next=%2Fui%2Fagents"
        assert "Log in" in await page.text()
    return shot
