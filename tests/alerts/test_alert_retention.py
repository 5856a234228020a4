"""Retention of alerts: a parcel's alerts live as long as the parcel, and no index entry outlives the
alert it names."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.settings import Settings
from engine.alert_monitor import AlertMonitor
from engine.alert_rules import DAY_MS, HOUR_MS, AlertConfig
from engine.alert_store import ALL_MERCHANTS, AlertStore
from engine.app import Engine
from tests.alerts.support import engine_with_timers, parcel_facts, register_p1, scan
from tests.conftest import T0_MS

S = types_pb2
SHARDS = 4
SETTINGS = Settings(listen="127.0.0.1:0", shards=SHARDS)
RETENTION_MS = 30 * DAY_MS
# Time the test's own round trips take between the two PTTL reads, at most.
SLACK_MS = 2_000


async def stuck_parcel(redis: Redis, clock: ManualClock) -> Engine:
    """P1 registered, scanned once in transit, then nothing for 73 h: NO_MOVEMENT is open."""
    engine, dispatcher = engine_with_timers(SETTINGS, redis, clock)
    await register_p1(engine, clock)
    await engine.ingestor.apply(scan("e1", S.TRACKING_STATUS_IN_TRANSIT, T0_MS - 1000))
    clock.advance_ms(73 * HOUR_MS)
    await dispatcher.claim_once()
    return engine


async def assert_follows_parcel(redis: Redis) -> None:
    shard = keys.shard_of("P1", SHARDS)
    parcel_ttl = await redis.pttl(keys.parcel(shard, "P1"))
    alerts_ttl = await redis.pttl(keys.alerts(shard, "P1"))
    assert parcel_ttl - SLACK_MS <= alerts_ttl <= parcel_ttl
    for merchant_id in ("acme", ALL_MERCHANTS):
        index = keys.alert_index(shard, merchant_id, "NO_MOVEMENT", "OPEN")
        assert await redis.pttl(index) >= alerts_ttl - SLACK_MS


async def test_an_open_alert_lives_as_long_as_its_parcel(redis: Redis, clock: ManualClock) -> None:
    engine = await stuck_parcel(redis, clock)
    store = AlertStore(redis, shards=SHARDS, retention_ms=RETENTION_MS)
    (alert,) = (await store.open_alerts(["P1"]))["P1"]
    assert alert.kind == alerts_pb2.ALERT_KIND_NO_MOVEMENT
    await assert_follows_parcel(redis)

    # Each following UTC day a late scan of the past changes no verdict but pushes the parcel's
    # expiry back: its alerts' follows, or they would vanish while the parcel is still stuck. (Redis
    # counts TTLs in real time: the alerts' running short stands for the days gone by.)
    shard = keys.shard_of("P1", SHARDS)
    for day in (1, 2):
        clock.advance_ms(DAY_MS)
        await redis.pexpire(keys.alerts(shard, "P1"), HOUR_MS)
        await engine.ingestor.apply(scan(f"old{day}", S.TRACKING_STATUS_INFO_RECEIVED, T0_MS - 2000 * day))
        assert await redis.pttl(keys.parcel(shard, "P1")) > 180 * DAY_MS - SLACK_MS
        await assert_follows_parcel(redis)
    assert [a.alert_id for a in (await store.open_alerts(["P1"]))["P1"]] == [alert.alert_id]


async def test_a_parcel_without_open_alerts_is_not_rewritten_when_its_expiry_moves(
    redis: Redis, clock: ManualClock
) -> None:
    """Nearly every parcel has no open alert: the daily move of its expiry costs no alert write."""
    engine, _dispatcher = engine_with_timers(SETTINGS, redis, clock)
    await register_p1(engine, clock)
    await engine.ingestor.apply(scan("e1", S.TRACKING_STATUS_IN_TRANSIT, clock.now_ms() - 1000))
    alert_store = engine.alerts._store
    written = 0
    apply = alert_store.apply

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal written
        written += 1
        return await apply(*args, **kwargs)  # type: ignore[arg-type]

    alert_store.apply = counted  # type: ignore[method-assign, assignment]
    clock.advance_ms(DAY_MS)  # the next UTC day: the parcel's expiry is pushed back
    await engine.ingestor.apply(scan("e2", S.TRACKING_STATUS_IN_TRANSIT, clock.now_ms() - 1000))
    assert written == 0


@pytest.fixture
def store(redis: Redis) -> AlertStore:
    return AlertStore(redis, shards=SHARDS, retention_ms=RETENTION_MS)


async def open_no_movement(store: AlertStore, clock: ManualClock, parcel_ids: list[str]) -> None:
    monitor = AlertMonitor(store, AlertConfig(), clock)
    await monitor.check([parcel_facts(pid) for pid in parcel_ids])


async def index_members(redis: Redis, merchant_id: str) -> set[str]:
    members: set[str] = set()
    for shard in range(SHARDS):
        index = keys.alert_index(shard, merchant_id, "NO_MOVEMENT", "OPEN")
        members.update(m.decode() for m in await redis.zrange(index, 0, -1))
    return members


def gone(members: set[str], parcel_ids: list[str]) -> set[str]:
    return {m for m in members if m.partition("|")[2].rsplit(":", 2)[0] in parcel_ids}


async def test_writing_an_index_sweeps_entries_whose_alert_is_gone(
    redis: Redis, store: AlertStore, clock: ManualClock
) -> None:
    clock.set_ms(T0_MS + 3 * DAY_MS)
    # Parcels of one shard, so the later write sweeps the index they are in.
    parcel_ids = [pid for pid in (f"G{n}" for n in range(40)) if store.shard(pid) == 0][:4]
    await open_no_movement(store, clock, parcel_ids)
    assert len(await index_members(redis, "acme")) == 4
    expired = parcel_ids[:3]
    await redis.delete(*(keys.alerts(0, pid) for pid in expired))

    live = next(pid for pid in (f"L{n}" for n in range(40)) if store.shard(pid) == 0)
    await open_no_movement(store, clock, [live])
    for merchant_id in ("acme", ALL_MERCHANTS):
        members = await index_members(redis, merchant_id)
        assert not gone(members, expired), merchant_id
        assert len(members) == 2


async def test_a_page_prunes_the_entries_it_meets_whose_alert_is_gone(
    redis: Redis, store: AlertStore, clock: ManualClock
) -> None:
    clock.set_ms(T0_MS + 3 * DAY_MS)
    parcel_ids = [f"P{n}" for n in range(6)]
    await open_no_movement(store, clock, parcel_ids)
    expired = parcel_ids[:2]
    for pid in expired:
        await redis.delete(keys.alerts(store.shard(pid), pid))

    listed, _ = await store.page("acme")
    assert sorted(a.parcel_id for a in listed) == parcel_ids[2:]
    for merchant_id in ("acme", ALL_MERCHANTS):
        assert not gone(await index_members(redis, merchant_id), expired), merchant_id


async def test_a_page_prunes_an_entry_of_an_earlier_alert_of_the_same_id(
    redis: Redis, store: AlertStore, clock: ManualClock
) -> None:
    # P1's alerts expired with it; P1 came back and the rule opened again under the same id.
    clock.set_ms(T0_MS + 3 * DAY_MS)
    await open_no_movement(store, clock, ["P1"])
    await redis.delete(keys.alerts(store.shard("P1"), "P1"))
    clock.advance_ms(HOUR_MS)
    await open_no_movement(store, clock, ["P1"])

    listed, _ = await store.page("acme")
    assert [a.alert_id for a in listed] == ["P1:NO_MOVEMENT:1"]
    assert len(await index_members(redis, "acme")) == 1


async def test_an_index_expires_with_the_last_alert_it_names(
    redis: Redis, store: AlertStore, clock: ManualClock
) -> None:
    clock.set_ms(T0_MS + 3 * DAY_MS)
    await open_no_movement(store, clock, ["P1"])
    shard = store.shard("P1")
    alerts_ttl = await redis.pttl(keys.alerts(shard, "P1"))
    assert 0 < alerts_ttl <= RETENTION_MS  # no parcel hash: the retention
    for merchant_id in ("acme", ALL_MERCHANTS):
        index_ttl = await redis.pttl(keys.alert_index(shard, merchant_id, "NO_MOVEMENT", "OPEN"))
        assert abs(index_ttl - alerts_ttl) <= SLACK_MS
