"""The daily counters' increments: what the engine and the gateway add to the pipeline or script
that makes a counted change, so a count never drifts from what happened. Here, in the shared
plumbing, because the gateway (notices sent, SMS segments and cost) must not import the engine.
``engine.stats`` reads them back (GetStats, metrics).

Every increment touches three hashes of the parcel's shard: the merchant's day, all merchants' day
(merchant ``*``) and the shard's all-time totals. Field names: ``shipped``, ``delivered``,
``on_time``, ``late``, ``exc:<REASON>``, ``al_open:<KIND>``, ``al_res:<KIND>``,
``notice:<KIND>/<channel>``, ``sms_segments``, ``sms_cost:<CURRENCY>`` (minor units).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property, lru_cache

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

    @cached_property
    def words(self) -> tuple[bytes, int, int]:
        """Field, amount and TTL (0: none) as a script's arguments; computed once, since increments
        come from a cache and recur across a day's parcels."""
        return self.field.encode(), self.amount, self.ttl_ms or 0


_DAY_MS = 86_400_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def day_of(at_ms: int) -> str:
    """The UTC day of an instant, ``YYYYMMDD``."""
    return _day_name(at_ms // _DAY_MS)


@lru_cache(maxsize=64)
def _day_name(day_index: int) -> str:
    # Every count of a busy day names the same day: one datetime per day, not per count.
    return datetime.fromtimestamp(day_index * 86_400, tz=UTC).strftime("%Y%m%d")


@lru_cache(maxsize=4096)
def _day_keys(shard: int, merchant_id: str, day_index: int) -> tuple[str, ...]:
    """The hashes a count of this merchant, shard and day goes to (daily ones first, total last);
    cached: a batch counts for the same few merchants and days over and over."""
    day = _day_name(day_index)
    daily = (keys.stats(shard, merchant_id, day),) if merchant_id else ()
    return (*daily, keys.stats(shard, ALL_MERCHANTS, day), keys.stats_total(shard))


def _increments(shard: int, merchant_id: str, at_ms: int, counts: Mapping[str, int]) -> list[Increment]:
    return list(_day_increments(shard, merchant_id, at_ms // _DAY_MS, tuple(counts.items())))


@lru_cache(maxsize=4096)
def _day_increments(
    shard: int, merchant_id: str, day_index: int, counts: tuple[tuple[str, int], ...]
) -> tuple[Increment, ...]:
    """Cached: a batch counts the same things for the same few merchants and days over and over."""
    *daily, total = _day_keys(shard, merchant_id, day_index)
    out: list[Increment] = []
    for field, amount in counts:
        if amount == 0:
            continue
        out += [Increment(key, field, amount, DAY_RETENTION_MS) for key in daily]
        out.append(Increment(total, field, amount, None))
    return tuple(out)


def shipped(shard: int, merchant_id: str, at_ms: int) -> list[Increment]:
    """The parcel's first carrier event (counted on the day it happened)."""
    return _increments(shard, merchant_id, at_ms, {SHIPPED: 1})


def delivered(shard: int, merchant_id: str, at_ms: int, promised_date: date | None) -> list[Increment]:
    """Delivered (or collected); on time when the UTC delivery day is not after the promised date."""
    counts = {DELIVERED: 1}
    if promised_date is not None:
        on_time = at_ms // _DAY_MS <= promised_date.toordinal() - _EPOCH_ORDINAL
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
    label = keys.kind_name(kind) + "/" + keys.channel_name(channel)
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
