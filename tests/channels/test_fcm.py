"""FcmChannel against a local server that acts as Google's token endpoint and the FCM HTTP v1 API:
it verifies the RS256 assertion with the service account's public key, issues access tokens, checks
the bearer token and the message document, and answers with FCM's real error shapes."""

from __future__ import annotations

import json
import re
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

from channels.base import (
    CONFIGURATION_RETRY_AFTER_S,
    Accepted,
    FcmToken,
    Message,
    PermanentFailure,
    TransientFailure,
)
from channels.errors import ChannelConfigError
from channels.fcm import GRANT_TYPE, SCOPE, FcmChannel, config_from_options
from channels.jose import b64url_decode
from tests.channels.http_fakes import HttpFake, Request, Response

PROJECT = "relais-test"
# A project that exists but where the service account has no role: FCM says 403 PERMISSION_DENIED.
FOREIGN_PROJECT = "someone-else"
CLIENT_EMAIL = "relais@relais-test.iam.gserviceaccount.com"
KEY_ID = "k" * 40
NOW_S = 1_773_133_200.0
# FCM's bounds for android.ttl (a Duration, "<seconds>s") and the webpush TTL header: 0 to 28 days.
MAX_TTL_S = 2_419_200
DURATION = re.compile(r"(\d+)(\.\d{1,9})?s")


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
    # An iOS device whose app's APNs key (or a browser's Web Push key) Firebase could not use.
    "ios-bad-apns-key": fcm_error(
        401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service", "THIRD_PARTY_AUTH_ERROR"
    ),
}


def ttl_violation(message: dict[str, Any]) -> str:
    """The field FCM names when a TTL is malformed or beyond 28 days, or ""."""
    android_ttl = message.get("android", {}).get("ttl")
    if android_ttl is not None:
        match = DURATION.fullmatch(android_ttl)
        if match is None or int(match.group(1)) > MAX_TTL_S:
            return "message.android.ttl"
    webpush_ttl = message.get("webpush", {}).get("headers", {}).get("TTL")
    if webpush_ttl is not None and not (webpush_ttl.isdigit() and int(webpush_ttl) <= MAX_TTL_S):
        return "message.webpush.headers"
    return ""


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
        if request.path == f"/v1/projects/{FOREIGN_PROJECT}/messages:send" and self.authorized(request):
            return fcm_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{FOREIGN_PROJECT}' (or it may not exist).",
            )
        # An unknown project or a wrong base path: no FcmError detail, nothing about a token.
        return fcm_error(404, "NOT_FOUND", "Requested entity was not found.")

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization", "").removeprefix("Bearer ") in self.issued

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
        if not self.authorized(request):
            return fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        document = request.json()
        assert set(document) == {"message"}
        message = document["message"]
        assert set(message) <= {"token", "notification", "data", "android", "apns", "webpush"}
        assert all(isinstance(v, str) for v in message["data"].values())
        if violation := ttl_violation(message):
            invalid = f"Invalid value at '{violation}'"
            return fcm_error(400, "INVALID_ARGUMENT", invalid, "INVALID_ARGUMENT", field=violation)
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
    def make(clock: Clock | None = None, key: rsa.RSAPrivateKey = rsa_key, **extra: str) -> FcmChannel:
        server = google[1]
        account = write_service_account(tmp_path, key, f"{server.url}/token")
        options = {"service_account_file": str(account), "api_base": server.url} | extra
        config = config_from_options(options)
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
        TransientFailure(
            "fcm: HTTP 401 THIRD_PARTY_AUTH_ERROR: APNs or Web Push refused the project's certificate or key",
            retry_after_s=CONFIGURATION_RETRY_AFTER_S,
        ),
    ]


async def test_a_third_party_auth_error_keeps_the_access_token(
    make_channel: MakeChannel, google: tuple[Google, HttpFake]
) -> None:
    fake, _ = google
    channel = make_channel()
    try:
        [refused] = await channel.send([push("ios-bad-apns-key")])
        [android] = await channel.send([push("android-ok")])
    finally:
        await channel.aclose()
    assert isinstance(refused, TransientFailure)
    assert isinstance(android, Accepted)
    # The access token was good: only a 401 without an errorCode means it expired.
    assert fake.token_requests == 1


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"project_id": "no-such-project"}, "fcm: HTTP 404 NOT_FOUND: no FCM project at"),
        ({"project_id": FOREIGN_PROJECT}, "fcm: HTTP 403 PERMISSION_DENIED: the service account may not"),
    ],
)
async def test_a_wrong_project_condemns_no_token(
    make_channel: MakeChannel, options: dict[str, str], reason: str
) -> None:
    channel = make_channel(**options)
    try:
        results = await channel.send([push("device-1"), push("device-2")])
    finally:
        await channel.aclose()
    # Every token would be deleted if a 404 without UNREGISTERED meant a dead token; and a project the
    # account may not use is the operator's to fix, not a reason to fall back to paid SMS.
    for result in results:
        assert isinstance(result, TransientFailure)
        assert result.reason.startswith(reason)
        assert result.retry_after_s == CONFIGURATION_RETRY_AFTER_S


async def test_ttl_is_capped_at_28_days(make_channel: MakeChannel, google: tuple[Google, HttpFake]) -> None:
    fake, _ = google
    channel = make_channel()
    expires_at = datetime.fromtimestamp(NOW_S + 60 * 86_400, UTC)
    try:
        [result] = await channel.send([push("device-1", expires_at=expires_at)])
    finally:
        await channel.aclose()
    assert isinstance(result, Accepted)
    [message] = fake.messages
    assert message["android"]["ttl"] == f"{MAX_TTL_S}s"
    assert message["webpush"]["headers"]["TTL"] == str(MAX_TTL_S)
    # APNs takes an absolute expiry and documents no bound: the message's own.
    assert message["apns"]["headers"]["apns-expiration"] == str(int(expires_at.timestamp()))


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
    # The operator's to fix (a rotated key, a skewed clock): wait for it rather than fall back.
    expected = TransientFailure(
        "fcm token: HTTP 400 invalid_grant: check the service account key and the clock",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert results == [expected] * 2


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
