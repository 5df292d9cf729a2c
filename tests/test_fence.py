"""The fence's decision (agent/fence.py) with injected clocks, and the ``at_most_once`` flag on its way
from the task to the agent's record: the sidecar's submission, the agent's payload, ``state.json``, and
the agent's settings that must agree. No process, no waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.fence import FENCE_REASON, Fence, check_period
from agent.state import StateError, StoredJob
from agent_api.protocol import AgentJobStatus, ProtocolError, RunPayload, parse_run_payload
from sidecar_api.protocol import WireError, parse_submit

pytestmark = pytest.mark.fast

AFTER = 60.0
START_WALL = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clocks:
    """A boot clock and a wall clock that a test moves by hand."""

    def __init__(self) -> None:
        self.boot = 1000.0
        self.wall_at = START_WALL

    def __call__(self) -> float:
        return self.boot

    def wall(self) -> datetime:
        return self.wall_at

    def advance(self, seconds: float) -> None:
        self.boot += seconds
        self.wall_at += timedelta(seconds=seconds)


def fence(after: float = AFTER) -> tuple[Fence, Clocks]:
    clocks = Clocks()
    return Fence(after, clock=clocks, wall=clocks.wall), clocks


def test_heartbeats_within_fence_after_never_cut_the_agent_off() -> None:
    decision, clocks = fence()
    for _ in range(1000):
        clocks.advance(AFTER - 1)
        assert decision.cut_off() is None
        decision.heard()


def test_silence_past_fence_after_cuts_off_until_contact_returns() -> None:
    decision, clocks = fence()
    decision.heard()
    clocks.advance(AFTER)
    assert decision.cut_off() is None  # exactly the limit: not yet
    clocks.advance(0.1)
    silence = decision.cut_off()
    assert silence is not None and silence.since == 1000.0 and silence.lasted == pytest.approx(AFTER + 0.1)
    decision.carried_out(silence)
    clocks.advance(5)
    still = decision.cut_off()  # still cut off: new at_most_once jobs are refused, survivors stopped again
    assert still is not None and still.since == 1000.0 and still.lasted == pytest.approx(AFTER + 5.1)
    decision.heard()
    assert decision.cut_off() is None  # fenced once, for this silence: contact ends it


def test_contact_counts_from_the_start_so_adopted_jobs_are_fenced_neither_at_once_nor_never() -> None:
    decision, clocks = fence()
    assert decision.cut_off() is None  # a restarted agent does not fence what it adopted at once
    clocks.advance(AFTER + 1)
    silence = decision.cut_off()
    assert silence is not None and silence.since == 1000.0  # nor never: its start counts as contact


def test_a_heartbeat_counts_as_of_its_sending_not_its_answer() -> None:
    """The sidecar records a heartbeat between its sending and its answer: the sending is the time that
    is never later than the sidecar's own record, from which its lost_after_seconds counts."""
    decision, clocks = fence()
    sent = decision.now()
    clocks.advance(AFTER + 5)  # a slow answer, accepted at last
    decision.heard(sent)
    silence = decision.cut_off()
    assert silence is not None and silence.since == sent


def test_a_contact_ending_a_silence_nobody_saw_still_fences() -> None:
    """The agent paused (SIGSTOP) or starved past fence_after: on resume its first heartbeat may be
    accepted before it looks, yet the silence happened and the sidecar may have given up: fence."""
    decision, clocks = fence()
    clocks.advance(AFTER + 30)  # paused: no check ran
    decision.heard()  # the first heartbeat after the resume, accepted
    silence = decision.cut_off()
    assert silence is not None and silence.since == 1000.0 and silence.lasted == pytest.approx(AFTER + 30)
    assert silence.since_wall == START_WALL
    decision.carried_out(silence)
    assert decision.cut_off() is None  # carried out once; contact is fresh


def test_a_silence_already_fenced_is_not_fenced_again_when_contact_returns() -> None:
    decision, clocks = fence()
    clocks.advance(AFTER + 1)
    silence = decision.cut_off()
    assert silence is not None
    decision.carried_out(silence)
    clocks.advance(AFTER)
    decision.heard()
    assert decision.cut_off() is None


def test_contacts_out_of_order_never_move_the_last_one_back() -> None:
    decision, clocks = fence()
    clocks.advance(10)
    decision.heard()
    decision.heard(decision.now() - 8)  # a heartbeat sent earlier, answered later
    clocks.advance(AFTER - 5)
    assert decision.cut_off() is None


