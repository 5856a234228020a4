"""Counters per merchant and UTC day: parcels shipped and delivered (on time or late), exceptions by
reason, alerts opened and resolved by rule, notices sent by kind and channel, SMS segments and cost.

Each counted change yields ``Increment`` values (key, field, amount) that the code making the change
adds to the very pipeline or script that makes it, so a count never drifts from what happened. Every
increment touches three hashes of the parcel's shard: the merchant's day, all merchants' day
(merchant ``*``) and the shard's all-time totals, which the OpenTelemetry export reads.

Field names: ``shipped``, ``delivered``, ``on_time``, ``late``, ``exc:<REASON>``,
``al_open:<KIND>``, ``al_res:<KIND>``, ``notice:<KIND>/<channel>``, ``sms_segments``,
``sms_cost:<CURRENCY>`` (minor units).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from relais.v1 import alerts_pb2, types_pb2

from common import keys

ALL_MERCHANTS = "*"
# Daily hashes are kept a little over a year, for year-on-year comparisons; totals never expire.
DAY_RETENTION_MS = 400 * 24 * 3_600_000

SHIPPED = "shipped"
DELIVERED = "delivered"
ON_TIME = "on_time"
LATE = "late"
SMS_SEGMENTS = "sms_segments"
EXCEPTION_PREFIX = "exc:"
ALERT_OPENED_PREFIX = "al_open:"
ALERT_RESOLVED_PREFIX = "al_res:"
NOTICE_PREFIX = "notice:"
SMS_COST_PREFIX = "sms_cost:"


@dataclass(frozen=True)
class Increment:
    key: str
    field: str
    amount: int
    # Milliseconds the hash is kept after this write; None: forever.
    ttl_ms: int | None


def day_of(at_ms: int) -> str:
    """The UTC day of an instant, ``YYYYMMDD``."""
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y%m%d")


def _increments(shard: int, merchant_id: str, at_ms: int, counts: Mapping[str, int]) -> list[Increment]:
    day = day_of(at_ms)
    out: list[Increment] = []
    for field, amount in counts.items():
        if amount == 0:
            continue
        if merchant_id:
            out.append(Increment(keys.stats(shard, merchant_id, day), field, amount, DAY_RETENTION_MS))
        out.append(Increment(keys.stats(shard, ALL_MERCHANTS, day), field, amount, DAY_RETENTION_MS))
        out.append(Increment(keys.stats_total(shard), field, amount, None))
    return out


def shipped(shard: int, merchant_id: str, at_ms: int) -> list[Increment]:
    """The parcel's first carrier event (counted on the day it happened)."""
    return _increments(shard, merchant_id, at_ms, {SHIPPED: 1})


def delivered(shard: int, merchant_id: str, at_ms: int, promised_date: date | None) -> list[Increment]:
    """Delivered (or collected); on time when the UTC delivery day is not after the promised date."""
    counts = {DELIVERED: 1}
    if promised_date is not None:
        on_time = datetime.fromtimestamp(at_ms / 1000, tz=UTC).date() <= promised_date
        counts[ON_TIME if on_time else LATE] = 1
    return _increments(shard, merchant_id, at_ms, counts)


def exception(
    shard: int, merchant_id: str, at_ms: int, reason: types_pb2.ExceptionReason.ValueType
) -> list[Increment]:
    """An EXCEPTION or failed attempt event, by reason."""
    name = types_pb2.ExceptionReason.Name(reason).removeprefix("EXCEPTION_REASON_")
    return _increments(shard, merchant_id, at_ms, {EXCEPTION_PREFIX + name: 1})


def alert(
    shard: int, merchant_id: str, at_ms: int, kind: alerts_pb2.AlertKind.ValueType, *, resolved: bool = False
) -> list[Increment]:
    """An alert opened (or, with ``resolved``, resolved), by rule."""
    name = alerts_pb2.AlertKind.Name(kind).removeprefix("ALERT_KIND_")
    prefix = ALERT_RESOLVED_PREFIX if resolved else ALERT_OPENED_PREFIX
    return _increments(shard, merchant_id, at_ms, {prefix + name: 1})


def notice_sent(
    shard: int,
    merchant_id: str,
    at_ms: int,
    kind: types_pb2.NoticeKind.ValueType,
    channel: types_pb2.Channel.ValueType,
    *,
    sms_segments: int = 0,
    sms_cost: types_pb2.Money | None = None,
) -> list[Increment]:
    """A notice accepted by a channel's provider: for the gateway, with the parcel's shard."""
    label = (
        types_pb2.NoticeKind.Name(kind).removeprefix("NOTICE_KIND_")
        + "/"
        + types_pb2.Channel.Name(channel).removeprefix("CHANNEL_").lower()
    )
    counts = {NOTICE_PREFIX + label: 1, SMS_SEGMENTS: sms_segments}
    if sms_cost is not None and sms_cost.currency_code:
        counts[SMS_COST_PREFIX + sms_cost.currency_code] = sms_cost.amount_minor
    return _increments(shard, merchant_id, at_ms, counts)


def add_to_pipeline(pipe: Pipeline, increments: Iterable[Increment]) -> None:
    """Queue the increments on a pipeline (ideally a MULTI one that also makes the change)."""
    expiring: dict[str, int] = {}
    for inc in increments:
        pipe.hincrby(inc.key, inc.field, inc.amount)
        if inc.ttl_ms is not None:
            expiring[inc.key] = inc.ttl_ms
    for key, ttl_ms in expiring.items():
        pipe.pexpire(key, ttl_ms)


# --- reading ---------------------------------------------------------------------------------------


def _days(from_date: date, to_date: date) -> list[date]:
    return [from_date + timedelta(days=n) for n in range((to_date - from_date).days + 1)]


