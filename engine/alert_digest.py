"""Alert digests: each merchant team gets the alerts opened since its last digest, at an interval, in
one message through the channel it chose (a webhook POST or an email), never one message per parcel.

Alerts enter each shard's ``al-feed:{s}`` stream as they open (in the same script that opens them).
A round of the :class:`DigestSender` reads every shard's feed through the ``digest`` consumer group
(its own unacknowledged entries first, then new ones), groups the alerts by (merchant, team), sends
one digest per group and acknowledges the entries of the digests that went out. A digest that fails
stays pending and is sent again next round, with the same ``Idempotency-Key`` for a webhook when
nothing new joined it. Alerts of a team with no destination are acknowledged and dropped.

Errors: :class:`DigestDeliveryError` (also a ``ConnectionError``) wraps what httpx or aiosmtplib
raised, at this edge only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib
import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from relais.v1 import alerts_pb2, types_pb2

from common import keys
from common.errors import RelaisError
from common.settings import AlertSettings
from engine.alert_rules import AlertConfig, DestinationKind, Team, kind_name, team_name

log = logging.getLogger(__name__)

READ_COUNT = 10_000


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
    """Sends the digest as a plain-text email through an SMTP relay."""

    def __init__(self, host: str, port: int, sender: str, *, timeout_s: float = 10.0) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._timeout_s = timeout_s

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
            await aiosmtplib.send(
                self.message(digest, address), hostname=self._host, port=self._port, timeout=self._timeout_s
            )
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


class DigestSender:
    def __init__(
        self,
        redis: Redis,
        *,
        shards: int,
        config: AlertConfig,
        sinks: Mapping[DestinationKind, DigestSink],
        consumer: str = "digest-1",
    ) -> None:
        self._redis = redis
        self._shards = shards
        self._config = config
        self._sinks = sinks
        self._consumer = consumer
        self._groups_ready = False

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for shard in range(self._shards):
            # BUSYGROUP: another process created it first.
            with contextlib.suppress(ResponseError):
                await self._redis.xgroup_create(
                    keys.alert_feed(shard), keys.ALERT_FEED_GROUP, id="0", mkstream=True
                )
        self._groups_ready = True

    async def _read(self) -> list[_Entry]:
        """This consumer's pending entries (failed before) and new ones, all shards, one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in range(self._shards):
                for start in ("0", ">"):
                    pipe.xreadgroup(
                        keys.ALERT_FEED_GROUP,
                        self._consumer,
                        {keys.alert_feed(shard): start},
                        count=READ_COUNT,
                    )
            replies: list[Any] = await pipe.execute()
        entries: list[_Entry] = []
        for i, reply in enumerate(replies):
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    if fields:  # a pending entry trimmed from the stream comes back empty
                        entries.append(_Entry(i // 2, entry_id, alerts_pb2.Alert.FromString(fields[b"a"])))
        return entries

    async def run_once(self) -> DigestRound:
        await self._ensure_groups()
        entries = await self._read()
        groups: dict[tuple[str, Team], list[_Entry]] = {}
        for entry in entries:
            groups.setdefault((entry.alert.merchant_id, entry.alert.team), []).append(entry)
        done: list[_Entry] = []
        sent = alerts_sent = failed = dropped = 0
        for (merchant_id, team), group in groups.items():
            destination = self._config.destination(merchant_id, team)
            sink = self._sinks.get(destination.kind) if destination is not None else None
            if destination is None or sink is None:
                dropped += len(group)
                done += group
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
            done += group
        await self._ack(done)
        return DigestRound(sent, alerts_sent, failed, dropped)

    async def _ack(self, entries: Sequence[_Entry]) -> None:
        if not entries:
            return
        by_shard: dict[int, list[bytes]] = {}
        for entry in entries:
            by_shard.setdefault(entry.shard, []).append(entry.entry_id)
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
    email = EmailSink(
        settings.smtp_host, settings.smtp_port, settings.email_from, timeout_s=settings.send_timeout_s
    )
    return {DestinationKind.WEBHOOK: WebhookSink(client), DestinationKind.EMAIL: email}
