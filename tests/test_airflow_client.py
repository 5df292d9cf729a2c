"""The Airflow client against answers recorded from real Airflow 3.3.2 and 3.1.8 (API v2) and 2.11.2
(API v1), and against an in-process stand-in of the list endpoint where a real Airflow cannot be made
to change between two pages of one read.

Normal runs replay the cassettes in ``tests/cassettes/airflow-<version>/`` offline. To re-record them
from freshly started real Airflows (about three minutes; needs the harness's Airflow venvs; ``-k``
with a version records only that one):

    AGENTIC_RECORD_CASSETTES=1 ./scripts/test tests/test_airflow_client.py

Credentials and tokens are scrubbed from the recordings.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import vcr
import yaml
from aiohttp import web

from reconciler.airflow.client import AirflowClient
from reconciler.airflow.task_instances import AirflowError, TaskInstance
from reconciler.core.targeted import DEFERRED_STATES, IN_FLIGHT_STATES

CASSETTES = Path(__file__).parent / "cassettes"
RECORDING = os.environ.get("AGENTIC_RECORD_CASSETTES") == "1"
VERSIONS = ["3.3.2", "3.1.8", "2.11.2"]
MANY = 150  # task instances of tests/cassettes/dags/recorded_many.py: more than one v2 list page
SINCE = datetime(2000, 1, 1, tzinfo=UTC)  # fixed, so replayed requests match the recorded ones
REPLAY_URL = "http://127.0.0.1:9"  # nothing listens: replay never touches the network
# Replaying starts nothing; recording starts a real Airflow of each version.
pytestmark = pytest.mark.airflow if RECORDING else pytest.mark.fast


def _scrub_request(request: Any) -> Any:
    if request.path.endswith("/auth/token"):
        request.body = b'{"username": "admin", "password": "<redacted>"}'
    return request


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    body = response.get("body", {}).get("string", b"")
    if b"access_token" in body:
        response["body"]["string"] = json.dumps(
            {"access_token": "<redacted>", "token_type": "bearer"}
        ).encode()
    return response


RECORDER = vcr.VCR(
    record_mode="all" if RECORDING else "none",
    match_on=["method", "path", "query"],
    filter_headers=["authorization", "cookie", "set-cookie"],
    before_record_request=_scrub_request,
    before_record_response=_scrub_response,
    decode_compressed_response=True,
)


@pytest.fixture(scope="module", params=VERSIONS)
def airflow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """``(version, base_url)``: a real Airflow with recorded data when recording, else a dead URL."""
    version = request.param
    if not RECORDING:
        yield version, REPLAY_URL
        return
    from harness.airflow import AirflowServer

    server = AirflowServer(
        home=tmp_path_factory.mktemp(f"airflow-{version}"), dags_folder=CASSETTES / "dags", version=version
    )
    try:
        server.start()
        api = server.api()
        api.wait_for_dag("recorded")
        api.trigger("recorded", "rec")
        api.wait_for_state("recorded", "rec", "sleeper", {"running"}, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the harness reads unmapped tasks only
            page = api.http.get("/dags/recorded/dagRuns/rec/taskInstances/mapped/listMapped").json()
            if [ti["state"] for ti in page.get("task_instances", [])] == ["running", "running"]:
                break
            time.sleep(0.3)
        else:
            raise TimeoutError("mapped task instances not running")
        api.wait_for_dag("recorded_many")
        api.trigger("recorded_many", "many")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if api.http.get("/dags/recorded_many/dagRuns/many").json()["state"] == "success":
                break
            time.sleep(0.3)
        else:
            raise TimeoutError("recorded_many did not finish")
        yield version, server.url
    finally:
        server.stop()


@contextmanager
def cassette(version: str, name: str, *, match_body: bool = False) -> Iterator[Any]:
    """A cassette of one version; ``match_body`` for POSTs told apart only by their bodies."""
    matching = {"match_on": ["method", "path", "query", "body"]} if match_body else {}
    with RECORDER.use_cassette(
        str(CASSETTES / f"airflow-{version}" / f"{name}.yaml"), **matching
    ) as recorded:
        yield recorded


def client(url: str, password: str = "admin") -> AirflowClient:
    return AirflowClient(url, api_version="auto", username="admin", password=password, timeout=30)


def test_reads_list_and_direct_answers(airflow: tuple[str, str]) -> None:
    version, url = airflow

    async def scenario() -> dict[str, Any]:
        reader = client(url)
        try:
            with cassette(version, "reads"):
                return {
                    "version": await reader.api_version(),
                    "changed": await reader.changed_since(SINCE),
                    "batch": await reader.list_task_instances(
                        dag_ids=["recorded"], run_ids=["rec"], task_ids=["sleeper", "mapped"]
                    ),
                    "sleeper": await reader.get_task_instance(
                        dag_id="recorded", run_id="rec", task_id="sleeper", map_index=-1
                    ),
                    "mapped_1": await reader.get_task_instance(
                        dag_id="recorded", run_id="rec", task_id="mapped", map_index=1
                    ),
                    "absent_run": await reader.get_task_instance(
                        dag_id="recorded", run_id="no_such_run", task_id="sleeper", map_index=-1
                    ),
                    "absent_task": await reader.get_task_instance(
                        dag_id="recorded", run_id="rec", task_id="no_such_task", map_index=-1
                    ),
                }
        finally:
            await reader.close()

    seen = asyncio.run(scenario())
    assert seen["version"] == ("v2" if version.startswith("3.") else "v1")
    keys = {(ti.task_id, ti.map_index) for ti in seen["batch"]}
    assert keys == {("sleeper", -1), ("mapped", 0), ("mapped", 1)}
    assert {(ti.task_id, ti.map_index) for ti in seen["changed"]} >= keys
    for ti in seen["batch"]:
        assert (ti.dag_id, ti.run_id, ti.state, ti.try_number) == ("recorded", "rec", "running", 1)
    assert seen["sleeper"].state == "running" and seen["sleeper"].end_date is None
    assert seen["mapped_1"].map_index == 1
    assert seen["absent_run"] is None and seen["absent_task"] is None


def test_targeted_reads_filter_by_state_and_count_without_rows(airflow: tuple[str, str]) -> None:
    """The default read's two requests, as each Airflow answers them: rows in the in-flight states
    (no state included: null on v2, "none" on v1) and a count of the deferred ones."""
    version, url = airflow
    if RECORDING:
        from harness.airflow import AirflowAPI

        AirflowAPI(url, version=version).wait_for_state(
            "recorded", "rec", "parked", {"deferred"}, timeout=120
        )
    ids = {
        "dag_ids": ["recorded"],
        "run_ids": ["rec"],
        "task_ids": ["sleeper", "mapped", "waiting", "parked"],
    }

    async def scenario() -> tuple[list[TaskInstance], list[int]]:
        reader = client(url)
        try:
            with cassette(version, "targeted", match_body=True) as recorded:
                in_flight = [
                    ti
                    async for page in reader.task_instance_pages(**ids, states=IN_FLIGHT_STATES)
                    for ti in page
                ]
                counts = [
                    await reader.count_task_instances(**ids, states=states)
                    for states in (DEFERRED_STATES, [None], ["running"], ["failed", "success"])
                ]
                bodies = [
                    r.body if isinstance(r.body, dict) else json.loads(r.body)
                    for r in recorded.requests
                    if r.path.endswith("/list")
                ]
        finally:
            await reader.close()
        assert [b.get("page_limit") for b in bodies] == [1000] + [0 if version.startswith("3.") else 1] * 4
        return in_flight, counts

    in_flight, counts = asyncio.run(scenario())
    assert {(t.task_id, t.map_index, t.state) for t in in_flight} == {
        ("sleeper", -1, "running"),
        ("mapped", 0, "running"),
        ("mapped", 1, "running"),
        ("waiting", -1, None),
    }
    assert counts == [1, 1, 3, 0]  # deferred, no state, running, finished


def test_mapped_task_read_without_its_index_is_an_error_not_absent(airflow: tuple[str, str]) -> None:
    version, url = airflow

    async def scenario() -> None:
        reader = client(url)
        try:
            with cassette(version, "mapped_without_index"):
                await reader.get_task_instance(
                    dag_id="recorded", run_id="rec", task_id="mapped", map_index=-1
                )
        finally:
            await reader.close()

    # Both versions answer 404 with the detail "Task instance is mapped, ...": that 404 must not read
    # as "absent", or a job would be stopped for asking the wrong question.
    with pytest.raises(AirflowError, match="mapped"):
        asyncio.run(scenario())


def test_marked_failed_reads_as_failed_with_an_end_date(airflow: tuple[str, str]) -> None:
    version, url = airflow
    if RECORDING:
        from harness.airflow import AirflowAPI

        AirflowAPI(url, version=version).mark("recorded", "rec", "sleeper", "failed")

    async def scenario() -> Any:
        reader = client(url)
        try:
            with cassette(version, "marked_failed"):
                return await reader.get_task_instance(
                    dag_id="recorded", run_id="rec", task_id="sleeper", map_index=-1
                )
        finally:
            await reader.close()

    ti = asyncio.run(scenario())
    assert ti.state == "failed" and ti.try_number == 1
    assert ti.end_date is not None and ti.end_date.tzinfo is not None


def test_bad_credentials_are_an_error_that_names_no_secret(airflow: tuple[str, str]) -> None:
    version, url = airflow

    async def scenario() -> None:
        reader = client(url, password="wrong-password")
        try:
            with cassette(version, "bad_credentials"):
                await reader.ping()
        finally:
            await reader.close()

    with pytest.raises(AirflowError) as raised:
        asyncio.run(scenario())
    assert ("HTTP 401" if version.startswith("3.") else "HTTP 403") in str(raised.value)
    assert "wrong-password" not in str(raised.value)


def list_queries(recorded: Any) -> list[dict[str, str]]:
    """The query of every list request in a cassette, in order: what the client asked (``cursor=``
    included, which vcrpy's own view of a query leaves out)."""
    return [
        dict(parse_qsl(urlsplit(r.uri).query, keep_blank_values=True))
        for r in recorded.requests
        if r.path.endswith("/dagRuns/~/taskInstances")
    ]


def test_incremental_reads_page_through_every_changed_task_instance(airflow: tuple[str, str]) -> None:
    version, url = airflow

    async def scenario() -> tuple[list[list[TaskInstance]], list[dict[str, str]]]:
        reader = client(url)
        try:
            with cassette(version, "many_changed") as recorded:
                # Twice with one client: the second read uses the paging the first one found.
                reads = [await reader.changed_since(SINCE), await reader.changed_since(SINCE)]
                assert RECORDING or recorded.all_played
                return reads, list_queries(recorded)
        finally:
            await reader.close()

    reads, queries = asyncio.run(scenario())
    for read in reads:
        assert {ti.task_id for ti in read if ti.dag_id == "recorded_many"} == {
            f"empty_{n:03d}" for n in range(MANY)
        }
        assert len({ti.key for ti in read}) == len(read)  # each row once
    if version == "3.3.2":
        # Keyset paging: every answer carries next_cursor, and each read follows it past page one.
        assert [q.get("cursor") == "" for q in queries] == [True, False, True, False]
        assert not any("offset" in q for q in queries)
    elif version == "3.1.8":
        # No next_cursor in the answer: the cursor was ignored, and the first read learnt to page
        # by offset, ordered by id, each page starting on the last row of the one before.
        assert [(q.get("cursor"), q.get("offset")) for q in queries] == [
            ("", None),
            (None, "99"),
            (None, "0"),
            (None, "99"),
        ]
        assert {q["order_by"] for q in queries} == {"id"}
    else:
        assert [q["offset"] for q in queries] == ["0", "0"]  # API v1: offset paging, 1000 rows a page
        assert not any("cursor" in q for q in queries)


def recorded_task_instance(version: str) -> dict[str, Any]:
    """One task instance exactly as a real Airflow of ``version`` answered it."""
    interactions = yaml.safe_load((CASSETTES / f"airflow-{version}" / "reads.yaml").read_text())
    for interaction in interactions["interactions"]:
        if interaction["request"]["uri"].endswith("/taskInstances/sleeper"):
            return dict(json.loads(interaction["response"]["body"]["string"]))
    raise LookupError(f"no recorded task instance for Airflow {version}")


def stand_in_id(n: int) -> str:
    """The stand-in's n-th id, shaped like a UUID7: ids made later sort after it."""
    return f"{n:08x}-0000-7000-8000-000000000000"


class ListStandIn:
    """Airflow 3's task-instance list endpoint, as it pages ``order_by=id``: by 3.1's rules (offset
    only, ``cursor`` ignored, no ``next_cursor`` in the answer) or, with ``keyset``, by 3.3's
    (``cursor`` honoured; ``next_cursor`` in every answer, null under offset paging).

    ``between_pages(n)`` runs before the n-th list answer: Airflow changing in the middle of a read.
    Every row is taken to be in the ``updated_at_gte`` window.
    """

    def __init__(self, rows: int, *, keyset: bool) -> None:
        self.keyset = keyset
        self.template = recorded_task_instance("3.3.2" if keyset else "3.1.8")
        self.rows: dict[str, tuple[str, int]] = {}  # id -> (task_id, try_number)
        self.created = 0
        for n in range(rows):
            self._insert(f"t{n:03d}", 1)
        self.queries: list[dict[str, str]] = []
        self.between_pages: Callable[[int], None] = lambda n: None

    def _insert(self, task_id: str, try_number: int) -> None:
        self.created += 1  # a UUID7 of a later moment: greater than every id before it
        self.rows[stand_in_id(self.created)] = (task_id, try_number)

    def _id(self, task_id: str) -> str:
        return next(ti_id for ti_id, (name, _) in self.rows.items() if name == task_id)

    def new_try(self, task_id: str) -> None:
        """What Airflow 3 does on a retry or a clear: the row moves to a new id."""
        _, try_number = self.rows.pop(self._id(task_id))
        self._insert(task_id, try_number + 1)

    def delete(self, task_id: str) -> None:
        del self.rows[self._id(task_id)]

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "stand-in", "token_type": "bearer"}, status=201)

    async def list_page(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.queries.append(query)
        self.between_pages(len(self.queries))
        ordered = sorted(self.rows)
        limit = min(int(query["limit"]), 100)
        body: dict[str, Any] = {"total_entries": len(ordered)}
        cursor = query.get("cursor")
        if self.keyset and cursor is not None:
            after = [ti_id for ti_id in ordered if ti_id > cursor]
            page = after[:limit]
            more = len(after) > limit
            body |= {"total_entries_limit": 50000, "next_cursor": page[-1] if more else None}
        else:
            offset = int(query.get("offset", "0"))
            page = ordered[offset : offset + limit]
            if self.keyset:
                body |= {"total_entries_limit": None, "next_cursor": None}
        if self.keyset:
            body["previous_cursor"] = None
        body["task_instances"] = [
            {**self.template, "id": ti_id, "task_id": self.rows[ti_id][0], "try_number": self.rows[ti_id][1]}
            for ti_id in page
        ]
        return web.json_response(body)

    @asynccontextmanager
    async def served(self) -> AsyncIterator[AirflowClient]:
        """A client of this stand-in, served on loopback for the duration."""
        app = web.Application()
        app.router.add_post("/auth/token", self.token)
        app.router.add_get("/api/v2/dags/~/dagRuns/~/taskInstances", self.list_page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader = AirflowClient(f"http://127.0.0.1:{port}", api_version="v2", username="admin", password="x")
        try:
            yield reader
        finally:
            await reader.close()
            await runner.cleanup()

    def read_queries(self) -> list[tuple[str | None, str | None]]:
        """``(cursor, offset)`` of the list requests so far; forgets them."""
        seen = [(q.get("cursor"), q.get("offset")) for q in self.queries]
        self.queries.clear()
        return seen


def latest_tries(read: list[TaskInstance]) -> dict[str, int]:
    """Task id -> try number, the later of two reads of one task winning (as in the loop)."""
    return {ti.task_id: ti.try_number for ti in read}


def test_offset_paging_misses_no_row_when_rows_before_the_offset_move_or_vanish_mid_read() -> None:
    standin = ListStandIn(350, keyset=False)

    def retries_and_a_deleted_run(request_number: int) -> None:
        if request_number == 3:  # between the second and the third page
            for task_id in ("t005", "t010", "t150"):
                standin.new_try(task_id)
            for task_id in ("t030", "t031"):
                standin.delete(task_id)

    standin.between_pages = retries_and_a_deleted_run

    async def scenario() -> list[TaskInstance]:
        async with standin.served() as reader:
            return await reader.changed_since(SINCE)

    read = asyncio.run(scenario())
    expected = {f"t{n:03d}": 1 for n in range(350)} | {"t005": 2, "t010": 2, "t150": 2}
    assert latest_tries(read) == expected  # the deleted rows were read before they went
    offsets = [int(offset) for _, offset in standin.read_queries()[1:] if offset is not None]
    assert offsets != sorted(offsets), "five rows left before the offset: the read must have stepped back"


def test_paging_mode_is_learnt_once_and_learnt_again_when_airflow_changes() -> None:
    standin = ListStandIn(250, keyset=False)
    everything = {f"t{n:03d}": 1 for n in range(250)}

    async def scenario() -> list[list[tuple[str | None, str | None]]]:
        seen = []
        async with standin.served() as reader:
            for keyset in (False, False, True, True, False):  # Airflow 3.1, upgraded, downgraded
                standin.keyset = keyset
                assert latest_tries(await reader.changed_since(SINCE)) == everything
                seen.append(standin.read_queries())
        return seen

    by_offset = [(None, "0"), (None, "99"), (None, "198")]
    by_cursor = [("", None), (stand_in_id(100), None), (stand_in_id(200), None)]
    first, remembered, upgraded, after_upgrade, downgraded = asyncio.run(scenario())
    assert first == [("", None), *by_offset[1:]]  # the cursor ignored: the answer is offset's page one
    assert remembered == by_offset
    assert upgraded == by_offset  # answers now carry next_cursor: this read ends by offset, ...
    assert after_upgrade == by_cursor  # ... and the next one by cursor
    assert downgraded == first


def test_a_read_that_meets_an_airflow_without_cursors_mid_way_still_reads_everything() -> None:
    standin = ListStandIn(250, keyset=True)

    def downgrade(request_number: int) -> None:
        if request_number == 2:
            standin.keyset = False

    standin.between_pages = downgrade

    async def scenario() -> list[TaskInstance]:
        async with standin.served() as reader:
            return await reader.changed_since(SINCE)

    assert latest_tries(asyncio.run(scenario())) == {f"t{n:03d}": 1 for n in range(250)}
    cursor_page, ignored_cursor, *offsets = standin.read_queries()
    assert cursor_page == ("", None) and ignored_cursor[0]  # the second page asked by cursor, in vain
    # What that answer was cannot be told mid-read (page one on a downgraded Airflow, page two on a
    # confused one): the read starts over by offset.
    assert offsets == [(None, "0"), (None, "99"), (None, "198")]