def _sum(hashes: Iterable[Mapping[bytes, bytes]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for h in hashes:
        for field, value in h.items():
            name = field.decode()
            total[name] = total.get(name, 0) + int(value)
    return total


def _labeled(counts: Mapping[str, int], prefix: str) -> list[alerts_pb2.LabeledCount]:
    return [
        alerts_pb2.LabeledCount(label=name.removeprefix(prefix), count=count)
        for name, count in sorted(counts.items())
        if name.startswith(prefix) and count > 0
    ]


def daily_stats(day: date, merchant_id: str, counts: Mapping[str, int]) -> alerts_pb2.DailyStats:
    """One day's counters as the API shows them."""
    out = alerts_pb2.DailyStats(
        date=types_pb2.LocalDate(year=day.year, month=day.month, day=day.day),
        merchant_id=merchant_id,
        parcels_shipped=counts.get(SHIPPED, 0),
        parcels_delivered=counts.get(DELIVERED, 0),
        delivered_on_time=counts.get(ON_TIME, 0),
        delivered_late=counts.get(LATE, 0),
        exceptions_by_reason=_labeled(counts, EXCEPTION_PREFIX),
        alerts_opened=_labeled(counts, ALERT_OPENED_PREFIX),
        alerts_resolved=_labeled(counts, ALERT_RESOLVED_PREFIX),
        notices_sent=_labeled(counts, NOTICE_PREFIX),
        sms_segments=counts.get(SMS_SEGMENTS, 0),
    )
    # One currency per deployment is expected; with several, the largest amount is shown.
    costs = {
        name.removeprefix(SMS_COST_PREFIX): n
        for name, n in counts.items()
        if name.startswith(SMS_COST_PREFIX)
    }
    if costs:
        currency = max(costs, key=lambda c: (costs[c], c))
        out.sms_cost.CopyFrom(types_pb2.Money(currency_code=currency, amount_minor=costs[currency]))
    return out


class StatsReader:
    """Reads the counters: one pipelined round trip per query, whatever the range."""

    def __init__(self, redis: Redis, shards: int) -> None:
        self._redis = redis
        self._shards = shards

    async def daily(self, merchant_id: str, from_date: date, to_date: date) -> list[alerts_pb2.DailyStats]:
        """Counters per day; ``merchant_id`` empty adds all merchants up."""
        who = merchant_id or ALL_MERCHANTS
        days = _days(from_date, to_date)
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                for shard in range(self._shards):
                    pipe.hgetall(keys.stats(shard, who, day.strftime("%Y%m%d")))
            replies: Sequence[Mapping[bytes, bytes]] = await pipe.execute()
        n = self._shards
        return [
            daily_stats(day, merchant_id, _sum(replies[i * n : (i + 1) * n])) for i, day in enumerate(days)
        ]

    async def totals(self) -> dict[str, int]:
        """All-time counters of every merchant, for the metrics export."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in range(self._shards):
                pipe.hgetall(keys.stats_total(shard))
            replies: Sequence[Mapping[bytes, bytes]] = await pipe.execute()
        return _sum(replies)


# --- OpenTelemetry ---------------------------------------------------------------------------------

_METRICS: tuple[tuple[str, str, str, str], ...] = (
    # (instrument, field or prefix, attribute for the rest of the field name, description)
    ("relais.parcels.shipped", SHIPPED, "", "Parcels with their first carrier event"),
    ("relais.parcels.delivered", DELIVERED, "", "Parcels delivered"),
    ("relais.parcels.delivered_on_time", ON_TIME, "", "Parcels delivered on or before the promised date"),
    ("relais.parcels.delivered_late", LATE, "", "Parcels delivered after the promised date"),
    ("relais.parcels.exceptions", EXCEPTION_PREFIX, "reason", "Exceptions and failed attempts, by reason"),
    ("relais.alerts.opened", ALERT_OPENED_PREFIX, "kind", "Alerts opened, by rule"),
    ("relais.alerts.resolved", ALERT_RESOLVED_PREFIX, "kind", "Alerts resolved, by rule"),
    ("relais.notices.sent", NOTICE_PREFIX, "kind_channel", "Notices sent, by kind and channel"),
    ("relais.sms.segments", SMS_SEGMENTS, "", "SMS segments sent"),
    ("relais.sms.cost", SMS_COST_PREFIX, "currency", "SMS cost in minor units"),
)


def observations(totals: Mapping[str, int]) -> dict[str, list[tuple[int, dict[str, str]]]]:
    """The totals as (value, attributes) per instrument name: what the observable counters report."""
    out: dict[str, list[tuple[int, dict[str, str]]]] = {name: [] for name, *_ in _METRICS}
    for name, key, attribute, _ in _METRICS:
        for field, value in sorted(totals.items()):
            if attribute and field.startswith(key):
                out[name].append((value, {attribute: field.removeprefix(key)}))
            elif not attribute and field == key:
                out[name].append((value, {}))
    return out


class StatsMetrics:
    """Observable counters over the all-time totals. Callbacks are synchronous, so they read a
    snapshot that ``refresh`` (awaited by a periodic task, e.g. before each export) keeps current."""

    def __init__(self, reader: StatsReader, meter: Any) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        self._reader = reader
        self._snapshot: dict[str, list[tuple[int, dict[str, str]]]] = observations({})

        def callback_for(name: str) -> Any:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(value, attrs) for value, attrs in self._snapshot.get(name, [])]

            return callback

        for name, _, _, description in _METRICS:
            meter.create_observable_counter(name, callbacks=[callback_for(name)], description=description)

    async def refresh(self) -> None:
        self._snapshot = observations(await self._reader.totals())
