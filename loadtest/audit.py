"""After a run: wait for the pipeline to drain, then check every expected notice arrived exactly once.

*Drained* means nothing is due that has not been claimed, and every outbox entry was read and
acknowledged by a gateway. The audit then reads what the engine planned, straight from the parcel
hashes (``nv:<KIND>``: a planned notice; ``ns:<KIND>``: withdrawn — cancelled, superseded or
suppressed), what still waits in the due sets for later (pickup reminders, DELAYED notices of parcels
still on the way), and compares with what the counting channels received:

    expected = planned - withdrawn - scheduled for later
    missing  = expected notices never delivered;  duplicated = delivered more than once

The lag from due time to send is read for a sample of deliveries (their notice's ``due_at``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis
from relais.v1 import notice_pb2

from common import keys
from common.redis_client import register
from loadtest.counting_channel import Deliveries

PARCEL_MATCH = f"{keys.PREFIX}p:*"
TIMER_MARK = ":CHECK_"
SCAN_COUNT = 2000
LAG_SAMPLE = 20_000


@dataclass(frozen=True, slots=True)
class Backlog:
    due_now: int
    scheduled_later: int
    outbox_undelivered: int

    @property
    def drained(self) -> bool:
        return self.due_now == 0 and self.outbox_undelivered == 0


async def backlog(redis: Redis, shards: int, now_ms: int) -> Backlog:
    """One pipelined look at every shard's due set and outbox. An outbox entry counts until it is
    settled (``outbox_depth.lua``, the gauge's own count): not yet read, or read and not yet
    acknowledged."""
    depth = register(redis, "outbox_depth")
    pipe = redis.pipeline(transaction=False)
    for s in range(shards):
        pipe.zcount(keys.due(s), "-inf", now_ms)
        pipe.zcard(keys.due(s))
        await depth(keys=[keys.outbox(s)], args=[keys.OUTBOX_GROUP], client=pipe)
    replies = await pipe.execute()
    due_now = later = undelivered = 0
    for s in range(shards):
        now_count, total, unsettled = replies[3 * s : 3 * s + 3]
        due_now += int(now_count)
        later += int(total) - int(now_count)
        undelivered += int(unsettled)
    return Backlog(due_now=due_now, scheduled_later=later, outbox_undelivered=undelivered)


async def wait_drained(
    redis: Redis, shards: int, *, timeout_s: float, quiet_s: float = 1.0, poll_s: float = 0.25
) -> tuple[Backlog, float]:
    """Poll until drained for ``quiet_s`` in a row (or ``timeout_s``); the last backlog and the
    seconds waited."""
    started = time.monotonic()
    drained_since: float | None = None
    while True:
        now = time.monotonic()
        seen = await backlog(redis, shards, time.time_ns() // 1_000_000)
        if seen.drained:
            drained_since = drained_since if drained_since is not None else now
            if now - drained_since >= quiet_s:
                return seen, now - started
        else:
            drained_since = None
        if now - started >= timeout_s:
            return seen, now - started
        await asyncio.sleep(poll_s)


@dataclass(frozen=True, slots=True)
class Audit:
    parcels: int
    planned: int
    withdrawn: int
    scheduled_later: int
    expected: int
    delivered: int
    delivered_notices: int
    missing: int
    duplicated_keys: int
    duplicated_notices: int
    unexpected: int
    missing_sample: tuple[str, ...]
    lag_ms_p50: float | None
    lag_ms_p95: float | None
    lag_ms_p99: float | None
    lag_ms_max: float | None

    @property
    def exactly_once(self) -> bool:
        return (
            self.missing == 0
            and self.duplicated_keys == 0
            and self.duplicated_notices == 0
            and self.unexpected == 0
        )


async def _planned(redis: Redis) -> tuple[int, set[str], set[str]]:
    """Parcels seen, planned notice ids and withdrawn ones, from the parcel hashes' field names."""
    parcels = 0
    planned: set[str] = set()
    withdrawn: set[str] = set()
    batch: list[str] = []

    async def flush() -> None:
        pipe = redis.pipeline(transaction=False)
        for key in batch:
            pipe.hkeys(key)
        for key, fields in zip(batch, await pipe.execute(), strict=True):
            parcel_id = key.split(":", 3)[3]
            for raw in fields:
                name = raw.decode()
                if name.startswith("nv:"):
                    planned.add(f"{parcel_id}:{name[3:]}")
                elif name.startswith("ns:"):
                    withdrawn.add(f"{parcel_id}:{name[3:]}")
        batch.clear()

    async for key in redis.scan_iter(match=PARCEL_MATCH, count=SCAN_COUNT):
        parcels += 1
        batch.append(key.decode())
        if len(batch) >= SCAN_COUNT:
            await flush()
    if batch:
        await flush()
    return parcels, planned, withdrawn


async def _scheduled(redis: Redis, shards: int) -> set[str]:
    pipe = redis.pipeline(transaction=False)
    for s in range(shards):
        pipe.zrange(keys.due(s), 0, -1)
    members: set[str] = set()
    for reply in await pipe.execute():
        members.update(m.decode() for m in reply if TIMER_MARK not in m.decode())
    return members


def notice_of_key(key: str) -> str:
    """``<notice_id>:<version>:<channel>[:<address digest>]`` → ``<notice_id>``."""
    parts = key.split(":")
    if parts[-1] not in {"push", "email", "sms"}:
        parts = parts[:-1]
    return ":".join(parts[:-2])


async def _lags_ms(redis: Redis, shards: int, deliveries: Deliveries, sample: Iterable[str]) -> list[float]:
    keys_of = list(sample)
    pipe = redis.pipeline(transaction=False)
    for key in keys_of:
        parcel_id, _, kind = notice_of_key(key).rpartition(":")
        pipe.hget(keys.parcel(keys.shard_of(parcel_id, shards), parcel_id), f"n:{kind}")
    lags: list[float] = []
    for key, body in zip(keys_of, await pipe.execute(), strict=True):
        if body:
            notice = notice_pb2.Notice.FromString(body)
            lags.append(float(deliveries.first_sent_ms[key] - notice.due_at.ToMilliseconds()))
    return lags


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (1 to 99), interpolated; None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def audit(redis: Redis, shards: int, deliveries: Deliveries, *, seed: int = 0) -> Audit:
    parcels, planned, withdrawn = await _planned(redis)
    later = await _scheduled(redis, shards) - withdrawn
    per_notice: dict[str, int] = {}
    for key, n in deliveries.per_key.items():
        notice_id = notice_of_key(key)
        per_notice[notice_id] = per_notice.get(notice_id, 0) + n
    delivered_ids = set(per_notice)
    expected = planned - withdrawn - later
    missing = sorted(expected - delivered_ids)
    rng = random.Random(seed)
    all_keys = list(deliveries.per_key)
    sample = rng.sample(all_keys, min(LAG_SAMPLE, len(all_keys)))
    lags = await _lags_ms(redis, shards, deliveries, sample)
    return Audit(
        parcels=parcels,
        planned=len(planned),
        withdrawn=len(withdrawn),
        scheduled_later=len(later),
        expected=len(expected),
        delivered=deliveries.total,
        delivered_notices=len(delivered_ids),
        missing=len(missing),
        duplicated_keys=len(deliveries.duplicated),
        duplicated_notices=sum(1 for n in per_notice.values() if n > 1),
        unexpected=len(delivered_ids - planned),
        missing_sample=tuple(missing[:10]),
        lag_ms_p50=percentile(lags, 50),
        lag_ms_p95=percentile(lags, 95),
        lag_ms_p99=percentile(lags, 99),
        lag_ms_max=max(lags) if lags else None,
    )
