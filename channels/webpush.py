"""Web Push: RFC 8030 delivery, RFC 8291 message encryption (aes128gcm, via ``http_ece``) and
VAPID (RFC 8292) application-server identification with an ES256 JWT built here.

Each message is encrypted for the subscription's key (``p256dh``, ``auth``) with a fresh ephemeral
key and POSTed to the subscription's endpoint with ``TTL``, ``Urgency``, ``Topic`` (the collapse key,
hashed when it is not a valid Topic) and ``Authorization: vapid t=<jwt>, k=<public key>``.

Options (``RELAIS_CHANNEL_WEBPUSH_<OPTION>``): ``vapid_private_key`` (required: a PEM file path or
the raw P-256 key as base64url), ``vapid_subject`` (required: ``mailto:`` or ``https:`` contact),
``default_ttl_s`` (86400, when a message has no expiry), ``urgency`` (``normal``; ``very-low``,
``low``, ``high``), ``token_lifetime_s`` (43200, at most 86400 per RFC 8292), ``max_concurrency``
(16), ``timeout_s`` (10).
"""

from __future__ import annotations

import binascii
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import http_ece
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.base import (
    Accepted,
    Message,
    PermanentFailure,
    SendResult,
    WebPushSubscription,
)
from channels.http_common import new_client, send_bounded, status_failure, transport_failure, url_parts
from channels.jose import b64url, b64url_decode, sign_es256
from channels.options import Options
from channels.push_common import MAX_TTL_S, ttl_s, webpush_topic

URGENCIES = ("very-low", "low", "normal", "high")
# RFC 8291 §4: one 4096-byte record; minus the 86-byte header and 17 bytes of tag and delimiter.
MAX_PLAINTEXT_BYTES = 3993
# RFC 8292 §2: a VAPID token must not be valid for more than 24 hours.
MAX_TOKEN_LIFETIME_S = 86_400
_DEAD_SUBSCRIPTION = frozenset({404, 410})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class WebPushConfig:
    vapid_key: ec.EllipticCurvePrivateKey = field(repr=False)
    vapid_subject: str
    default_ttl_s: int = 86_400
    urgency: str = "normal"
    token_lifetime_s: int = 43_200
    max_concurrency: int = 16
    timeout_s: float = 10.0

    @property
    def vapid_public_b64(self) -> str:
        point = self.vapid_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)


def load_vapid_key(value: str) -> ec.EllipticCurvePrivateKey:
    """A PEM file path, or the raw 32-byte private value in base64url. Raises ValueError."""
    path = Path(value)
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        try:
            raw = b64url_decode(value)
        except (binascii.Error, ValueError):
            raise ValueError("is neither a PEM file nor a base64url key") from None
        if len(raw) != 32:
            raise ValueError("is neither a PEM file nor a 32-byte base64url key")
        key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("is not a P-256 key")
    return key


def config_from_options(options: Mapping[str, str]) -> WebPushConfig:
    opts = Options("webpush", options)
    try:
        key = load_vapid_key(opts.required("vapid_private_key"))
    except ValueError as exc:
        raise opts.error("vapid_private_key", str(exc)) from None
    subject = opts.required("vapid_subject")
    if not subject.startswith(("mailto:", "https://")):
        raise opts.error("vapid_subject", "must be a mailto: or https: contact")
    config = WebPushConfig(
        vapid_key=key,
        vapid_subject=subject,
        default_ttl_s=opts.integer("default_ttl_s", 86_400, low=0, high=MAX_TTL_S),
        urgency=opts.choice("urgency", "normal", URGENCIES),
        token_lifetime_s=opts.integer("token_lifetime_s", 43_200, low=60, high=MAX_TOKEN_LIFETIME_S),
        max_concurrency=opts.integer("max_concurrency", 16, low=1, high=1024),
        timeout_s=opts.number("timeout_s", 10.0, low=0.1, high=600.0),
    )
    opts.finish()
    return config


@dataclass(frozen=True, slots=True)
class _Target:
    endpoint: str
    origin: str
    public_point: bytes
    auth_secret: bytes


