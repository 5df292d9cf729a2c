"""The HTTP conventions both services share (aiohttp): token auth, JSON errors, bounded JSON bodies.

So that the same bad request gets the same answer from the agent and from the sidecar:

- **Auth**: ``Authorization: Bearer <token>`` (the scheme in any case), or a service's extra header
  (the agent's ``X-Agent-Token``). Any configured token is accepted (rotation); every one is compared,
  each in constant time, so the time taken does not tell which matched. The tokens are asked of their
  :class:`~servicekit.credentials.Secret` at each request: a token file rotated while the service
  runs applies to the next request. Open paths (health, metrics) need none. A rate limiter, when
  given, counts every request, unauthenticated ones by address.
- **Errors**: every failure is ``{"error": "..."}`` with the status: 400 bad input, 401, 404, 405 (with
  ``Allow`` and the allowed methods named), 413 past the body limit, 429 (``Retry-After``), 500 for a
  bug (logged with its traceback, answered without one). A service maps its own exceptions to a status
  with ``known``; :class:`HttpError` carries one itself.
- **Bodies**: read up to a limit (413 past it, with or without ``Content-Length``), strict UTF-8, JSON,
  and text any store can keep: no NUL, no lone surrogate, in any string or key (:mod:`servicekit.text`).
- **Query strings past a bound** are refused in the same shape before any token is looked at
  (:func:`bounded_query`, which :func:`servicekit.serve.serving` installs): 400 for a query parameter
  given more than :data:`MAX_QUERY_VALUES` times. Requests aiohttp cannot parse (a path and query
  past :data:`MAX_TARGET_BYTES`, a header past :data:`MAX_HEADER_BYTES`, more than
  :data:`MAX_HEADERS` headers, a request line that is not HTTP) get a 400 in the same shape, which
  quotes nothing of the request, nor does the log line aiohttp writes (:mod:`servicekit.serve`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from servicekit.credentials import Secret
from servicekit.ratelimit import RateLimiter
from servicekit.slow_clients import BODY_SECONDS
from servicekit.text import text_problem

log = logging.getLogger(__name__)

MAX_QUERY_DIGITS = 18  # below 2**63: every file offset, every database integer

# What a request may be, checked before the app sees it. The path and query: room for the longest one
# either API takes (three 250-character names percent-encoded, ~9 KB), unlike aiohttp's 8,190 bytes.
MAX_TARGET_BYTES = 16_384
MAX_HEADER_BYTES = 8_190  # one header, name and value (aiohttp's; Apache's LimitRequestFieldSize)
MAX_HEADERS = 128  # aiohttp's
MAX_QUERY_VALUES = 16  # the values one query parameter may be given (the agent's `status`: maxItems)


class HttpError(Exception):
    """A request refused with ``status``; ``message`` is the answer's ``error``."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(HttpError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def error_response(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def bounded_query(limit: int = MAX_QUERY_VALUES) -> Middleware:
    """A query parameter given more than ``limit`` times is a 400 before anything else reads the
    query: no parameter of either API takes more values (one taking one value refuses a second)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        repeated = Counter(name for name, _ in request.query.items()).most_common(1)
        if repeated and repeated[0][1] > limit:
            name, count = repeated[0]
            shown = name if len(name) <= 64 else name[:64] + "..."
            return error_response(
                400, f"query parameter {shown} is given {count} times; none takes more than {limit} values"
            )
        return await handler(request)

    return middleware


def json_errors(
    *, service: str, known: Callable[[Exception], HttpError | None] = lambda exc: None
) -> Middleware:
    """Every failure as a JSON error; the server never dies on a request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message, headers=exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 405:
                allow = exc.headers.get("Allow", "")
                message = f"method {request.method} not allowed on {request.path}; allowed: {allow}"
                return error_response(405, message, headers={"Allow": allow})
            if exc.status == 413:  # aiohttp's own limit, should a handler read a body without read_json
                return error_response(413, "request body is larger than the limit (max_body_bytes)")
            return error_response(exc.status, exc.reason)
        except Exception as exc:
            mapped = known(exc)
            if mapped is not None:
                return error_response(mapped.status, mapped.message, headers=mapped.headers)
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(500, f"internal error in the {service} (logged)")

    return middleware


