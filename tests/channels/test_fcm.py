"""FcmChannel against a local server that acts as Google's token endpoint and the FCM HTTP v1 API:
it verifies the RS256 assertion with the service account's public key, issues access tokens, checks
the bearer token and the message document, and answers with FCM's real error shapes."""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from channels.base import Accepted, FcmToken, Message, PermanentFailure, TransientFailure
from channels.errors import ChannelConfigError
from channels.fcm import GRANT_TYPE, SCOPE, FcmChannel, config_from_options
from channels.jose import b64url_decode
from tests.channels.http_fakes import HttpFake, Request, Response

PROJECT = "relais-test"
CLIENT_EMAIL = "relais@relais-test.iam.gserviceaccount.com"
KEY_ID = "k" * 40
NOW_S = 1_773_133_200.0


def fcm_error(code: int, status: str, message: str, error_code: str = "", **extra: Any) -> Response:
    details: list[dict[str, Any]] = []
    if error_code:
        details.append(
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}
        )
    if "field" in extra:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": extra["field"], "description": message}],
            }
        )
    payload = {"error": {"code": code, "message": message, "status": status, "details": details}}
    return Response.json(code, payload, extra.get("headers"))


# token -> the error FCM gives for it
TOKEN_ERRORS = {
    "uninstalled": fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
    "garbage": fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        "INVALID_ARGUMENT",
        field="message.token",
    ),
    "other-sender": fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
    "quota": fcm_error(
        429, "RESOURCE_EXHAUSTED", "Quota exceeded", "QUOTA_EXCEEDED", headers={"Retry-After": "30"}
    ),
    "down": fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
    "oops": fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"),
    "too-big": fcm_error(
        400, "INVALID_ARGUMENT", "Message is too big", "INVALID_ARGUMENT", field="message.data"
    ),
}


