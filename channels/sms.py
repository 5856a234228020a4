"""SMS through a provider's REST API, in the shape of Twilio's Messages API:
``POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json``, form fields ``To``, ``From``
(or ``MessagingServiceSid``) and ``Body``, HTTP Basic auth ``account_sid:auth_token``; errors come
back as JSON with a numeric ``code``.

Options (``RELAIS_CHANNEL_SMS_<OPTION>``): ``account_sid`` and ``auth_token`` (required), ``from``
(an E.164 sender) or ``messaging_service_sid`` (exactly one), ``base_url``
(``https://api.twilio.com``), ``price_per_segment_micros`` (0) and ``currency`` (``USD``) for the
cost estimate, ``max_segments`` (10: longer texts are refused, they cost too much), ``rate_per_s``
(10) and ``burst`` (10) for the client-side token bucket, ``max_concurrency`` (8), ``timeout_s`` (10).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

import httpx
import phonenumbers

from channels.base import (
    Accepted,
    Message,
    PermanentFailure,
    PhoneNumber,
    SendResult,
    TransientFailure,
    configuration_problem,
)
from channels.http_common import new_client, retry_after_s, send_bounded, status_failure, transport_failure
from channels.options import Options
from channels.ratelimit import TokenBucket
from channels.sms_encoding import split

# Provider error codes that condemn the number itself: invalid 'To' (21211), the recipient replied
# STOP (21610), a landline that cannot take SMS (21614). The gateway drops the number and falls back.
DEAD_NUMBER_CODES = frozenset({21211, 21610, 21614})
# "Too many requests" in the body, sometimes with another HTTP status.
RATE_LIMITED_CODE = 20429
# Authentication failed (HTTP 401): a wrong account_sid/auth_token, e.g. mid-rotation. Every message
# would fail alike, so it waits for the operator instead of falling back for each recipient.
AUTH_FAILED_CODE = 20003
DEFAULT_BASE_URL = "https://api.twilio.com"


def is_e164(number: str) -> bool:
    if not number.startswith("+"):
        return False
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return False
    canonical = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return canonical == number and phonenumbers.is_valid_number(parsed)


@dataclass(frozen=True, slots=True)
class SmsConfig:
    account_sid: str
    auth_token: str = field(repr=False)
    sender: str = ""
    messaging_service_sid: str = ""
    base_url: str = DEFAULT_BASE_URL
    price_per_segment_micros: int = 0
    currency: str = "USD"
    max_segments: int = 10
    rate_per_s: float = 10.0
    burst: int = 10
    max_concurrency: int = 8
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if bool(self.sender) == bool(self.messaging_service_sid):
            raise ValueError("exactly one of sender and messaging_service_sid")

    @property
    def messages_path(self) -> str:
        return f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"


def config_from_options(options: Mapping[str, str]) -> SmsConfig:
    opts = Options("sms", options)
    sender, service = opts.text("from"), opts.text("messaging_service_sid")
    if bool(sender) == bool(service):
        raise opts.error("from", "or 'messaging_service_sid' is required (exactly one of them)")
    if sender and not is_e164(sender):
        raise opts.error("from", "is not a valid E.164 number")
    base_url = opts.text("base_url", DEFAULT_BASE_URL).rstrip("/")
    if not base_url.startswith(("https://", "http://")):
        raise opts.error("base_url", "must be an http(s) URL")
    currency = opts.text("currency", "USD").upper()
    if len(currency) != 3 or not currency.isalpha():
        raise opts.error("currency", "is not an ISO 4217 code")
    config = SmsConfig(
        account_sid=opts.required("account_sid"),
        auth_token=opts.required("auth_token"),
        sender=sender,
        messaging_service_sid=service,
        base_url=base_url,
        price_per_segment_micros=opts.integer("price_per_segment_micros", 0, low=0, high=10**9),
        currency=currency,
        max_segments=opts.integer("max_segments", 10, low=1, high=255),
        rate_per_s=opts.number("rate_per_s", 10.0, low=0.01, high=10_000.0),
        burst=opts.integer("burst", 10, low=1, high=10_000),
        max_concurrency=opts.integer("max_concurrency", 8, low=1, high=1024),
        timeout_s=opts.number("timeout_s", 10.0, low=0.1, high=600.0),
    )
    opts.finish()
    return config


def _error_code(response: httpx.Response) -> int | None:
    try:
        payload = response.json()
    except ValueError:
        return None
    code = payload.get("code") if isinstance(payload, dict) else None
    return code if isinstance(code, int) else None


def provider_failure(response: httpx.Response) -> SendResult:
    """Map an error response. The provider's ``message`` is left out: it quotes the number."""
    code = _error_code(response)
    detail = f"code {code}" if code is not None else ""
    if code == RATE_LIMITED_CODE:
        return TransientFailure(f"sms: HTTP {response.status_code} {detail}", retry_after_s(response))
    if code in DEAD_NUMBER_CODES:
        return PermanentFailure(f"sms: HTTP {response.status_code} {detail}", destination_invalid=True)
    if code == AUTH_FAILED_CODE or response.status_code == 401:
        reason = f"sms: HTTP {response.status_code}{f' {detail}' if detail else ''}"
        return configuration_problem(f"{reason}: the provider refused account_sid/auth_token")
    return status_failure("sms", response, detail)


def _sid(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return ""
    return str(payload.get("sid", "")) if isinstance(payload, dict) else ""


class SmsChannel:
    name = "sms"

    def __init__(
        self,
        config: SmsConfig,
        *,
        bucket: TokenBucket | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._bucket = bucket or TokenBucket(config.rate_per_s, config.burst)
        self._client = new_client(
            base_url=config.base_url,
            timeout_s=config.timeout_s,
            max_connections=config.max_concurrency,
            tls_context=tls_context,
        )
        self._auth = httpx.BasicAuth(config.account_sid, config.auth_token)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(config_from_options(options))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        return await send_bounded(self.name, messages, self._send_one, self.config.max_concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send_one(self, message: Message) -> SendResult:
        if not isinstance(message.to, PhoneNumber):
            return PermanentFailure(f"sms: cannot reach a {type(message.to).__name__}")
        if not is_e164(message.to.e164):
            return PermanentFailure("sms: not a valid E.164 number", destination_invalid=True)
        if not message.text.strip():
            return PermanentFailure("sms: empty text")
        parts = split(message.text)
        if parts.count > self.config.max_segments:
            return PermanentFailure(f"sms: {parts.count} segments exceed max_segments")
        form = {"To": message.to.e164, "Body": message.text}
        if self.config.sender:
            form["From"] = self.config.sender
        else:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        await self._bucket.acquire()
        try:
            response = await self._client.post(self.config.messages_path, data=form, auth=self._auth)
        except httpx.HTTPError as exc:
            return transport_failure("sms", exc)
        if response.status_code not in {200, 201}:
            return provider_failure(response)
        return Accepted(
            # The message went out even if the body is odd: never report it as failed.
            provider_message_id=_sid(response),
            segments=parts.count,
            cost_micros=parts.cost_micros(self.config.price_per_segment_micros),
            currency=self.config.currency,
        )
