"""The wire format: answers round-trip exactly, and any JSON either parses or raises ProtocolError."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_api.protocol import (
    JOB_ID_PATTERN,
    AgentJobStatus,
    JobInfo,
    ProtocolError,
    StopAction,
    StopResult,
    parse_run_request,
    parse_stop_request,
)

pytestmark = pytest.mark.fast

job_ids = st.from_regex(JOB_ID_PATTERN, fullmatch=True)
times = st.none() | st.datetimes(timezones=st.just(UTC))
rcs = st.none() | st.integers(min_value=-64, max_value=255)
texts = st.none() | st.text().filter(lambda text: "\0" not in text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


@given(job_ids, st.sampled_from(AgentJobStatus), st.none() | st.integers(1, 2**22), rcs, times, times, texts)
def test_job_info_round_trips_through_json(
    job_id: str,
    status: AgentJobStatus,
    pid: int | None,
    rc: int | None,
    started: datetime | None,
    finished: datetime | None,
    reason: str | None,
) -> None:
    info = JobInfo(job_id, status, pid, rc, started, finished, reason)
    assert JobInfo.from_json(json.loads(json.dumps(info.to_json()))) == info


@given(st.booleans(), st.text(), st.sampled_from(AgentJobStatus), rcs, st.sampled_from(StopAction), texts)
def test_stop_result_round_trips_through_json(
    ok: bool, message: str, status: AgentJobStatus, rc: int | None, action: StopAction, reason: str | None
) -> None:
    result = StopResult(ok, message, status, rc, action, "SIGTERM", reason)
    assert StopResult.from_json(json.loads(json.dumps(result.to_json()))) == result


@given(json_values)
def test_any_json_either_parses_or_raises_protocol_error(value: object) -> None:
    for parse in (JobInfo.from_json, StopResult.from_json, parse_run_request, parse_stop_request):
        try:
            parse(value)
        except ProtocolError:
            pass


@given(st.text(max_size=140))
def test_job_ids_never_contain_path_separators_or_start_with_a_dot(text: str) -> None:
    if JOB_ID_PATTERN.fullmatch(text):
        assert "/" not in text and not text.startswith(".") and 1 <= len(text) <= 128
