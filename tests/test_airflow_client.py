"""The Airflow client against answers recorded from real Airflow 3.3.2 (API v2) and 2.11.2 (API v1).

Normal runs replay the cassettes in ``tests/cassettes/airflow-<version>/`` offline. To re-record them
from freshly started real Airflows (about two minutes; needs the harness's Airflow venvs):

    AGENTIC_RECORD_CASSETTES=1 ./scripts/test tests/test_airflow_client.py

Credentials and tokens are scrubbed from the recordings.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import vcr

from reconciler.airflow import AirflowClient, AirflowError

CASSETTES = Path(__file__).parent / "cassettes"
RECORDING = os.environ.get("AGENTIC_RECORD_CASSETTES") == "1"
VERSIONS = ["3.3.2", "2.11.2"]
SINCE = datetime(2000, 1, 1, tzinfo=UTC)  # fixed, so replayed requests match the recorded ones
REPLAY_URL = "http://127.0.0.1:9"  # nothing listens: replay never touches the network


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
        yield version, server.url
    finally:
        server.stop()


@contextmanager
def cassette(version: str, name: str) -> Iterator[None]:
    with RECORDER.use_cassette(str(CASSETTES / f"airflow-{version}" / f"{name}.yaml")):
        yield


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
                    "sleeper": await reader.get_task_instance("recorded", "rec", "sleeper", -1),
                    "mapped_1": await reader.get_task_instance("recorded", "rec", "mapped", 1),
                    "absent_run": await reader.get_task_instance("recorded", "no_such_run", "sleeper", -1),
                    "absent_task": await reader.get_task_instance("recorded", "rec", "no_such_task", -1),
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


def test_mapped_task_read_without_its_index_is_an_error_not_absent(airflow: tuple[str, str]) -> None:
    version, url = airflow

    async def scenario() -> None:
        reader = client(url)
        try:
            with cassette(version, "mapped_without_index"):
                await reader.get_task_instance("recorded", "rec", "mapped", -1)
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
                return await reader.get_task_instance("recorded", "rec", "sleeper", -1)
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
