"""The scheduler against a real Redis: due order, reschedule, cancel, timers, no double claims."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from relais.v1 import notice_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.redis_client import connect
from engine.scheduler import Dispatcher, parse_timer, timer_member

from ..conftest import T0_MS

SHARDS = 4


def notice_body(parcel_id: str, kind: str = "SHIPPED") -> bytes:
    return notice_pb2.Notice(
        notice_id=f"{parcel_id}:{kind}",
        kind=types_pb2.NoticeKind.Value(f"NOTICE_KIND_{kind}"),
        parcel_id=parcel_id,
        version=1,
    ).SerializeToString()


async def schedule(redis: Redis, items: list[tuple[str, int]], kind: str = "SHIPPED") -> None:
    """Plan a notice of ``kind`` for each (parcel id, due ms), the way the engine stores it."""
    pipe = redis.pipeline(transaction=False)
    for parcel_id, due_ms in items:
        shard = keys.shard_of(parcel_id, SHARDS)
        pipe.hset(keys.parcel(shard, parcel_id), mapping={f"n:{kind}": notice_body(parcel_id, kind)})
        pipe.zadd(keys.due(shard), {f"{parcel_id}:{kind}": due_ms})
    await pipe.execute()


async def outbox_ids(redis: Redis, shards: range = range(SHARDS)) -> list[str]:
    """Notice ids in the outbox streams, in stream order per shard."""
    ids = []
    for shard in shards:
        for _entry_id, fields in await redis.xrange(keys.outbox(shard)):
            ids.append(notice_pb2.Notice.FromString(fields[b"n"]).notice_id)
    return ids


async def test_claims_only_due_items_in_due_order(redis: Redis, clock: ManualClock) -> None:
    # One shard, so the stream order is the claim order.
    dispatcher = Dispatcher(redis, clock, [0], batch_size=100)
    parcels = [p for p in (f"p{i}" for i in range(200)) if keys.shard_of(p, SHARDS) == 0][:5]
    offsets = [0, -3_000, 10_000, -1_000, 1]
    await schedule(redis, [(p, T0_MS + o) for p, o in zip(parcels, offsets, strict=True)])

    stats = await dispatcher.claim_once()

    assert stats.claimed == 3
    assert stats.next_due_ms == T0_MS + 1
    assert await outbox_ids(redis, range(1)) == [f"{parcels[i]}:SHIPPED" for i in (1, 3, 0)]
    remaining = await redis.zrange(keys.due(0), 0, -1)
    assert remaining == [f"{parcels[4]}:SHIPPED".encode(), f"{parcels[2]}:SHIPPED".encode()]

    clock.advance_ms(1)
    assert (await dispatcher.claim_once()).claimed == 1
    assert (await dispatcher.claim_once()).claimed == 0


async def test_reschedule_by_zadd_and_cancel_by_zrem(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, SHARDS)
    await schedule(redis, [("early", T0_MS + 60_000), ("late", T0_MS - 1), ("gone", T0_MS - 1)])
    early_shard, late_shard = keys.shard_of("early", SHARDS), keys.shard_of("late", SHARDS)
    await redis.zadd(keys.due(early_shard), {"early:SHIPPED": T0_MS - 5})  # moved earlier
    await redis.zadd(keys.due(late_shard), {"late:SHIPPED": T0_MS + 60_000})  # moved later
    await redis.zrem(keys.due(keys.shard_of("gone", SHARDS)), "gone:SHIPPED")  # cancelled

    stats = await dispatcher.claim_once()

    assert stats.claimed == 1
    assert await outbox_ids(redis) == ["early:SHIPPED"]
    assert stats.next_due_ms == T0_MS + 60_000


async def test_member_without_body_is_dropped(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, SHARDS)
    shard = keys.shard_of("withdrawn", SHARDS)
    await redis.zadd(keys.due(shard), {"withdrawn:DELIVERED": T0_MS})

    stats = await dispatcher.claim_once()

    assert (stats.claimed, stats.dropped, stats.next_due_ms) == (0, 1, None)
    assert await redis.zcard(keys.due(shard)) == 0
    assert not await redis.exists(keys.parcel(shard, "withdrawn"), keys.outbox(shard))


async def test_parcel_id_with_colons_splits_at_last_colon(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, SHARDS)
    await schedule(redis, [("carrier:1Z:999", T0_MS)], kind="DELIVERED")
    assert (await dispatcher.claim_once()).claimed == 1
    assert await outbox_ids(redis) == ["carrier:1Z:999:DELIVERED"]


async def test_batches_are_bounded_and_saturation_reported(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, [0], batch_size=20)
    await redis.zadd(keys.due(0), {f"x{i}:SHIPPED": T0_MS - i for i in range(45)})
    rounds = []
    while (stats := await dispatcher.claim_once()).dropped:
        rounds.append((stats.dropped, stats.saturated))
    assert rounds == [(20, True), (20, True), (5, False)]


async def test_two_dispatchers_never_claim_the_same_notice(redis_url: str, redis: Redis) -> None:
    total = 3000
    clock = ManualClock(T0_MS)
    await schedule(redis, [(f"parcel-{i}", T0_MS - i) for i in range(total)])
    first, second = connect(redis_url), connect(redis_url)
    try:
        dispatchers = [Dispatcher(c, clock, SHARDS, batch_size=25) for c in (first, second)]

        async def drain(dispatcher: Dispatcher) -> int:
            claimed = 0
            while True:
                stats = await dispatcher.claim_once()
                claimed += stats.claimed
                if not stats.saturated:
                    return claimed

        counts = await asyncio.gather(*(drain(d) for d in dispatchers))
    finally:
        await first.aclose()
        await second.aclose()

    assert sum(counts) == total
    assert all(count > 0 for count in counts)  # both really took part
    ids = Counter(await outbox_ids(redis))
    assert len(ids) == total
    assert max(ids.values()) == 1


async def test_timers_call_their_handler(redis: Redis, clock: ManualClock) -> None:
    calls: list[tuple[int, str, str]] = []

    async def check_delayed(shard: int, parcel_id: str, name: str) -> None:
        calls.append((shard, parcel_id, name))

    dispatcher = Dispatcher(redis, clock, SHARDS)
    dispatcher.register_timer("DELAYED", check_delayed)
    shard = keys.shard_of("p:1", SHARDS)
    member = timer_member("p:1", "DELAYED")
    assert member == "p:1:CHECK_DELAYED"
    assert parse_timer(member) == ("p:1", "DELAYED")
    await redis.zadd(keys.due(shard), {member: T0_MS, timer_member("p:1", "UNKNOWN"): T0_MS})
    await schedule(redis, [("p:1", T0_MS)])

    stats = await dispatcher.claim_once()

    assert calls == [(shard, "p:1", "DELAYED")]
    assert (stats.claimed, stats.timers, stats.timer_failures) == (1, 2, 1)
    assert await outbox_ids(redis) == ["p:1:SHIPPED"]  # timers never reach the outbox
    # A timer nobody here handles is handed back for later, not lost.
    assert await redis.zrange(keys.due(shard), 0, -1, withscores=True) == [
        (b"p:1:CHECK_UNKNOWN", float(T0_MS + 30_000))
    ]


async def test_failing_timer_is_retried_later(redis: Redis, clock: ManualClock) -> None:
    attempts: list[int] = []

    async def flaky(shard: int, parcel_id: str, name: str) -> None:
        attempts.append(clock.now_ms())
        if len(attempts) == 1:
            raise RuntimeError("state not readable yet")

    dispatcher = Dispatcher(redis, clock, SHARDS, timer_retry_ms=30_000)
    dispatcher.register_timer("ALERTS", flaky)
    shard = keys.shard_of("p2", SHARDS)
    await redis.zadd(keys.due(shard), {timer_member("p2", "ALERTS"): T0_MS})

    assert (await dispatcher.claim_once()).timer_failures == 1
    assert await redis.zscore(keys.due(shard), timer_member("p2", "ALERTS")) == T0_MS + 30_000
    clock.advance_ms(30_000)
    assert (await dispatcher.claim_once()).timer_failures == 0
    assert attempts == [T0_MS, T0_MS + 30_000]
    assert await redis.zcard(keys.due(shard)) == 0


def test_bad_timer_names_and_settings_are_refused(redis: Redis, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="timer name"):
        timer_member("p", "A:B")
    with pytest.raises(ValueError, match="batch_size"):
        Dispatcher(redis, clock, SHARDS, batch_size=0)
    dispatcher = Dispatcher(redis, clock, SHARDS)

    async def handler(shard: int, parcel_id: str, name: str) -> None:
        return None

    dispatcher.register_timer("X", handler)
    with pytest.raises(ValueError, match="already"):
        dispatcher.register_timer("X", handler)


async def command_calls(redis: Redis) -> Counter[str]:
    info: dict[str, Any] = await redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in info.items()})


async def test_round_trips_per_notice(redis: Redis, clock: ManualClock) -> None:
    total = 2000
    dispatcher = Dispatcher(redis, clock, SHARDS, batch_size=1000)
    await schedule(redis, [(f"rt-{i}", T0_MS) for i in range(total)])
    await dispatcher.claim_once()  # loads the script (NOSCRIPT, then SCRIPT LOAD): not the steady state
    await schedule(redis, [(f"rt2-{i}", T0_MS) for i in range(total)])

    before = await command_calls(redis)
    stats = await dispatcher.claim_once()
    delta = await command_calls(redis) - before

    assert stats.claimed == total
    assert stats.round_trips == 1
    # What the client sent: one EVALSHA per shard, all in one pipeline; the rest ran inside Lua.
    assert delta["evalsha"] == SHARDS
    assert delta["xadd"] == total
    sent_by_client = delta["evalsha"] + delta["info"]
    assert sent_by_client == SHARDS + 1
    assert stats.round_trips / stats.claimed <= 0.05


async def test_reloads_script_after_flush(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, SHARDS)
    await schedule(redis, [("a", T0_MS)])
    await dispatcher.claim_once()
    await redis.script_flush()
    await schedule(redis, [("b", T0_MS)])

    stats = await dispatcher.claim_once()

    assert (stats.claimed, stats.round_trips) == (1, 3)  # NOSCRIPT, SCRIPT LOAD, claim


async def test_run_wakes_claims_and_stops(redis: Redis, clock: ManualClock) -> None:
    dispatcher = Dispatcher(redis, clock, SHARDS, max_idle_s=30.0)
    await schedule(redis, [("soon", T0_MS + 60_000)])
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await asyncio.sleep(0.05)
        assert await outbox_ids(redis) == []  # not due yet
        clock.advance_ms(60_000)
        dispatcher.wake()  # without it the loop would sleep max_idle_s
        shard = keys.shard_of("soon", SHARDS)
        # A blocking read returns as soon as the dispatcher has claimed (or fails the test after 5 s).
        assert await redis.xread({keys.outbox(shard): "0"}, block=5000)
        assert await outbox_ids(redis) == ["soon:SHIPPED"]
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_a_claim_that_fails_midway_leaves_the_notice_due(redis: Redis, clock: ManualClock) -> None:
    # Redis does not roll back a script that fails midway: the outbox write must come before the
    # removal from the due set, or the notice is lost.
    dispatcher = Dispatcher(redis, clock, [0])
    parcel = next(p for p in (f"mid{i}" for i in range(200)) if keys.shard_of(p, SHARDS) == 0)
    await schedule(redis, [(parcel, T0_MS)])
    await redis.set(keys.outbox(0), b"not a stream")

    with pytest.raises(ResponseError):
        await dispatcher.claim_once()
    assert await redis.zscore(keys.due(0), f"{parcel}:SHIPPED") == T0_MS

    await redis.delete(keys.outbox(0))
    assert (await dispatcher.claim_once()).claimed == 1
    assert await outbox_ids(redis, range(1)) == [f"{parcel}:SHIPPED"]


async def test_run_outlives_redis_errors_and_backs_off(
    redis: Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A wrong-type outbox fails every claim of its shard with an error reply (as READONLY does after a
    # failover): not a connection error, and the loop must still go on.
    parcel = next(p for p in (f"ro{i}" for i in range(200)) if keys.shard_of(p, SHARDS) == 0)
    await schedule(redis, [(parcel, T0_MS)])
    await redis.set(keys.outbox(0), b"not a stream")
    dispatcher = Dispatcher(redis, clock, [0], max_idle_s=30.0, max_backoff_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await asyncio.sleep(0.5)
        assert not task.done()
        failures = [r for r in caplog.records if r.name == "engine.scheduler"]
        # 0.1 s, then 0.2 s (the cap): a few retries, not a busy loop.
        assert 2 <= len(failures) <= 5
        assert all("ResponseError WRONGTYPE" in r.getMessage() for r in failures)
        assert not any(parcel in r.getMessage() for r in failures)  # no keys, no ids in the log

        await redis.delete(keys.outbox(0))
        # Claimed at the next retry, with no wake(): max_idle_s alone would be 30 s.
        assert await redis.xread({keys.outbox(0): "0"}, block=5000)
        assert await outbox_ids(redis, range(1)) == [f"{parcel}:SHIPPED"]
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
