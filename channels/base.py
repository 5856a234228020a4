"""The one interface every channel implements, and the values that cross it.

A channel knows its protocol (SMTP, an SMS provider's REST API, FCM, Web Push) and nothing of
parcels, Redis or gRPC: the gateway hands it rendered messages and gets one typed result per message,
in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, Self, runtime_checkable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmailAddress:
    address: str
    display_name: str = ""


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A phone number in E.164 form, e.g. ``+41791234567``."""

    e164: str


@dataclass(frozen=True, slots=True)
class FcmToken:
    token: str


@dataclass(frozen=True, slots=True)
class ApnsToken:
    device_token: str
    bundle_id: str
    sandbox: bool = False


@dataclass(frozen=True, slots=True)
class WebPushSubscription:
    endpoint: str
    p256dh: str
    auth: str


Destination = EmailAddress | PhoneNumber | FcmToken | ApnsToken | WebPushSubscription


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered message for one destination.

    ``subject`` is the email subject or the push title; ``text`` the plain-text body, the SMS text or
    the push body; ``html`` the email's HTML part.
    """

    # notice id + version + channel: the provider gets it where it accepts one (Message-ID, SMS
    # client reference, push collapse data), so a resend after a crash is recognisable.
    idempotency_key: str
    to: Destination
    subject: str
    text: str
    html: str = ""
    # Push payload data, e.g. {"deep_link": "relais://parcel/123"}.
    data: Mapping[str, str] = field(default_factory=dict)
    # Push: a newer message with the same key replaces the older one on the device.
    collapse_key: str = ""
    # Push: the message is worthless after this instant (TTL); None means the provider's default.
    expires_at: datetime | None = None
    # BCP 47 language of the content (Content-Language, SMS encoding hints).
    locale: str = "en"


@dataclass(frozen=True, slots=True)
class Accepted:
    """The provider took the message."""

    provider_message_id: str
    # SMS only: segments billed and the estimated cost in micro-units of `currency`.
    segments: int = 0
    cost_micros: int = 0
    currency: str = ""


@dataclass(frozen=True, slots=True)
class TransientFailure:
    """Try again later (timeout, 5xx, rate limited); ``retry_after_s`` when the provider said."""

    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    """Sending again will not help. ``destination_invalid`` marks a dead address (unregistered push
    token, hard bounce, unreachable number): the gateway removes it and falls back to the next channel.
    """

    reason: str
    destination_invalid: bool = False


SendResult = Accepted | TransientFailure | PermanentFailure

# How long a message waits when the provider refuses the channel's own credentials or configuration
# (a rotated key, a skewed clock, a DMARC record, a relay that will not relay). That is the operator's
# problem, not the recipient's: falling back would move every recipient to the next (maybe paid)
# channel, and retrying sooner only spends attempts before the fix.
CONFIGURATION_RETRY_AFTER_S = 300.0


def configuration_problem(reason: str) -> TransientFailure:
    """The result for a refusal of the channel's configuration. ``reason`` names the problem for the
    operator and, like every reason, nothing personal."""
    return TransientFailure(reason, retry_after_s=CONFIGURATION_RETRY_AFTER_S)


async def result_of(channel: str, sending: Awaitable[SendResult]) -> SendResult:
    """One message's result, also when its send raised what the channel should have turned into a
    result (a bug, an error nobody foresaw): a ``TransientFailure`` for that message alone. Sent
    together, the other messages keep their own results, which the exception would otherwise take
    with it (those that went out would be reported failed and sent again). Only the exception's
    type is logged and reported: its text may quote the address."""
    try:
        return await sending
    except Exception as exc:
        log.warning("%s: sending one message raised %s", channel, type(exc).__name__)
        return TransientFailure(f"{channel}: {type(exc).__name__}")


@runtime_checkable
class Channel(Protocol):
    """A way of reaching a person. Registered under the entry-point group ``relais.channels``."""

    name: str

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        """Build the channel from its options (``RELAIS_CHANNEL_<NAME>_<OPTION>`` variables,
        lower-cased, without the prefix). Raises ``ChannelConfigError`` naming a bad option."""
        ...

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        """Send the messages; one result per message, in the same order. Never raises for a
        message's failure: that is a result."""
        ...

    async def aclose(self) -> None:
        """Release connections. The channel is not used afterwards."""
        ...