def _target(subscription: WebPushSubscription) -> _Target | None:
    """The subscription's parts, or None when it cannot be a working subscription (among others,
    an endpoint no request can be built for: it is as dead as one the push service answers 410)."""
    parts = url_parts(subscription.endpoint)
    if parts is None:
        return None
    secure = parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS)
    if not secure:
        return None
    try:
        point, auth = b64url_decode(subscription.p256dh), b64url_decode(subscription.auth)
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except (binascii.Error, ValueError):
        return None
    if len(auth) != 16:
        return None
    return _Target(subscription.endpoint, f"{parts.scheme}://{parts.netloc}", point, auth)


def payload_of(message: Message) -> bytes:
    """What the service worker receives: title, body, data and the idempotency key, as JSON."""
    document = {
        "title": message.subject,
        "body": message.text,
        "data": dict(message.data),
        "idempotency_key": message.idempotency_key,
        "lang": message.locale,
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encrypt(payload: bytes, target: _Target) -> bytes:
    """RFC 8291 aes128gcm with a fresh ephemeral key (its public point travels as the key id)."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    encrypted = http_ece.encrypt(
        payload,
        salt=os.urandom(16),
        private_key=ephemeral,
        dh=target.public_point,
        auth_secret=target.auth_secret,
        version="aes128gcm",
    )
    return bytes(encrypted)


def webpush_failure(response: httpx.Response) -> SendResult:
    if response.status_code in _DEAD_SUBSCRIPTION:
        return PermanentFailure(f"webpush: HTTP {response.status_code}", destination_invalid=True)
    return status_failure("webpush", response)


class VapidTokens:
    """One signed token per push-service origin, reused until an hour (or half its life) is left."""

    def __init__(self, config: WebPushConfig, now_s: Callable[[], float]) -> None:
        self._config = config
        self._now_s = now_s
        self._by_origin: dict[str, tuple[str, float]] = {}

    def authorization(self, origin: str) -> str:
        now_s = self._now_s()
        margin_s = min(3600.0, self._config.token_lifetime_s / 2)
        cached = self._by_origin.get(origin)
        if cached is None or cached[1] - margin_s <= now_s:
            expires_s = int(now_s) + self._config.token_lifetime_s
            claims = {"aud": origin, "exp": expires_s, "sub": self._config.vapid_subject}
            cached = (sign_es256(self._config.vapid_key, claims), float(expires_s))
            self._by_origin[origin] = cached
        return f"vapid t={cached[0]}, k={self._config.vapid_public_b64}"


class WebPushChannel:
    name = "webpush"

    def __init__(
        self,
        config: WebPushConfig,
        *,
        now_s: Callable[[], float] = time.time,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._now_s = now_s
        self._vapid = VapidTokens(config, now_s)
        self._client = new_client(
            timeout_s=config.timeout_s, max_connections=config.max_concurrency, tls_context=tls_context
        )

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(config_from_options(options))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        return await send_bounded(self.name, messages, self._send_one, self.config.max_concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, message: Message, target: _Target, ttl: int) -> dict[str, str]:
        headers = {
            "TTL": str(ttl),
            "Urgency": self.config.urgency,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self._vapid.authorization(target.origin),
        }
        if message.collapse_key:
            headers["Topic"] = webpush_topic(message.collapse_key)
        return headers

    async def _send_one(self, message: Message) -> SendResult:
        if not isinstance(message.to, WebPushSubscription):
            return PermanentFailure(f"webpush: cannot reach a {type(message.to).__name__}")
        target = _target(message.to)
        if target is None:
            return PermanentFailure("webpush: malformed subscription", destination_invalid=True)
        ttl = ttl_s(message.expires_at, self._now_s())
        if ttl == 0:
            return PermanentFailure("webpush: expired before sending")
        payload = payload_of(message)
        if len(payload) > MAX_PLAINTEXT_BYTES:
            return PermanentFailure(f"webpush: payload of {len(payload)} bytes exceeds one record")
        headers = self._headers(message, target, self.config.default_ttl_s if ttl is None else ttl)
        try:
            response = await self._client.post(
                target.endpoint, content=encrypt(payload, target), headers=headers
            )
        except httpx.HTTPError as exc:
            return transport_failure("webpush", exc)
        if response.status_code in {200, 201, 202}:
            return Accepted(provider_message_id=response.headers.get("location", ""))
        return webpush_failure(response)
