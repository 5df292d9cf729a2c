"""The router API's wire module: what it accepts, what it refuses, and the bound each refusal names."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar_api.protocol import MAX_COMMAND_BYTES, MAX_INT, WireError, parse_submit, parse_update

pytestmark = pytest.mark.fast

BASE: dict[str, Any] = {"command": "true", "dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1}


def submit(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def test_a_minimal_submission_gets_the_defaults() -> None:
    request = parse_submit(submit())
    assert (request.map_index, request.agent_id, request.labels, request.ti_identity) == (-1, None, [], "")
    assert request.payload == {
        "command": "true",
        "cwd": None,
        "env": None,
        "run_as": None,
        "timeout_seconds": None,
    }


def test_json_numbers_that_are_whole_are_integers() -> None:
    """JSON has one number type: ``1.0`` is the integer 1 for every integer field (OpenAPI agrees)."""
    request = parse_submit(submit(try_number=2.0, map_index=0.0))
    assert (request.try_number, request.map_index) == (2, 0)
    assert isinstance(request.try_number, int)
    assert (
        parse_update(
            {"status": "failed", "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": 1.0}
        ).map_index
        == 1
    )


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"try_number": 1.5}, "'try_number' must be int"),
        ({"try_number": True}, "'try_number' must be int"),
        ({"try_number": -1}, "try_number 0 to"),
        ({"map_index": MAX_INT + 1}, "map_index must be -1 to"),
        ({"command": " "}, "command must be non-empty"),
        ({"command": "x" * (MAX_COMMAND_BYTES + 1)}, f"at most {MAX_COMMAND_BYTES} bytes"),
        ({"dag_id": ""}, "dag_id must be 1-250 characters"),
        ({"labels": ["a", 1]}, "labels must be a list of strings"),
        ({"env": {"A": 1}}, "env must map strings to strings"),
        ({"timeout_seconds": 0}, "timeout_seconds must be a positive number"),
        ({"timeout_seconds": float("inf")}, "timeout_seconds must be a positive number"),
        ({"ti_identity": "x" * 65}, "ti_identity must be at most 64"),
    ],
)
def test_a_bad_field_is_refused_by_name(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(WireError, match=words):
        parse_submit(submit(**changes))


def test_an_update_names_its_job_by_id_or_by_task() -> None:
    by_id = parse_update({"status": "failed", "job_id": "j-1", "dag_id": "ignored"})
    assert (by_id.job_id, by_id.dag_id) == ("j-1", "")
    by_task = parse_update({"status": "failed", "dag_id": "d", "task_id": "t", "run_id": "r"})
    assert (by_task.job_id, by_task.dag_id, by_task.map_index) == (None, "d", -1)
    with pytest.raises(WireError, match="missing field 'dag_id'"):
        parse_update({"status": "failed"})
    with pytest.raises(WireError, match="job_id must match"):
        parse_update({"status": "failed", "job_id": "../x"})
    with pytest.raises(WireError, match="body must be a JSON object"):
        parse_update([])
