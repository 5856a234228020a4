"""The daily counters written by a parcel's own change: once per parcel, under its merchant, on the day
each thing happened, whatever is replayed."""

from __future__ import annotations

from redis.asyncio import Redis
from relais.v1 import parcel_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.counters import day_of
from common.settings import Settings
from engine.app import Engine, build_engine
from engine.parcel_service import ParcelServicer
from tests.conftest import T0_MS
from tests.engine.core_support import event

S = types_pb2
HOUR_MS = 3_600_000
SETTINGS = Settings(listen="127.0.0.1:0", shards=4)


async def registered_p1(redis: Redis, clock: ManualClock) -> Engine:
    """The engine, with acme's parcel P1 registered."""
    engine = build_engine(SETTINGS, redis, clock)
    registration = parcel_pb2.ParcelRegistration(
        parcel_id="P1", merchant_id="acme", carrier="swisspost", recipient_id="acme/r1"
    )
    request = parcel_pb2.RegisterParcelsRequest(parcels=[registration])
    await ParcelServicer(engine.store, clock).RegisterParcels(request, None)  # type: ignore[arg-type]
    return engine


async def test_counted_once_under_the_merchant_registered_later(redis: Redis, clock: ManualClock) -> None:
    engine = build_engine(SETTINGS, redis, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    scanned = event("e1", "P1", S.TRACKING_STATUS_IN_TRANSIT, T0_MS)
    failed = event(
        "e2", "P1", S.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS + HOUR_MS, reason=S.EXCEPTION_REASON_ADDRESS_PROBLEM
    )
    clock.set_ms(T0_MS + 2 * HOUR_MS)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=[scanned, failed]))
    # No merchant yet: nothing counted.
    assert await redis.hget(keys.parcel(shard, "P1"), "ct") is None  # type: ignore[misc]
    assert await redis.hgetall(keys.stats_total(shard)) == {}  # type: ignore[misc]

    registration = parcel_pb2.ParcelRegistration(
        parcel_id="P1", merchant_id="acme", carrier="swisspost", recipient_id="acme/r1"
    )
    servicer = ParcelServicer(engine.store, clock)
    request = parcel_pb2.RegisterParcelsRequest(parcels=[registration])
    await servicer.RegisterParcels(request, None)  # type: ignore[arg-type]
    delivered = event("e3", "P1", S.TRACKING_STATUS_DELIVERED, T0_MS + 2 * HOUR_MS)
    for _ in range(2):  # replayed: counts nothing twice
        await engine.ingestor.apply(tracking_pb2.EventBatch(seq=2, events=[scanned, failed, delivered]))
        await servicer.RegisterParcels(request, None)  # type: ignore[arg-type]

    counted = [b"shipped", b"exc:ADDRESS_PROBLEM", b"delivered"]
    day = await redis.hmget(keys.stats(shard, "acme", day_of(T0_MS)), counted)  # type: ignore[misc]
    assert day == [b"1", b"1", b"1"]
    assert await redis.hmget(keys.stats_total(shard), counted) == day  # type: ignore[misc]
    assert await redis.pttl(keys.stats(shard, "acme", day_of(T0_MS))) > 0


async def test_a_daily_counter_keeps_the_expiry_it_was_made_with(redis: Redis, clock: ManualClock) -> None:
    """The TTL of a day's counters is set when the hash is made, not pushed back by every count."""
    engine = build_engine(SETTINGS, redis, clock)
    servicer = ParcelServicer(engine.store, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    second = next(p for p in (f"P{n}" for n in range(2, 200)) if keys.shard_of(p, SETTINGS.shards) == shard)
    day_key = keys.stats(shard, "acme", day_of(T0_MS))
    clock.set_ms(T0_MS + HOUR_MS)
    for n, pid in enumerate(("P1", second)):
        registration = parcel_pb2.ParcelRegistration(
            parcel_id=pid, merchant_id="acme", carrier="swisspost", recipient_id="acme/r1"
        )
        await servicer.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=[registration]), None)  # type: ignore[arg-type]
        scanned = event(f"e{n}", pid, S.TRACKING_STATUS_IN_TRANSIT, T0_MS)
        await engine.ingestor.apply(tracking_pb2.EventBatch(seq=n, events=[scanned]))
        if n == 0:
            assert await redis.pttl(day_key) > 2 * HOUR_MS  # made with the day's retention
            await redis.pexpire(day_key, HOUR_MS)
    assert await redis.hget(day_key, "shipped") == b"2"  # type: ignore[misc]
    assert 0 < await redis.pttl(day_key) <= HOUR_MS


async def test_a_label_alone_is_not_shipped_the_first_scan_is(redis: Redis, clock: ManualClock) -> None:
    """INFO_RECEIVED (the label) says the parcel is not yet scanned: shipped counts on the day of the
    first scan, as the SHIPPED notice waits for it too."""
    engine = await registered_p1(redis, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    label = event("e1", "P1", S.TRACKING_STATUS_INFO_RECEIVED, T0_MS)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=[label]))
    assert await redis.hget(keys.stats_total(shard), "shipped") is None  # type: ignore[misc]

    two_days_ms = T0_MS + 48 * HOUR_MS
    clock.set_ms(two_days_ms)
    scan = event("e2", "P1", S.TRACKING_STATUS_IN_TRANSIT, two_days_ms)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=2, events=[scan]))
    assert await redis.hget(keys.stats(shard, "acme", day_of(T0_MS)), "shipped") is None  # type: ignore[misc]
    assert await redis.hget(keys.stats(shard, "acme", day_of(two_days_ms)), "shipped") == b"1"  # type: ignore[misc]


async def test_an_exception_rescanned_daily_counts_once(redis: Redis, clock: ManualClock) -> None:
    """A parcel held for its address is scanned with the same exception each day: one exception;
    each failed attempt, though, counts."""
    engine = await registered_p1(redis, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    address, absent = S.EXCEPTION_REASON_ADDRESS_PROBLEM, S.EXCEPTION_REASON_RECIPIENT_ABSENT
    events = [
        *(
            event(f"x{n}", "P1", S.TRACKING_STATUS_EXCEPTION, T0_MS + n * HOUR_MS, reason=address)
            for n in range(3)
        ),
        *(
            event(f"a{n}", "P1", S.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS + (3 + n) * HOUR_MS, reason=absent)
            for n in range(2)
        ),
    ]
    clock.set_ms(T0_MS + 6 * HOUR_MS)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=events))
    counted = await redis.hmget(keys.stats_total(shard), ["exc:ADDRESS_PROBLEM", "exc:RECIPIENT_ABSENT"])  # type: ignore[misc]
    assert counted == [b"1", b"2"]