@dataclass
class Google:
    public_key: rsa.RSAPublicKey
    url: str = ""
    issued: set[str] = field(default_factory=set)
    token_requests: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        if request.path == "/token":
            return self.token(request)
        if request.path == f"/v1/projects/{PROJECT}/messages:send" and request.method == "POST":
            return self.send(request)
        return fcm_error(404, "NOT_FOUND", "not found")

    def token(self, request: Request) -> Response:
        self.token_requests += 1
        form = request.form()
        if form.get("grant_type") != [GRANT_TYPE]:
            return Response.json(
                400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
            )
        [assertion] = form["assertion"]
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        header, claims = json.loads(b64url_decode(header_b64)), json.loads(b64url_decode(claims_b64))
        try:
            self.public_key.verify(
                b64url_decode(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return Response.json(
                400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            )
        assert header == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
        assert claims["iss"] == CLIENT_EMAIL
        assert claims["scope"] == SCOPE
        assert claims["aud"] == f"{self.url}/token"
        assert 0 < claims["exp"] - claims["iat"] <= 3600
        token = "ya29." + secrets.token_urlsafe(24)
        self.issued.add(token)
        return Response.json(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def send(self, request: Request) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.issued:
            return fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        document = request.json()
        assert set(document) == {"message"}
        message = document["message"]
        assert set(message) <= {"token", "notification", "data", "android", "apns", "webpush"}
        assert all(isinstance(v, str) for v in message["data"].values())
        self.messages.append(message)
        if message["token"] in TOKEN_ERRORS:
            return TOKEN_ERRORS[message["token"]]
        return Response.json(200, {"name": f"projects/{PROJECT}/messages/0:{secrets.token_hex(8)}"})


@dataclass
class Clock:
    now_s: float = NOW_S

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def google(rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[tuple[Google, HttpFake]]:
    fake_google = Google(rsa_key.public_key())
    async with HttpFake(fake_google.handle) as server:
        fake_google.url = server.url
        yield fake_google, server


def write_service_account(directory: Path, key: rsa.RSAPrivateKey, token_uri: str) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "token_uri": token_uri,
    }
    path = directory / "service-account.json"
    path.write_text(json.dumps(info))
    return path


MakeChannel = Callable[..., FcmChannel]
Fakes = tuple[Google, HttpFake]


@pytest.fixture
def make_channel(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: tuple[Google, HttpFake], client_tls: ssl.SSLContext
) -> MakeChannel:
    def make(clock: Clock | None = None, key: rsa.RSAPrivateKey = rsa_key) -> FcmChannel:
        server = google[1]
        account = write_service_account(tmp_path, key, f"{server.url}/token")
        config = config_from_options({"service_account_file": str(account), "api_base": server.url})
        return FcmChannel(config, now_s=clock or Clock(), tls_context=client_tls)

    return make


def push(token: str, **fields: Any) -> Message:
    return Message(
        idempotency_key=f"n1:2:fcm:{token}",
        to=FcmToken(token),
        subject="Your parcel arrives today",
        text="Between 14:00 and 16:00",
        data={"deep_link": "relais://parcel/123"},
        **fields,
    )


async def test_sends_the_v1_document_with_collapse_and_expiry(
    make_channel: MakeChannel, google: tuple[Google, HttpFake]
) -> None:
    fake, _ = google
    channel = make_channel()
    expires_at = datetime.fromtimestamp(NOW_S + 5400, UTC)
    long_key = "parcel:" + "x" * 80 + ":slot"
    try:
        results = await channel.send(
            [
                push("device-1", collapse_key="parcel:123:slot", expires_at=expires_at),
                push("device-2", collapse_key=long_key),
            ]
        )
    finally:
        await channel.aclose()

    assert all(isinstance(r, Accepted) and r.provider_message_id.startswith("projects/") for r in results)
    first, second = fake.messages
    assert first == {
        "token": "device-1",
        "notification": {"title": "Your parcel arrives today", "body": "Between 14:00 and 16:00"},
        "data": {"deep_link": "relais://parcel/123", "idempotency_key": "n1:2:fcm:device-1"},
        "android": {"collapse_key": "parcel:123:slot", "ttl": "5400s"},
        "apns": {
            "headers": {"apns-collapse-id": "parcel:123:slot", "apns-expiration": str(int(NOW_S + 5400))}
        },
        "webpush": {"headers": {"Topic": first["webpush"]["headers"]["Topic"], "TTL": "5400"}},
    }
    topic = first["webpush"]["headers"]["Topic"]
    assert len(topic) <= 32
    assert topic.replace("-", "").replace("_", "").isalnum()
    # No expiry: FCM's default TTL applies; a long collapse key is hashed to fit APNs' 64 bytes.
    assert "ttl" not in second["android"]
    assert len(second["apns"]["headers"]["apns-collapse-id"]) <= 64
    assert fake.token_requests == 1


async def test_access_token_is_cached_until_near_expiry(
    make_channel: MakeChannel, google: tuple[Google, HttpFake]
) -> None:
    fake, _ = google
    clock = Clock()
    channel = make_channel(clock)
    try:
        await channel.send([push("a"), push("b"), push("c")])
        clock.now_s += 3000
        await channel.send([push("d")])
        assert fake.token_requests == 1
        clock.now_s += 500  # within the refresh margin of the 3599 s lifetime
        results = await channel.send([push("e")])
    finally:
        await channel.aclose()
    assert isinstance(results[0], Accepted)
    assert fake.token_requests == 2


async def test_errors_are_mapped(make_channel: MakeChannel) -> None:
    channel = make_channel()
    try:
        results = await channel.send([push(token) for token in TOKEN_ERRORS])
    finally:
        await channel.aclose()

    assert results == [
        PermanentFailure("fcm: HTTP 404 UNREGISTERED", destination_invalid=True),
        PermanentFailure("fcm: HTTP 400 INVALID_ARGUMENT", destination_invalid=True),
        PermanentFailure("fcm: HTTP 403 SENDER_ID_MISMATCH", destination_invalid=True),
        TransientFailure("fcm: HTTP 429 QUOTA_EXCEEDED", retry_after_s=30.0),
        TransientFailure("fcm: HTTP 503 UNAVAILABLE"),
        TransientFailure("fcm: HTTP 500 INTERNAL"),
        PermanentFailure("fcm: HTTP 400 INVALID_ARGUMENT", destination_invalid=False),
    ]


async def test_revoked_access_token_is_refetched(
    make_channel: MakeChannel, google: tuple[Google, HttpFake]
) -> None:
    fake, _ = google
    channel = make_channel()
    try:
        await channel.send([push("a")])
        fake.issued.clear()  # the server forgets every token it gave out
        [refused] = await channel.send([push("b")])
        [retried] = await channel.send([push("b")])
    finally:
        await channel.aclose()
    assert refused == TransientFailure("fcm: HTTP 401 UNAUTHENTICATED")
    assert isinstance(retried, Accepted)
    assert fake.token_requests == 2


async def test_a_key_the_token_endpoint_rejects_fails_every_message(make_channel: MakeChannel) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    channel = make_channel(key=other_key)
    try:
        results = await channel.send([push("a"), push("b")])
    finally:
        await channel.aclose()
    assert results == [PermanentFailure("fcm token: HTTP 400 invalid_grant")] * 2


async def test_expired_message_is_not_sent(
    make_channel: MakeChannel, google: tuple[Google, HttpFake]
) -> None:
    fake, _ = google
    channel = make_channel()
    try:
        [result] = await channel.send([push("a", expires_at=datetime.fromtimestamp(NOW_S - 1, UTC))])
    finally:
        await channel.aclose()
    assert result == PermanentFailure("fcm: expired before sending")
    assert fake.messages == []


def test_bad_key_file_names_the_option(tmp_path: Path) -> None:
    broken = tmp_path / "sa.json"
    broken.write_text(json.dumps({"client_email": CLIENT_EMAIL, "private_key": "nope", "token_uri": "x"}))
    with pytest.raises(ChannelConfigError, match=r"'service_account_file'.*unreadable private_key"):
        FcmChannel.from_options({"service_account_file": str(broken)})
    with pytest.raises(ChannelConfigError, match=r"'service_account_file'.*required"):
        FcmChannel.from_options({})
