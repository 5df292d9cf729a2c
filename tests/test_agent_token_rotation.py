"""Rotating the agent's token: old and new both work while both are configured; a removed one does not."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent_api.client import AgentClient, AgentRejected, JobNotFound
from harness.agent import AgentProcess

OLD = "old-token-aaaa1111"
NEW = "new-token-bbbb2222"


def answer_for(agent: AgentProcess, token: str) -> int:
    """The HTTP status the agent gives ``token`` for a job it does not know: 404 once authenticated."""

    async def main() -> int:
        async with AgentClient(agent.url, token) as client:
            try:
                await client.get("no-such-job")
            except JobNotFound:
                return 404
            except AgentRejected as exc:
                return exc.status
            raise AssertionError("an unknown job was found")

    return asyncio.run(main())


def test_both_tokens_work_during_a_rotation_and_a_removed_one_does_not(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with AgentProcess(home, token=NEW, accepted_tokens=[OLD, NEW]) as both:  # from the env, comma-separated
        assert (answer_for(both, OLD), answer_for(both, NEW), answer_for(both, "other-token")) == (
            404,
            404,
            401,
        )

    token_file = tmp_path / "tokens"
    token_file.write_text(f"{NEW}\n")  # the old token removed, from a token file this time
    with AgentProcess(home, token=NEW, token_file=token_file) as rotated:
        assert (answer_for(rotated, OLD), answer_for(rotated, NEW)) == (401, 404)
        assert OLD not in rotated.log_text() and NEW not in rotated.log_text()
