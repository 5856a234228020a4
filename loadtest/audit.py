"""After a run: wait for the pipeline to drain, then check every expected notice arrived exactly once.

*Drained* means nothing is due that has not been claimed, and every outbox entry was read and
acknowledged by a gateway. The audit then reads what the engine planned, straight from the parcel
hashes (``nv:<KIND>``: a planned notice and its version; ``ns:<KIND>``: withdrawn — cancelled,
superseded or suppressed), what still waits in the due sets for later (pickup reminders, DELAYED
notices of parcels still on the way), and compares with what the counting channels received:

    expected = planned - withdrawn - scheduled for later
    missing  = expected notices never delivered;  duplicated = delivered more than once
    withdrawn delivered = a withdrawn notice delivered at the version that was withdrawn
    extra    = delivered notices that were not expected (withdrawn, for later, or never planned)

It passes only when the deliveries are exactly the expected notices, each once: a withdrawn notice
that went out is as much a failure as one that never did.

The lag from due time to send is read for a sample of deliveries (their notice's ``due_at``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from relais.v1 import notice_pb2, state_pb2

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


@dataclass(slots=True)
class DrainWatch:
    """When the system last started to have nothing left (unix seconds), from repeated looks.

    Watched from before the load starts, so the drain is measured from the last ack to the first
    drained look after it, not from whenever the harness got round to looking. A look that is not
    drained ends the stretch: the next drained one starts a new one."""

    drained_since_s: float | None = None
    last: Backlog | None = None

    def observe(self, seen: Backlog, at_s: float) -> None:
        self.last = seen
        if not seen.drained:
            self.drained_since_s = None
        elif self.drained_since_s is None:
            self.drained_since_s = at_s


async def watch(
    redis: Redis, shards: int, drain: DrainWatch, done: Callable[[], bool], poll_s: float
) -> None:
    """Look every ``poll_s`` until ``done()``: the drain watch of the load phase."""
    while not done():
        drain.observe(await backlog(redis, shards, time.time_ns() // 1_000_000), time.time())
        await asyncio.sleep(poll_s)


async def wait_drained(
    redis: Redis,
    shards: int,
    *,
    timeout_s: float,
    quiet_s: float = 1.0,
    poll_s: float = 0.1,
    drain: DrainWatch | None = None,
) -> tuple[Backlog, float | None]:
    """Poll until the system has been drained for ``quiet_s`` in a row (or ``timeout_s`` passed):
    the last backlog and when the drained stretch began (unix seconds; None when it never drained).
    ``quiet_s`` only confirms the drain (a claim or a retry may still come): it is not part of the
    figure, which is the stretch's start."""
    drain = drain if drain is not None else DrainWatch()
    started = time.monotonic()
    while True:
        now_s = time.time()
        seen = await backlog(redis, shards, time.time_ns() // 1_000_000)
        drain.observe(seen, now_s)
        since = drain.drained_since_s
        if since is not None and now_s - since >= quiet_s:
            return seen, since
        if time.monotonic() - started >= timeout_s:
            return seen, since
        await asyncio.sleep(poll_s)


SAMPLE = 10


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
    withdrawn_delivered: int
    extra: int
    missing_sample: tuple[str, ...]
    withdrawn_delivered_sample: tuple[str, ...]
    extra_sample: tuple[str, ...]
    duplicated_sample: tuple[str, ...]
    lag_ms_p50: float | None
    lag_ms_p95: float | None
    lag_ms_p99: float | None
    lag_ms_max: float | None

    @property
    def exactly_once(self) -> bool:
        """Every expected notice delivered once, and nothing else delivered: the counts agree and
        no withdrawn notice went out."""
        return (
            self.missing == 0
            and self.duplicated_keys == 0
            and self.duplicated_notices == 0
            and self.unexpected == 0
            and self.withdrawn_delivered == 0
            and self.extra == 0
            and self.delivered == self.expected
        )


@dataclass(slots=True)
class _Plan:
    parcels: int = 0
    planned: set[str] = field(default_factory=set)
    # Withdrawn notice id -> the version that was withdrawn: the engine deletes ``nv:`` when it sets
    # ``ns:``, so it is read from the kind's mark in the parcel's state.
    withdrawn: dict[str, int] = field(default_factory=dict)


async def _planned(redis: Redis) -> _Plan:
    """Parcels seen, planned notice ids and withdrawn ones with their versions, from the parcel
    hashes."""
    plan = _Plan()
    batch: list[str] = []
    async for key in redis.scan_iter(match=PARCEL_MATCH, count=SCAN_COUNT):
        plan.parcels += 1
        batch.append(key.decode())
        if len(batch) >= SCAN_COUNT:
            await _read_parcels(redis, batch, plan)
            batch.clear()
    if batch:
        await _read_parcels(redis, batch, plan)
    return plan


async def _read_parcels(redis: Redis, batch: list[str], plan: _Plan) -> None:
    """The hashes' field names, then the state of each parcel with a withdrawn notice (few: read
    only those), whose notice marks say which version was withdrawn."""
    pipe = redis.pipeline(transaction=False)
    for key in batch:
        pipe.hkeys(key)
    withdrawn: list[tuple[str, str, str]] = []
    for key, fields in zip(batch, await pipe.execute(), strict=True):
        parcel_id = key.split(":", 3)[3]
        for raw in fields:
            name = raw.decode()
            if name.startswith("nv:"):
                plan.planned.add(f"{parcel_id}:{name[3:]}")
            elif name.startswith("ns:"):
                withdrawn.append((key, parcel_id, name[3:]))
    if not withdrawn:
        return
    pipe = redis.pipeline(transaction=False)
    for key, _, _kind in withdrawn:
        pipe.hget(key, keys.PARCEL_STATE_FIELD)
    for (_, parcel_id, kind), raw in zip(withdrawn, await pipe.execute(), strict=True):
        marks = state_pb2.ParcelState.FromString(raw).notices if raw else ()
        # No mark: withdrawn without ever being planned; any delivery of it is wrong (version 0).
        versions = [mark.version for mark in marks if keys.kind_name(mark.kind) == kind]
        plan.withdrawn[f"{parcel_id}:{kind}"] = versions[0] if versions else 0


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
    return _split_key(key)[0]


def version_of_key(key: str) -> int:
    """``<notice_id>:<version>:<channel>[:<address digest>]`` → ``<version>``."""
    return int(_split_key(key)[1])


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split(":")
    if parts[-1] not in {"push", "email", "sms"}:
        parts = parts[:-1]
    return ":".join(parts[:-2]), parts[-2]


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
    plan = await _planned(redis)
    planned, withdrawn = plan.planned, set(plan.withdrawn)
    later = await _scheduled(redis, shards) - withdrawn
    per_notice: dict[str, int] = {}
    # A withdrawn notice counts as delivered against its withdrawal only at the withdrawn version:
    # an earlier version may have gone out before the kind was planned again and then withdrawn,
    # rightly (a correction sent, then its successor cancelled by delivery), and is expected.
    withdrawn_sent: set[str] = set()
    sent_before: set[str] = set()
    for key, n in deliveries.per_key.items():
        notice_id = notice_of_key(key)
        per_notice[notice_id] = per_notice.get(notice_id, 0) + n
        version = plan.withdrawn.get(notice_id)
        if version is None:
            continue
        if version in (0, version_of_key(key)):
            withdrawn_sent.add(notice_id)
        elif version_of_key(key) < version:
            sent_before.add(notice_id)
    delivered_ids = set(per_notice)
    expected = (planned - withdrawn - later) | (sent_before - withdrawn_sent)
    missing = sorted(expected - delivered_ids)
    extra = sorted(delivered_ids - expected)
    duplicated = sorted(notice for notice, n in per_notice.items() if n > 1)
    rng = random.Random(seed)
    all_keys = list(deliveries.per_key)
    sample = rng.sample(all_keys, min(LAG_SAMPLE, len(all_keys)))
    lags = await _lags_ms(redis, shards, deliveries, sample)
    return Audit(
        parcels=plan.parcels,
        planned=len(planned),
        withdrawn=len(withdrawn),
        scheduled_later=len(later),
        expected=len(expected),
        delivered=deliveries.total,
        delivered_notices=len(delivered_ids),
        missing=len(missing),
        duplicated_keys=len(deliveries.duplicated),
        duplicated_notices=len(duplicated),
        # Deliveries of withdrawn kinds are judged by their version above (withdrawn_sent, sent_before).
        unexpected=len(delivered_ids - planned - withdrawn),
        withdrawn_delivered=len(withdrawn_sent),
        extra=len(extra),
        missing_sample=tuple(missing[:SAMPLE]),
        withdrawn_delivered_sample=tuple(sorted(withdrawn_sent)[:SAMPLE]),
        extra_sample=tuple(extra[:SAMPLE]),
        duplicated_sample=tuple(duplicated[:SAMPLE]),
        lag_ms_p50=percentile(lags, 50),
        lag_ms_p95=percentile(lags, 95),
        lag_ms_p99=percentile(lags, 99),
        lag_ms_max=max(lags) if lags else None,
    )
