"""At most one send per idempotency key (notice id + version + channel).

Before a send the gateway claims the key: ``SET key sending NX GET PX <2 x send timeout>``, for a
whole shard's keys in one ``idem_claim.lua`` call pipelined with the batch's other commands. After the
provider accepted, the settle script sets it to ``sent`` for the retention period. A gateway that dies
mid-send leaves its outbox entry to another gateway after two send timeouts, and its ``sending``
claim until it expires: the survivor puts such a notice back in the due set until then, and sends it only
if the claim expired unsent (at most once more: the message in flight at the crash). A key already
``sent`` is never sent again. The key also travels to the provider (``Message.idempotency_key``) so a provider
that deduplicates makes the rare resend invisible.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from channels.base import ApnsToken, Destination, EmailAddress, FcmToken, PhoneNumber, WebPushSubscription
from common import keys
from common.keys import channel_name
from gateway.routing import ChannelKind, single_address
from gateway.scripts import LuaScript

# The value of a key whose message went out (set by the settle script).
SENT = b"sent"


class Claim(enum.Enum):
    CLAIMED = "claimed"  # ours: send it
    SENT = "sent"  # sent before: never again
    IN_FLIGHT = "in_flight"  # another gateway is sending it right now


def _fingerprint(to: Destination) -> str:
    """A short stable digest of an address (no personal data in the key itself)."""
    match to:
        case FcmToken(token):
            raw = token
        case WebPushSubscription(endpoint, _, _):
            raw = endpoint
        case ApnsToken(device_token, _, _):
            raw = device_token
        case EmailAddress(address, _):
            raw = address
        case PhoneNumber(e164):
            raw = e164
    return hashlib.blake2b(raw.encode(), digest_size=6).hexdigest()


def idempotency_key(notice_id: str, version: int, channel: ChannelKind, to: Destination | None = None) -> str:
    """``<notice_id>:<version>:<channel>``; push to several devices adds ``:<address digest>`` so each
    device's message is claimed on its own."""
    key = f"{notice_id}:{version}:{channel_name(channel)}"
    return key if to is None or single_address(channel) else f"{key}:{_fingerprint(to)}"


# Replies of ``idem_claim.lua``, per key.
_CLAIMS = (Claim.CLAIMED, Claim.SENT, Claim.IN_FLIGHT)


class Claims:
    """Claims the keys of a batch: one ``idem_claim.lua`` call per shard, queued on a pipeline."""

    def __init__(self, redis: Redis, lease_ms: int) -> None:
        self._script = LuaScript(redis, "idem_claim")
        self._lease_ms = lease_ms

    async def load(self) -> None:
        await self._script.load()

    def queue(self, pipe: Pipeline, shard: int, idempotency_keys: Sequence[str]) -> None:
        """Queue the claim of ``idempotency_keys`` (all of ``shard``); its reply goes to ``parse``."""
        self._script.queue(pipe, [keys.idempotency(shard, key) for key in idempotency_keys], [self._lease_ms])

    @staticmethod
    def parse(reply: Sequence[int]) -> list[Claim]:
        return [_CLAIMS[code] for code in reply]
