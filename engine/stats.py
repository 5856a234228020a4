"""Counters per merchant and UTC day, read back: GetStats and the OpenTelemetry export. The
increments themselves are built by ``common.counters`` (shared with the gateway) and re-exported here
for the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from redis.asyncio import Redis
from relais.v1 import alerts_pb2, types_pb2

from common import keys
from common.counters import (
    ALERT_OPENED_PREFIX,
    ALERT_RESOLVED_PREFIX,
    ALL_MERCHANTS,
    DELIVERED,
    EXCEPTION_PREFIX,
    LATE,
    NOTICE_PREFIX,
    ON_TIME,
    SHIPPED,
    SMS_COST_PREFIX,
    SMS_SEGMENTS,
    Increment,
    add_to_pipeline,
    alert,
    day_of,
    delivered,
    exception,
    notice_sent,
    shipped,
)

__all__ = [
    "Increment",
    "StatsMetrics",
    "StatsReader",
    "add_to_pipeline",
    "alert",
    "daily_stats",
    "day_of",
    "delivered",
    "exception",
    "notice_sent",
    "observations",
    "shipped",
]


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
