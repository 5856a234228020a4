"""Alert digests: each merchant team gets the alerts opened since its last digest, at an interval, in
one message through the channel it chose (a webhook POST or an email), never one message per parcel.

Alerts enter each shard's ``al-feed:{s}`` stream as they open (in the same script that opens them).
Any number of processes run a :class:`DigestSender`, each under its own consumer name (host and pid)
in the ``digest`` consumer group: a new entry goes to one of them only. A round takes over the entries
other consumers left unacknowledged longer than ``min_idle_ms`` (``XAUTOCLAIM``: their process died,
or their digest failed and waits for a retry), then reads its own unacknowledged entries and new
ones, groups the alerts by (merchant, team), sends one digest per group and acknowledges its entries
as soon as it went out. While a round is sending it renews its claim on the entries still to send,
so a slow round is never taken over by a live peer and no digest goes out twice. A digest that
fails stays pending and is sent again next round (by this process or, after ``min_idle_ms``, by
another), with the same ``Idempotency-Key`` (webhook) or Message-ID (email) when nothing new joined
it. Alerts of a team with no destination are acknowledged and dropped.

Errors: :class:`DigestDeliveryError` (also a ``ConnectionError``) wraps what httpx or aiosmtplib
raised, at this edge only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib
import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import StreamIdT
from relais.v1 import alerts_pb2, types_pb2

from common import keys
from common.errors import RelaisError
from common.redis_client import default_consumer_name, forget_gone_consumers
from common.settings import AlertSettings
from engine.alert_rules import AlertConfig, DestinationKind, Team, kind_name, team_name

log = logging.getLogger(__name__)

READ_COUNT = 10_000
# How long an entry may stay unacknowledged under one consumer before another takes it over: far
# longer than a send (a live consumer renews its claim between sends, see ``run_once``), so only a
# dead consumer's or a failed digest's entries move; a crash delays its digests by this much.
DEFAULT_MIN_IDLE_MS = 600_000


class DigestDeliveryError(RelaisError, ConnectionError):
    """A digest could not be handed over; it is sent again next round."""


@dataclass(frozen=True)
class Digest:
    merchant_id: str
    team: Team
    alerts: tuple[alerts_pb2.Alert, ...]

    @property
    def digest_id(self) -> str:
        """Stable for the same alerts: a retried webhook carries the same Idempotency-Key."""
        ids = "\n".join(sorted(a.alert_id for a in self.alerts))
        return hashlib.sha256(f"{self.merchant_id}\n{self.team}\n{ids}".encode()).hexdigest()[:32]

    def as_json(self) -> dict[str, Any]:
        return {
            "digest_id": self.digest_id,
            "merchant_id": self.merchant_id,
            "team": team_name(self.team),
            "count": len(self.alerts),
            "alerts": [
                {
                    "alert_id": a.alert_id,
                    "parcel_id": a.parcel_id,
                    "kind": kind_name(a.kind),
                    "summary": a.summary,
                    "opened_at": a.opened_at.ToDatetime(tzinfo=UTC).isoformat(),
                    "parcel_status": types_pb2.TrackingStatus.Name(a.parcel_status).removeprefix(
                        "TRACKING_STATUS_"
                    ),
                }
                for a in self.alerts
            ],
        }

    def subject(self) -> str:
        team = team_name(self.team).replace("_", " ").lower()
        plural = "alert" if len(self.alerts) == 1 else "alerts"
        return f"relais: {len(self.alerts)} new {plural} for {team} ({self.merchant_id})"

    def text(self) -> str:
        lines = [self.subject(), ""]
        for a in self.alerts:
            opened = a.opened_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M UTC")
            lines.append(f"- {opened}  {a.parcel_id}  {kind_name(a.kind)}: {a.summary}  [{a.alert_id}]")
        return "\n".join(lines) + "\n"


class DigestSink(Protocol):
    """Hands one digest to one team address; raises :class:`DigestDeliveryError` when it cannot."""

    async def send(self, digest: Digest, address: str) -> None: ...


class WebhookSink:
    """POSTs the digest as JSON; any 2xx is success."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def send(self, digest: Digest, address: str) -> None:
        headers = {"Idempotency-Key": digest.digest_id}
        try:
            response = await self._client.post(address, json=digest.as_json(), headers=headers)
        except httpx.HTTPError as exc:
            raise DigestDeliveryError(f"webhook: {type(exc).__name__}") from exc
        if not response.is_success:
            raise DigestDeliveryError(f"webhook answered {response.status_code}")


