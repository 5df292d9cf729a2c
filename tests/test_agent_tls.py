"""An agent serving HTTPS, and AgentClient verifying its certificate against a CA bundle."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from agent_api.client import AgentClient, AgentUnavailable, JobNotFound, RunPayload
from harness.agent import AgentProcess
from tests.certs import CertificateAuthority, make_ca

TOKEN = "tls-test-token-4242"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"), "Agent Test CA")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("agent-tls")
    server = ca.issue(root / "server", hosts=["127.0.0.1", "localhost"])
    with AgentProcess(
        root / "home",
        token=TOKEN,
        tls_cert_file=server.cert_file,
        tls_key_file=server.key_file,
        ca_file=ca.cert_file,
    ) as proc:
        yield proc


def test_the_agent_serves_https_to_a_client_that_trusts_its_ca(
    agent: AgentProcess, ca: CertificateAuthority
) -> None:
    assert agent.url.startswith("https://")
    job_id = f"tls-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with AgentClient(agent.url, TOKEN, ca_file=str(ca.cert_file)) as client:
            assert (await client.health())["agent_id"] == "test-agent"
            await client.run(job_id, RunPayload(command="echo over tls; exec sleep 300"))
            while (await client.log(job_id)).data != b"over tls\n":
                await asyncio.sleep(0.02)
            result = await client.stop(job_id, reason="tls test")
            assert (result.action, result.status, result.rc) == ("terminated", "FAILED", -15)

    asyncio.run(main())
    assert "listening on https://127.0.0.1" in agent.log_text()


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_a_client_that_does_not_trust_the_ca_fails_before_sending_the_token(
    agent: AgentProcess, tmp_path: Path, trust: str
) -> None:
    ca_file = None if trust == "system CAs" else make_ca(tmp_path / "other", "Other CA").cert_file
    job_id = f"never-sent-{uuid.uuid4().hex[:8]}"

    async def main() -> AgentUnavailable:
        async with AgentClient(agent.url, TOKEN, ca_file=ca_file) as client:
            with pytest.raises(AgentUnavailable) as caught:
                await client.get(job_id)
            return caught.value

    error = asyncio.run(main())
    assert "certificate verify failed" in str(error)
    assert TOKEN not in str(error) and TOKEN not in repr(error)
    assert job_id not in agent.log_text()  # the handshake failed: no HTTP request reached the agent


def test_one_shared_session_serves_clients_with_different_trust(
    agent: AgentProcess, ca: CertificateAuthority
) -> None:
    """The reconciler shares one session across agents: the CA bundle must apply per request."""

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            trusting = AgentClient(agent.url, TOKEN, session=session, ca_file=ca.cert_file)
            default = AgentClient(agent.url, TOKEN, session=session)
            with pytest.raises(JobNotFound):  # authenticated and answered: the CA was used
                await trusting.get("no-such-job")
            with pytest.raises(AgentUnavailable, match="certificate verify failed"):
                await default.get("no-such-job")
            with pytest.raises(JobNotFound):  # and the pooled connection still works for the first
                await trusting.get("no-such-job")

    asyncio.run(main())


@pytest.mark.fast
def test_an_unloadable_ca_file_is_a_value_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for path in (tmp_path / "absent.pem", garbage):
        with pytest.raises(ValueError, match="ca_file"):
            AgentClient("https://127.0.0.1:1", TOKEN, ca_file=path)
