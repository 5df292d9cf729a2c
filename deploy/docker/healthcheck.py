#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 if the service in this container answers its health URL with 200.

One image runs either service, so the URL comes from ``AGENTIC_HEALTH_URL``:

- sidecar (the image's default): ``http://127.0.0.1:8790/healthz``
- agent: set ``AGENTIC_HEALTH_URL=http://127.0.0.1:8791/health`` on the agent's container
  (``https://...`` when the agent serves TLS; ``AGENTIC_HEALTH_CA_FILE`` names the CA bundle to trust).

Standard library only, so it runs with any Python in the image. Prints one line saying why it failed.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8790/healthz"
TIMEOUT_SECONDS = 4.0  # below the Dockerfile's HEALTHCHECK --timeout


def check(url: str, ca_file: str | None = None) -> str | None:
    """``None`` when ``url`` answers 200, else the reason it is not healthy."""
    if not url.startswith(("http://", "https://")):
        return f"AGENTIC_HEALTH_URL must be http(s)://, got {url!r}"
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main() -> int:
    url = os.environ.get("AGENTIC_HEALTH_URL") or DEFAULT_URL
    problem = check(url, os.environ.get("AGENTIC_HEALTH_CA_FILE") or None)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