class EmailSink:
    """Sends the digest as a plain-text email through the alerts' SMTP relay (``RELAIS_ALERTS_SMTP_*``):
    its TLS mode, CA bundle and login."""

    def __init__(self, settings: AlertSettings) -> None:
        self._sender = settings.email_from
        tls = settings.smtp_tls
        context = ssl.create_default_context(cafile=settings.smtp_ca_file) if settings.smtp_ca_file else None
        self._connection: dict[str, Any] = {
            "hostname": settings.smtp_host,
            "port": settings.smtp_port,
            "timeout": settings.send_timeout_s,
            "use_tls": tls == "implicit",
            # aiosmtplib: True requires STARTTLS, None uses it when offered, False never does.
            "start_tls": {"starttls": True, "opportunistic": None}.get(tls, False),
            "tls_context": context,
            "username": settings.smtp_username or None,
            "password": settings.smtp_password or None,
        }

    def message(self, digest: Digest, address: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self._sender
        msg["To"] = address
        msg["Subject"] = digest.subject()
        msg["Message-ID"] = f"<digest-{digest.digest_id}@relais>"
        msg.set_content(digest.text())
        return msg

    async def send(self, digest: Digest, address: str) -> None:
        try:
            await aiosmtplib.send(self.message(digest, address), **self._connection)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DigestDeliveryError(f"email: {type(exc).__name__}") from exc


@dataclass(frozen=True)
class DigestRound:
    """What one round did."""

    digests_sent: int = 0
    alerts_sent: int = 0
    digests_failed: int = 0
    # Alerts of teams without a destination, acknowledged and dropped.
    alerts_dropped: int = 0


@dataclass(frozen=True)
class _Entry:
    shard: int
    entry_id: bytes
    alert: alerts_pb2.Alert


@dataclass(frozen=True)
class _Batch:
    """What one read returned: the alerts, and the ids of pending entries trimmed from the stream
    meanwhile (their alert is gone; they are only acknowledged, so they leave the pending list)."""

    entries: list[_Entry]
    gone: list[tuple[int, bytes]]


class DigestSender:
    def __init__(
        self,
        redis: Redis,
        *,
        shards: int,
        config: AlertConfig,
        sinks: Mapping[DestinationKind, DigestSink],
        consumer: str | None = None,
        min_idle_ms: int = DEFAULT_MIN_IDLE_MS,
    ) -> None:
        if min_idle_ms <= 0:
            raise ValueError("min_idle_ms must be positive")
        self._redis = redis
        self._shards = shards
        self._config = config
        self._sinks = sinks
        # One name per process: a name shared by two processes would let each re-read the other's
        # unacknowledged entries and send their digests again.
        self._consumer = consumer or default_consumer_name()
        self._min_idle_ms = min_idle_ms
        self._groups_ready = False

    @property
    def consumer(self) -> str:
        return self._consumer

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for shard in range(self._shards):
            # BUSYGROUP: another process created it first.
            with contextlib.suppress(ResponseError):
                await self._redis.xgroup_create(
                    keys.alert_feed(shard), keys.ALERT_FEED_GROUP, id="0", mkstream=True
                )
        feeds = (keys.alert_feed(shard) for shard in range(self._shards))
        await forget_gone_consumers(self._redis, feeds, keys.ALERT_FEED_GROUP)
        self._groups_ready = True

    async def _read(self) -> _Batch:
        """Entries other consumers left idle (taken over), this consumer's pending entries (failed
        before, or just taken over) and new ones, all shards, one round trip. Reading its pending
        entries again resets their idle time, which keeps peers from taking them over meanwhile."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in range(self._shards):
                feed = keys.alert_feed(shard)
                pipe.xautoclaim(
                    feed,
                    keys.ALERT_FEED_GROUP,
                    self._consumer,
                    self._min_idle_ms,
                    start_id="0-0",
                    count=READ_COUNT,
                    justid=True,
                )
                for start in ("0", ">"):
                    pipe.xreadgroup(keys.ALERT_FEED_GROUP, self._consumer, {feed: start}, count=READ_COUNT)
            replies: list[Any] = await pipe.execute()
        batch = _Batch([], [])
        for i, reply in enumerate(replies):
            if i % 3 == 0:  # the XAUTOCLAIM: what it took over comes back in the pending read after it
                continue
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    if fields:
                        alert = alerts_pb2.Alert.FromString(fields[b"a"])
                        batch.entries.append(_Entry(i // 3, entry_id, alert))
                    else:
                        batch.gone.append((i // 3, entry_id))
        return batch

    async def run_once(self) -> DigestRound:
        await self._ensure_groups()
        batch = await self._read()
        groups: dict[tuple[str, Team], list[_Entry]] = {}
        for entry in batch.entries:
            groups.setdefault((entry.alert.merchant_id, entry.alert.team), []).append(entry)
        todo = list(groups.items())
        done: list[tuple[int, bytes]] = list(batch.gone)
        sent = alerts_sent = failed = dropped = 0
        renewed = time.monotonic()
        for i, ((merchant_id, team), group) in enumerate(todo):
            if (time.monotonic() - renewed) * 1000 > self._min_idle_ms / 3:
                # Sends have taken a while: renew the claim on what is still to send before a peer
                # could see it idle and send it too.
                await self._renew([e for _, rest in todo[i:] for e in rest])
                renewed = time.monotonic()
            destination = self._config.destination(merchant_id, team)
            sink = self._sinks.get(destination.kind) if destination is not None else None
            if destination is None or sink is None:
                dropped += len(group)
                done += [(e.shard, e.entry_id) for e in group]
                continue
            ordered = sorted(group, key=lambda e: (e.alert.opened_at.ToMilliseconds(), e.alert.alert_id))
            digest = Digest(merchant_id, team, tuple(e.alert for e in ordered))
            try:
                await sink.send(digest, destination.address)
            except DigestDeliveryError as exc:
                failed += 1
                log.warning(
                    "alert digest %s for %s/%s not sent: %s",
                    digest.digest_id,
                    merchant_id,
                    team_name(team),
                    exc,
                )
                continue
            sent += 1
            alerts_sent += len(group)
            # At once, not with the round's others: a crash or a takeover later in the round must
            # not send this digest again.
            await self._ack([(e.shard, e.entry_id) for e in group])
        await self._ack(done)
        return DigestRound(sent, alerts_sent, failed, dropped)

    async def _renew(self, entries: Sequence[_Entry]) -> None:
        """Reset the idle time of these entries, still this consumer's, in one round trip."""
        by_shard: dict[int, list[StreamIdT]] = {}
        for entry in entries:
            by_shard.setdefault(entry.shard, []).append(entry.entry_id)
        if not by_shard:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard, ids in by_shard.items():
                pipe.xclaim(
                    keys.alert_feed(shard), keys.ALERT_FEED_GROUP, self._consumer, 0, ids, justid=True
                )
            await pipe.execute()

    async def _ack(self, entries: Sequence[tuple[int, bytes]]) -> None:
        if not entries:
            return
        by_shard: dict[int, list[bytes]] = {}
        for shard, entry_id in entries:
            by_shard.setdefault(shard, []).append(entry_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard, ids in by_shard.items():
                pipe.xack(keys.alert_feed(shard), keys.ALERT_FEED_GROUP, *ids)
                pipe.xdel(keys.alert_feed(shard), *ids)
            await pipe.execute()

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """A round every ``interval_s`` until ``stop`` is set; a failed round is logged, not fatal."""
        while not stop.is_set():
            try:
                outcome = await self.run_once()
                if outcome.digests_sent or outcome.digests_failed:
                    log.info("alert digests: %s", outcome)
            except Exception:
                log.exception("alert digest round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)


def default_sinks(settings: AlertSettings, client: httpx.AsyncClient) -> dict[DestinationKind, DigestSink]:
    """Webhook through ``client`` (its timeout applies), email through the configured relay."""
    return {DestinationKind.WEBHOOK: WebhookSink(client), DestinationKind.EMAIL: EmailSink(settings)}
