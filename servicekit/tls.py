"""TLS for the services' HTTP servers: one context builder for the agent and the sidecar."""

from __future__ import annotations

import os
import ssl


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM files; ``ValueError`` names the key and the problem."""
    for key, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"{key}: cannot read {os.fspath(path)}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls_cert_file, tls_key_file: {os.fspath(cert_file)} and {os.fspath(key_file)} are not a PEM "
            f"certificate and its matching unencrypted private key ({exc.reason or exc})"
        ) from None
    return context
