"""The sidecar's API guards, against the real process: token rotation (several tokens accepted, each
compared in constant time) and per-client rate limiting (429 with Retry-After; health and metrics
exempt). Airflow is deliberately unreachable here; it plays no part."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from harness.processes import free_port
from harness.sidecar import SidecarProcess
from servicekit.ratelimit import RateLimiter


def sidecar(workdir: Path, **kwargs: object) -> SidecarProcess:
    return SidecarProcess(
        workdir=workdir,
        airflow_url=f"http://127.0.0.1:{free_port()}",
        airflow_password="unused",
        agents=[],
        **kwargs,  # type: ignore[arg-type]
    )


def status_with(proc: SidecarProcess, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"{proc.url}/jobs", headers=headers, timeout=10).status_code


def test_old_and_new_tokens_are_both_accepted_and_a_removed_one_is_refused(tmp_path: Path) -> None:
    port = free_port()
    # Separators as an operator would write them: commas, spaces, newlines.
    with sidecar(
        tmp_path / "s", port=port, token="old-token", accepted_tokens=["old-token, new-token\nthird"]
    ) as proc:
        assert [status_with(proc, t) for t in ("old-token", "new-token", "third")] == [200, 200, 200]
        assert [
            status_with(proc, t) for t in ("other", "old-token,new-token", "old-token new-token", None)
        ] == [401] * 4
    # Rotation done: the old token is removed and the sidecar restarted.
    with sidecar(tmp_path / "s", port=port, token="new-token", accepted_tokens=["new-token"]) as proc:
        assert status_with(proc, "new-token") == 200
        assert status_with(proc, "old-token") == 401


def test_a_client_over_its_rate_gets_429_with_retry_after_then_is_served_again(tmp_path: Path) -> None:
    burst = 3
    with sidecar(
        tmp_path / "s",
        token="tok-a",
        accepted_tokens=["tok-a", "tok-b"],
        rate_limit_per_second=2.0,
        rate_limit_burst=burst,
    ) as proc:
        started = time.monotonic()
        answers = [status_with(proc, "tok-a") for _ in range(burst)]
        limited = httpx.get(f"{proc.url}/jobs", headers={"Authorization": "Bearer tok-a"}, timeout=10)
        assert answers == [200] * burst
        assert limited.status_code == 429, limited.text
        assert "rate limit" in limited.json()["error"]
        retry_after = limited.headers["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) >= 1

        # Another client (another token) has its own bucket; health and metrics are never limited.
        assert status_with(proc, "tok-b") == 200
        for path in ("/healthz", "/metrics", "/readyz") * 5:
            assert httpx.get(f"{proc.url}{path}", timeout=10).status_code != 429, path
        # Without a valid token the client is its address: guessing tokens is throttled too.
        anonymous = [status_with(proc, None) for _ in range(burst + 1)]
        assert anonymous[:burst] == [401] * burst and anonymous[burst] == 429

        time.sleep(int(retry_after))
        assert status_with(proc, "tok-a") == 200
        assert time.monotonic() - started < 10


@pytest.mark.fast
def test_the_bucket_refills_at_the_configured_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=0.5, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0, 0]
    assert limiter.acquire("a") == 2  # one token takes 2 s at 0.5/s
    assert limiter.acquire("b") == 0  # clients do not share a bucket
    now[0] += 1.0
    assert limiter.acquire("a") == 1  # half a token back: 1 s more, rounded up
    now[0] += 1.0
    assert limiter.acquire("a") == 0
    now[0] += 3600.0
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 2]  # refilled to the burst, no more


@pytest.mark.parametrize(("key", "value"), [("rate_limit_per_second", -1.0), ("rate_limit_burst", -1)])
@pytest.mark.fast
def test_negative_rate_settings_are_refused(key: str, value: float) -> None:
    from reconciler.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=rf"^\[http\] {key}:"):
        parse_config({"http": {key: value}}, {})