def test_a_wall_clock_step_neither_fires_nor_delays_the_fence() -> None:
    decision, clocks = fence()
    clocks.wall_at += timedelta(hours=3)  # stepped forward
    clocks.advance(AFTER - 1)
    assert decision.cut_off() is None
    clocks.wall_at -= timedelta(days=2)  # stepped back
    clocks.advance(2)
    silence = decision.cut_off()
    assert silence is not None and silence.lasted == pytest.approx(AFTER + 1)


def test_the_reason_says_since_when_by_the_wall_clock() -> None:
    decision, clocks = fence()
    clocks.advance(AFTER + 2)
    silence = decision.cut_off()
    assert silence is not None
    assert silence.reason == (
        f"{FENCE_REASON} 2026-01-01T12:00:00+00:00 (62 s > [agent] fence_after_seconds 60)"
    )
    assert silence.reason.startswith("fenced: no contact with the sidecar since ")


def test_fence_after_zero_never_cuts_off() -> None:
    decision, clocks = fence(0)
    clocks.advance(10**6)
    decision.heard()
    assert decision.cut_off() is None and not decision.enabled


def test_the_check_period_is_a_tenth_of_the_fence_at_most_a_second() -> None:
    assert check_period(60) == 1.0 and check_period(3) == pytest.approx(0.3)


# ------------------------------------------------------------------------- the flag on its way


def test_the_agent_payload_takes_at_most_once_strictly_and_sends_it_only_when_true() -> None:
    assert parse_run_payload({"command": "true"}).at_most_once is False
    assert parse_run_payload({"command": "true", "at_most_once": True}).at_most_once is True
    for bad in (None, 1, "true"):
        with pytest.raises(ProtocolError, match=r"payload\.at_most_once"):
            parse_run_payload({"command": "true", "at_most_once": bad})
    assert "at_most_once" not in RunPayload(command="true").to_json()  # an older agent still takes it
    assert RunPayload(command="true", at_most_once=True).to_json()["at_most_once"] is True


def test_the_sidecar_passes_at_most_once_to_the_agent_only_when_asked() -> None:
    base = {"command": "true", "dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1}
    assert "at_most_once" not in parse_submit(base).payload
    assert "at_most_once" not in parse_submit({**base, "at_most_once": None}).payload
    assert "at_most_once" not in parse_submit({**base, "at_most_once": False}).payload
    payload = parse_submit({**base, "at_most_once": True}).payload
    assert parse_run_payload(payload).at_most_once is True
    with pytest.raises(WireError, match="at_most_once"):
        parse_submit({**base, "at_most_once": "yes"})


def test_the_job_record_keeps_at_most_once_across_a_restart() -> None:
    record = StoredJob("j", AgentJobStatus.RUNNING, boot_id="b", at_most_once=True)
    assert StoredJob.from_json(record.to_json()).at_most_once is True
    older = {k: v for k, v in record.to_json().items() if k != "at_most_once"}  # an older agent's file
    assert StoredJob.from_json(older).at_most_once is False
    with pytest.raises(StateError, match="at_most_once"):
        StoredJob.from_json({**record.to_json(), "at_most_once": "yes"})


def test_the_agent_refuses_a_fence_shorter_than_two_heartbeats_or_a_default_that_never_fires(
    tmp_path: Path,
) -> None:
    def load(lines: str) -> agent_config.AgentConfig:
        path = tmp_path / "agent.toml"
        path.write_text(f'[agent]\nhome = "{tmp_path / "home"}"\n{lines}', encoding="utf-8")
        return agent_config.load_config(path, environ={"AGENTIC_AGENT_TOKEN": "t"})

    with pytest.raises(agent_config.ConfigError) as short:
        load("heartbeat_seconds = 10.0\nfence_after_seconds = 20.0\n")
    assert "[agent] fence_after_seconds" in str(short.value) and "[agent] heartbeat_seconds" in str(
        short.value
    )
    assert "(here 20 and 10)" in str(short.value)
    assert load("heartbeat_seconds = 10.0\nfence_after_seconds = 20.5\n").fence_after_seconds == 20.5
    assert load("fence_after_seconds = 0\n").fence_after_seconds == 0
    with pytest.raises(agent_config.ConfigError, match=r"\[agent\] at_most_once_default needs"):
        load("fence_after_seconds = 0\nat_most_once_default = true\n")
    assert load("at_most_once_default = true\n").at_most_once_default is True
    defaults = load("")
    assert (defaults.fence_after_seconds, defaults.at_most_once_default) == (60.0, False)
