"""SmsChannel against a local server that behaves like Twilio's Messages API."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator

import pytest

from channels.base import (
    CONFIGURATION_RETRY_AFTER_S,
    Accepted,
    EmailAddress,
    Message,
    PermanentFailure,
    PhoneNumber,
    TransientFailure,
)
from channels.errors import ChannelConfigError
from channels.ratelimit import TokenBucket
from channels.sms import SmsChannel
from tests.channels.http_fakes import HttpFake, Request, Response

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "tok-" + "9" * 28
SENDER = "+41445550100"
# Numbers the fake treats like the real service would (Twilio's documented error codes).
FAILING = {
    "+41791110001": (400, 21211, "The 'To' number +41791110001 is not a valid phone number."),
    "+41791110002": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "+41791110003": (400, 21614, "'To' number is not a valid mobile number"),
    "+41791110004": (429, 20429, "Too Many Requests"),
    "+41791110005": (500, 20500, "Internal Server Error"),
    "+41791110006": (400, 21408, "Permission to send an SMS has not been enabled for the region"),
}


def twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}"}
    return Response.json(status, body | {"status": status}, headers)


async def twilio(request: Request) -> Response:
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    if request.headers.get("authorization") != f"Basic {expected_auth}":
        return twilio_error(401, 20003, "Authentication Error - invalid username")
    if request.method != "POST" or request.path != f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json":
        return twilio_error(404, 20404, "The requested resource was not found")
    form = request.form()
    if not form.get("Body") or not form.get("To"):
        return twilio_error(400, 21602, "Message body is required.")
    if ("From" in form) == ("MessagingServiceSid" in form):
        return twilio_error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
    [to], [body] = form["To"], form["Body"]
    if to in FAILING:
        status, code, message = FAILING[to]
        return twilio_error(status, code, message, {"Retry-After": "7"} if status == 429 else None)
    sid = "SM" + secrets.token_hex(16)
    return Response.json(
        201,
        {
            "account_sid": ACCOUNT_SID,
            "sid": sid,
            "status": "queued",
            "to": to,
            "from": form.get("From", [None])[0],
            "messaging_service_sid": form.get("MessagingServiceSid", [None])[0],
            "body": body,
            "num_segments": "1",
            "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
        },
    )


@pytest.fixture
async def provider() -> AsyncIterator[HttpFake]:
    async with HttpFake(twilio) as fake:
        yield fake


def channel_for(fake: HttpFake, **extra: str) -> SmsChannel:
    options = {
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from": SENDER,
        "base_url": fake.url,
        "price_per_segment_micros": "75000",
        "currency": "chf",
        "rate_per_s": "1000",
        "burst": "100",
    }
    return SmsChannel.from_options(options | extra)


def sms(to: str, text: str = "Ihr Paket kommt Dienstag 14-16 Uhr.") -> Message:
    return Message(idempotency_key=f"n:{to}", to=PhoneNumber(to), subject="", text=text)


async def test_sends_with_basic_auth_and_form_fields(provider: HttpFake) -> None:
    channel = channel_for(provider)
    try:
        [result] = await channel.send([sms("+41791234567", "€" * 81)])
    finally:
        await channel.aclose()

    assert isinstance(result, Accepted)
    assert result.provider_message_id.startswith("SM")
    assert (result.segments, result.cost_micros, result.currency) == (2, 150_000, "CHF")
    [request] = provider.requests
    assert request.form() == {"To": ["+41791234567"], "From": [SENDER], "Body": ["€" * 81]}


async def test_messaging_service_sid_replaces_from(provider: HttpFake) -> None:
    channel = SmsChannel.from_options(
        {
            "account_sid": ACCOUNT_SID,
            "auth_token": AUTH_TOKEN,
            "messaging_service_sid": "MG" + "a" * 32,
            "base_url": provider.url,
        }
    )
    try:
        [result] = await channel.send([sms("+41791234567")])
    finally:
        await channel.aclose()
    assert isinstance(result, Accepted)
    assert result.cost_micros == 0
    assert provider.requests[0].form()["MessagingServiceSid"] == ["MG" + "a" * 32]


async def test_provider_errors_are_mapped(provider: HttpFake) -> None:
    channel = channel_for(provider)
    try:
        results = await channel.send([sms(number) for number in FAILING])
    finally:
        await channel.aclose()

    assert results == [
        PermanentFailure("sms: HTTP 400 code 21211", destination_invalid=True),
        PermanentFailure("sms: HTTP 400 code 21610", destination_invalid=True),
        PermanentFailure("sms: HTTP 400 code 21614", destination_invalid=True),
        TransientFailure("sms: HTTP 429 code 20429", retry_after_s=7.0),
        TransientFailure("sms: HTTP 500 code 20500"),
        PermanentFailure("sms: HTTP 400 code 21408"),
    ]


async def test_wrong_credentials_wait_for_the_operator(provider: HttpFake) -> None:
    channel = channel_for(provider, auth_token="wrong")
    try:
        results = await channel.send([sms("+41791234567"), sms("+41797654321")])
    finally:
        await channel.aclose()
    # Not the recipients' fault: no fallback for everyone while a token is rotated.
    expected = TransientFailure(
        "sms: HTTP 401 code 20003: the provider refused account_sid/auth_token",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert results == [expected] * 2


async def test_local_checks_spare_the_provider(provider: HttpFake) -> None:
    channel = channel_for(provider, max_segments="2")
    try:
        results = await channel.send(
            [
                sms("0791234567"),  # not E.164
                sms("+4179123"),  # too short to be valid
                sms("+41791234567", "   "),
                sms("+41791234567", "x" * 307),  # three segments
                Message("k", EmailAddress("a@b.example"), "", "text"),
            ]
        )
    finally:
        await channel.aclose()

    assert (
        results[0]
        == results[1]
        == PermanentFailure("sms: not a valid E.164 number", destination_invalid=True)
    )
    assert results[2] == PermanentFailure("sms: empty text")
    assert results[3] == PermanentFailure("sms: 3 segments exceed max_segments")
    assert isinstance(results[4], PermanentFailure)
    assert provider.requests == []


async def test_unreachable_provider_is_transient(provider: HttpFake) -> None:
    url = provider.url
    await provider.stop()
    channel = channel_for(provider, base_url=url)
    try:
        [result] = await channel.send([sms("+41791234567")])
    finally:
        await channel.aclose()
    assert result == TransientFailure("sms: ConnectError")


async def test_token_bucket_spaces_sends_at_the_configured_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate_per_s=2.0, burst=3, monotonic_s=lambda: now[0], sleep=fake_sleep)
    for _ in range(7):
        await bucket.acquire()

    # Three from the burst, then one every half second.
    assert slept == [0.5, 0.5, 0.5, 0.5]
    assert now[0] == 2.0


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"from": ""}, "'from'"),
        ({"messaging_service_sid": "MGx"}, "'from'"),
        ({"from": "12345"}, "'from'"),
        ({"base_url": "ftp://x"}, "'base_url'"),
        ({"currency": "euro"}, "'currency'"),
        ({"rate_per_s": "0"}, "'rate_per_s'"),
        ({"auth_token": ""}, "'auth_token'"),
    ],
)
def test_bad_options_name_the_option(extra: dict[str, str], named: str) -> None:
    options = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from": SENDER} | extra
    with pytest.raises(ChannelConfigError, match=named):
        SmsChannel.from_options(options)
