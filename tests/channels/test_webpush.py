"""WebPushChannel against a local push service that does what a real one does: it verifies the
VAPID JWT (ES256, aud = the endpoint's origin, exp within 24 h), checks the RFC 8030 headers and
decrypts the aes128gcm payload with the subscription's private key."""

from __future__ import annotations

import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import http_ece
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from channels.base import Accepted, Message, PermanentFailure, TransientFailure, WebPushSubscription
from channels.errors import ChannelConfigError
from channels.jose import b64url, b64url_decode
from channels.push_common import MAX_TTL_S
from channels.webpush import VapidTokens, WebPushChannel, config_from_options
from tests.channels.http_fakes import HttpFake, Request, Response

TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
# subscription id -> how the push service answers it
REFUSALS = {
    "gone": Response(410),
    "missing": Response(404),
    "busy": Response(429, headers={"Retry-After": "60"}),
    "big": Response(413),
    "down": Response(503),
    "garbled": Response(400),
}


@dataclass
class Browser:
    """A subscription's keys as the user agent holds them."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self, endpoint: str) -> WebPushSubscription:
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return WebPushSubscription(endpoint, b64url(point), b64url(self.auth))


@dataclass
class PushService:
    vapid_public: ec.EllipticCurvePublicKey
    browser: Browser
    url: str = ""
    delivered: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        assert request.method == "POST"
        if not self.vapid_ok(request.headers.get("authorization", "")):
            return Response(401)
        headers = request.headers
        assert headers["content-encoding"] == "aes128gcm"
        if not headers.get("ttl", "").isdigit():
            # RFC 8030 §5.2: a push service MUST answer 400 to a request without a TTL.
            return Response(400)
        assert headers.get("urgency", "normal") in {"very-low", "low", "normal", "high"}
        assert "topic" not in headers or TOPIC.fullmatch(headers["topic"])
        subscription_id = request.path.removeprefix("/push/")
        if subscription_id in REFUSALS:
            return REFUSALS[subscription_id]
        plaintext = http_ece.decrypt(
            request.body, private_key=self.browser.key, auth_secret=self.browser.auth, version="aes128gcm"
        )
        self.delivered.append((headers, json.loads(plaintext)))
        return Response(201, headers={"Location": f"{self.url}/message/{len(self.delivered)}"})

    def vapid_ok(self, authorization: str) -> bool:
        match = re.fullmatch(r"vapid t=([^,]+), ?k=(\S+)", authorization)
        if match is None:
            return False
        token, key = match.groups()
        expected_key = self.vapid_public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        if b64url_decode(key) != expected_key:
            return False
        header_b64, claims_b64, signature_b64 = token.split(".")
        raw = b64url_decode(signature_b64)
        signature = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        try:
            self.vapid_public.verify(
                signature, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            return False
        header, claims = json.loads(b64url_decode(header_b64)), json.loads(b64url_decode(claims_b64))
        now_s = time.time()
        return bool(
            header["alg"] == "ES256"
            and claims["aud"] == self.url
            and now_s < claims["exp"] <= now_s + 86_400
            and claims["sub"].startswith("mailto:")
        )


@pytest.fixture
def vapid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def service(vapid_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[PushService]:
    push_service = PushService(vapid_key.public_key(), Browser())
    async with HttpFake(push_service.handle) as server:
        push_service.url = server.url
        yield push_service


Make = Callable[..., WebPushChannel]


@pytest.fixture
def make_channel(tmp_path: Path, vapid_key: ec.EllipticCurvePrivateKey, client_tls: ssl.SSLContext) -> Make:
    pem = tmp_path / "vapid.pem"
    pem.write_bytes(
        vapid_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    def make(**extra: str) -> WebPushChannel:
        options = {"vapid_private_key": str(pem), "vapid_subject": "mailto:ops@relais.example"}
        return WebPushChannel(config_from_options(options | extra), tls_context=client_tls)

    return make


def notice(subscription: WebPushSubscription, **fields: Any) -> Message:
    return Message(
        idempotency_key="n7:3:webpush",
        to=subscription,
        subject="Delivery today",
        text="Between 14:00 and 16:00 ✓",
        **({"data": {"deep_link": "/parcels/123"}} | fields),
    )


async def test_delivers_an_encrypted_payload_with_vapid(service: PushService, make_channel: Make) -> None:
    channel = make_channel(urgency="high")
    subscription = service.browser.subscription(f"{service.url}/push/abc")
    expires_at = datetime.fromtimestamp(time.time() + 3600, UTC)
    try:
        results = await channel.send(
            [
                notice(subscription, collapse_key="parcel:123:slot", expires_at=expires_at),
                notice(subscription, collapse_key="slot123"),
            ]
        )
    finally:
        await channel.aclose()

    assert [r.provider_message_id for r in results if isinstance(r, Accepted)] == [
        f"{service.url}/message/1",
        f"{service.url}/message/2",
    ]
    (first_headers, payload), (second_headers, _) = service.delivered
    assert payload == {
        "title": "Delivery today",
        "body": "Between 14:00 and 16:00 ✓",
        "data": {"deep_link": "/parcels/123"},
        "idempotency_key": "n7:3:webpush",
        "lang": "en",
    }
    assert 3590 <= int(first_headers["ttl"]) <= 3600
    assert first_headers["urgency"] == "high"
    # "parcel:123:slot" has a ':' so it is hashed into a valid Topic; "slot123" is used as it is.
    assert TOPIC.fullmatch(first_headers["topic"])
    assert first_headers["topic"] != "parcel:123:slot"
    assert second_headers["topic"] == "slot123"
    assert second_headers["ttl"] == "86400"


async def test_ttl_is_capped_at_28_days(service: PushService, make_channel: Make) -> None:
    channel = make_channel()
    subscription = service.browser.subscription(f"{service.url}/push/abc")
    expires_at = datetime.fromtimestamp(time.time() + 60 * 86_400, UTC)
    try:
        [result] = await channel.send([notice(subscription, expires_at=expires_at)])
    finally:
        await channel.aclose()
    assert isinstance(result, Accepted)
    [(headers, _)] = service.delivered
    assert headers["ttl"] == str(MAX_TTL_S)


async def test_the_fake_answers_400_without_ttl(service: PushService, make_channel: Make) -> None:
    channel = make_channel()
    await channel.aclose()
    vapid = VapidTokens(channel.config, time.time)
    headers = {"Content-Encoding": "aes128gcm", "Authorization": vapid.authorization(service.url)}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/push/abc", content=b"x", headers=headers)
    assert response.status_code == 400
    assert service.delivered == []


async def test_refusals_are_mapped(service: PushService, make_channel: Make) -> None:
    channel = make_channel()
    try:
        results = await channel.send(
            [notice(service.browser.subscription(f"{service.url}/push/{name}")) for name in REFUSALS]
        )
    finally:
        await channel.aclose()

    assert results == [
        PermanentFailure("webpush: HTTP 410", destination_invalid=True),
        PermanentFailure("webpush: HTTP 404", destination_invalid=True),
        TransientFailure("webpush: HTTP 429", retry_after_s=60.0),
        PermanentFailure("webpush: HTTP 413"),
        TransientFailure("webpush: HTTP 503"),
        PermanentFailure("webpush: HTTP 400"),
    ]


async def test_a_foreign_vapid_key_is_refused(service: PushService, make_channel: Make) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    raw = other.private_numbers().private_value.to_bytes(32, "big")
    channel = make_channel(vapid_private_key=b64url(raw))
    try:
        [result] = await channel.send([notice(service.browser.subscription(f"{service.url}/push/abc"))])
    finally:
        await channel.aclose()
    assert result == PermanentFailure("webpush: HTTP 401")
    assert service.delivered == []


async def test_malformed_or_expired_messages_are_not_sent(service: PushService, make_channel: Make) -> None:
    good = service.browser.subscription(f"{service.url}/push/abc")
    channel = make_channel()
    try:
        results = await channel.send(
            [
                notice(WebPushSubscription("http://push.example/abc", good.p256dh, good.auth)),
                notice(WebPushSubscription(good.endpoint, "not-a-key", good.auth)),
                notice(WebPushSubscription(good.endpoint, good.p256dh, b64url(b"short"))),
                notice(good, expires_at=datetime.fromtimestamp(time.time() - 5, UTC)),
                notice(good, data={"blob": "x" * 4000}),
            ]
        )
    finally:
        await channel.aclose()

    malformed = PermanentFailure("webpush: malformed subscription", destination_invalid=True)
    assert results[:3] == [malformed] * 3
    assert results[3] == PermanentFailure("webpush: expired before sending")
    assert isinstance(results[4], PermanentFailure)
    assert not results[4].destination_invalid
    assert service.delivered == []


# Endpoints that look like URLs but that no request can be built for, or sent to.
UNUSABLE_ENDPOINTS = [
    "https://push.example.net:abc/send/1",  # httpx.InvalidURL
    "https://xn--/send/1",  # idna.IDNAError: an empty punycode label
    "https://127.0.0.1:99999/send/1",  # OverflowError from connect(), in an ExceptionGroup
    "https://[::1/push",  # ValueError from urlsplit
    "https://[push.example]/send/1",
]


@pytest.mark.parametrize("endpoint", UNUSABLE_ENDPOINTS)
async def test_an_unusable_endpoint_fails_alone_as_a_dead_subscription(
    service: PushService, make_channel: Make, endpoint: str
) -> None:
    good = service.browser.subscription(f"{service.url}/push/abc")
    channel = make_channel()
    try:
        results = await channel.send([notice(Browser().subscription(endpoint)), notice(good)])
    finally:
        await channel.aclose()
    # The other message of the chunk went out once and is reported so: not failed and sent again.
    assert results[0] == PermanentFailure("webpush: malformed subscription", destination_invalid=True)
    assert isinstance(results[1], Accepted)
    assert len(service.delivered) == 1


async def test_a_message_whose_send_raises_fails_alone(service: PushService, make_channel: Make) -> None:
    good = service.browser.subscription(f"{service.url}/push/abc")
    channel = make_channel()
    try:
        # A lone surrogate cannot be encoded as UTF-8: an error no branch of the channel expects.
        results = await channel.send([notice(good, data={"note": "\ud800"}), notice(good)])
    finally:
        await channel.aclose()
    assert results[0] == TransientFailure("webpush: UnicodeEncodeError")
    assert isinstance(results[1], Accepted)
    assert len(service.delivered) == 1


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"vapid_subject": "mailto:a@b.example"}, "'vapid_private_key'"),
        ({"vapid_private_key": "AAAA", "vapid_subject": "mailto:a@b.example"}, "'vapid_private_key'"),
        ({"vapid_private_key": b64url(b"k" * 32), "vapid_subject": "ops@b.example"}, "'vapid_subject'"),
        (
            {
                "vapid_private_key": b64url(b"k" * 32),
                "vapid_subject": "mailto:a@b",
                "token_lifetime_s": "90000",
            },
            "'token_lifetime_s'",
        ),
    ],
)
def test_bad_options_name_the_option(options: dict[str, str], named: str) -> None:
    with pytest.raises(ChannelConfigError, match=named):
        config_from_options(options)