def token_auth(
    tokens: Iterable[str] | Secret[tuple[str, ...]],
    *,
    open_paths: Iterable[str],
    extra_header: str | None = None,
    limiter: RateLimiter | None = None,
) -> Middleware:
    """Accept a request carrying any of ``tokens`` (as they are at that request); ``open_paths``
    need none."""
    source = tokens if isinstance(tokens, Secret) else Secret(tuple(tokens))
    if not source.current():
        raise ValueError("a service needs at least one token")
    # The digests of the token tuple seen last: computed again only when the Secret holds a new one.
    known: list[tuple[tuple[str, ...], tuple[bytes, ...]]] = [((), ())]

    def accepted() -> tuple[bytes, ...]:
        current = source.current()
        if current is not known[0][0]:
            known[0] = (current, tuple(_digest(token.encode()) for token in current))
        return known[0][1]

    free = frozenset(open_paths)
    how = "Authorization: Bearer <token>" + (f" or {extra_header}" if extra_header else "")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in free:
            return await handler(request)
        # aiohttp decodes non-UTF-8 header bytes as surrogate escapes: encode them back, never fail.
        presented = _presented(request, extra_header).encode("utf-8", "surrogateescape")
        # Digests are compared, not tokens: equal lengths, so the time taken tells nothing of a token's
        # length either; no early exit, so it does not tell which one matched.
        given = _digest(presented)
        matched = -1
        for index, token in enumerate(accepted()):
            if hmac.compare_digest(given, token):
                matched = index
        if limiter is not None:
            # Keyed by the token's position, never the token; callers without one by address, so
            # guessing tokens is throttled too.
            client = f"token#{matched}" if matched >= 0 else f"addr:{request.remote}"
            retry_after = limiter.acquire(client)
            if retry_after:
                return error_response(
                    429,
                    f"rate limit exceeded; retry in {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
        if not presented or matched < 0:
            return error_response(401, f"missing or wrong token ({how})")
        return await handler(request)

    return middleware


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def carries_token(request: web.Request, tokens: Secret[tuple[str, ...]] | None) -> bool:
    """Whether ``request``'s bearer token is one of ``tokens`` (as they are now), compared as
    :func:`token_auth` compares: digests, in constant time, without saying which."""
    if tokens is None:
        return False
    given = _digest(_presented(request, None).encode("utf-8", "surrogateescape"))
    matched = False
    for token in tokens.current():
        matched |= hmac.compare_digest(given, _digest(token.encode()))
    return matched and bool(_presented(request, None))


def _presented(request: web.Request, extra_header: str | None) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get(extra_header, "").strip() if extra_header else ""


async def read_bounded(request: web.Request, limit: int, too_large: Exception) -> bytes:
    """The body, refused with ``too_large`` past ``limit`` bytes: by its declared length at once, or
    as it arrives (a chunked body declares none), never read whole first."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):  # a body sent a byte at a time holds nothing for good
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise HttpError(408, f"request body not received within {BODY_SECONDS:g} s") from None
    return bytes(body)


async def read_json(request: web.Request, *, limit: int, allow_empty: bool = False) -> object:
    """The body as JSON: at most ``limit`` bytes, strict UTF-8, every string and key storable text;
    an empty body is ``{}`` when ``allow_empty``. The error names the problem (and the field)."""
    body = await read_bounded(
        request, limit, HttpError(413, f"request body is larger than max_body_bytes={limit}")
    )
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid JSON: not UTF-8") from None
    except (ValueError, RecursionError):  # ValueError includes JSONDecodeError and huge integers
        raise BadRequest("request body is not valid JSON") from None
    problem = text_problem(value)
    if problem is not None:
        raise BadRequest(problem)
    return value


def query_text(request: web.Request, name: str) -> str | None:
    """A query parameter, or None when absent: given at most once, not empty (an empty filter is a
    template gone wrong, not "any"), and storable text."""
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name} is given {len(values)} times; give it at most once")
    if not values[0]:
        raise BadRequest(f"query parameter {name} is empty; give a value or leave it out")
    problem = text_problem({name: values[0]})
    if problem is not None:
        raise BadRequest(f"query parameter {problem}")
    return values[0]


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter: ``1``/``true`` or ``0``/``false``; False when absent."""
    raw = query_text(request, name)
    if raw is None:
        return False
    if raw.lower() not in ("1", "true", "0", "false"):
        raise BadRequest(f"{name} must be 1, true, 0 or false")
    return raw.lower() in ("1", "true")


def query_int(request: web.Request, name: str, *, low: int = 0, high: int | None = None) -> int | None:
    """A decimal integer query parameter in ``[low, high]`` (at most 18 digits), or None when absent."""
    raw = query_text(request, name)
    if raw is None:
        return None
    digits = raw.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_QUERY_DIGITS:
        raise BadRequest(f"{name} must be an integer of at most {MAX_QUERY_DIGITS} digits")
    value = int(raw)
    if value < low or (high is not None and value > high):
        upper = f" to {high}" if high is not None else " or more"
        raise BadRequest(f"{name} must be {low}{upper}, got {value}")
    return value
