"""What the HTTP channels (SMS, FCM, Web Push) share: the client, a bounded fan-out, reading
``Retry-After``, checking a URL the client is to send to, and translating httpx's errors into results
at the edge, so none escapes ``send``."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from email.utils import parsedate_to_datetime
from urllib.parse import SplitResult, urlsplit

import httpx

from channels.base import Message, PermanentFailure, SendResult, TransientFailure, result_of

# Upper bound for a provider's Retry-After: a misbehaving header must not park a message for days.
MAX_RETRY_AFTER_S = 3600.0


def new_client(
    *, timeout_s: float, max_connections: int, base_url: str = "", tls_context: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """``tls_context`` None: verify against the default CA bundle (building that context costs a
    noticeable fraction of a second, so tests and many channels may pass one in to share)."""
    return httpx.AsyncClient(
        base_url=base_url,
        verify=tls_context if tls_context is not None else True,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        # Redirects are never part of these APIs; following one could leak the credentials.
        follow_redirects=False,
    )


async def send_bounded(
    channel: str,
    messages: Sequence[Message],
    send_one: Callable[[Message], Awaitable[SendResult]],
    limit: int,
) -> list[SendResult]:
    """Send concurrently, at most ``limit`` in flight, results in the messages' order. A message
    whose ``send_one`` raises fails alone (``result_of``): the others' results stand."""
    slots = asyncio.Semaphore(limit)

    async def bounded(message: Message) -> SendResult:
        async with slots:
            return await result_of(channel, send_one(message))

    return list(await asyncio.gather(*(bounded(message) for message in messages)))


def url_parts(url: str) -> SplitResult | None:
    """``url`` split, or None when the client could not send a request to it: no host, brackets
    that do not close or hold no IP address, a port that is not a number from 1 to 65535, a host
    httpx cannot encode (``xn--``, an empty punycode label)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a number, or above 65535
        host = httpx.URL(url).host  # InvalidURL; idna.IDNAError (a ValueError) for a bad A-label
    except (ValueError, httpx.InvalidURL):
        return None
    return parts if host and port != 0 else None


def retry_after_s(response: httpx.Response, *, now_s: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return min(float(raw), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - now_s(), 0.0), MAX_RETRY_AFTER_S)


def transport_failure(channel: str, exc: httpx.HTTPError | OSError) -> TransientFailure | PermanentFailure:
    """Map a request that got no HTTP response. The class name is enough for an operator and
    carries nothing personal (httpx messages may contain the URL, i.e. a push endpoint)."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return PermanentFailure(f"{channel}: unusable URL ({type(exc).__name__})")
    return TransientFailure(f"{channel}: {type(exc).__name__}")


def status_failure(
    channel: str, response: httpx.Response, detail: str = ""
) -> TransientFailure | PermanentFailure:
    """The default mapping of an HTTP error status: 408, 429 and 5xx are worth retrying."""
    reason = f"{channel}: HTTP {response.status_code}{f' {detail}' if detail else ''}"
    if response.status_code in {408, 429} or response.status_code >= 500:
        return TransientFailure(reason, retry_after_s=retry_after_s(response))
    return PermanentFailure(reason)
