"""The scheduler's timers against a real Redis: never lost to another shard's failure, a crash or a
slow handler, and never holding notices back."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import keys
from common.clock import ManualClock
from engine.scheduler import HELD_PER_SLOT, STOP_GRACE_S, TIMER_DEFER_MS, Dispatcher, timer_member

from ..conftest import T0_MS
from .test_scheduler import SHARDS, schedule


def parcel_on(shard: int, prefix: str) -> str:
    return next(p for p in (f"{prefix}{i}" for i in range(500)) if keys.shard_of(p, SHARDS) == shard)


async def test_a_shard_that_fails_does_not_take_another_shards_timers_with_it(
    redis: Redis, clock: ManualClock
) -> None:
    calls: list[str] = []

    async def check(shard: int, parcel_id: str, name: str) -> None:
        calls.append(parcel_id)

    dispatcher = Dispatcher(redis, clock, [0, 1])
    dispatcher.register_timer("ALERTS", check)
    timed = parcel_on(0, "t")
    await redis.zadd(keys.due(0), {timer_member(timed, "ALERTS"): T0_MS})
    await schedule(redis, [(parcel_on(1, "n"), T0_MS)])
    await redis.set(keys.outbox(1), b"not a stream")  # shard 1's script fails, as on READONLY or OOM

    with pytest.raises(ResponseError):
        await dispatcher.claim_once()

    # Shard 0's script took its timer in the same round: its handler ran all the same.
    assert calls == [timed]


async def test_a_timer_whose_dispatcher_dies_comes_back_when_its_lease_ends(
    redis: Redis, clock: ManualClock
) -> None:
    started = asyncio.Event()
    calls: list[str] = []

    async def hangs(shard: int, parcel_id: str, name: str) -> None:
        started.set()
        await asyncio.sleep(30)

    async def check(shard: int, parcel_id: str, name: str) -> None:
        calls.append(parcel_id)

    dying = Dispatcher(redis, clock, SHARDS, timer_timeout_s=5.0)
    dying.register_timer("ALERTS", hangs)
    member = timer_member("crash-1", "ALERTS")
    shard = keys.shard_of("crash-1", SHARDS)
    await redis.zadd(keys.due(shard), {member: T0_MS})
    claim = asyncio.create_task(dying.claim_once())
    await started.wait()
    claim.cancel()  # the process is killed while the handler runs: nothing after this line of it runs
    with pytest.raises(asyncio.CancelledError):
        await claim

    # Leased for twice the handler's timeout, not removed.
    assert await redis.zscore(keys.due(shard), member) == T0_MS + 10_000
    successor = Dispatcher(redis, clock, SHARDS, timer_timeout_s=5.0)
    successor.register_timer("ALERTS", check)
    clock.advance_ms(9_999)
    assert (await successor.claim_once()).timers == 0
    clock.advance_ms(1)
    assert (await successor.claim_once()).timers == 1
    assert calls == ["crash-1"]
    assert await redis.zcard(keys.due(shard)) == 0  # settled once its handler succeeded


async def test_a_timer_rescheduled_by_its_handler_keeps_its_new_time(
    redis: Redis, clock: ManualClock
) -> None:
    member = timer_member("again", "ALERTS")
    shard = keys.shard_of("again", SHARDS)

    async def rearm(shard: int, parcel_id: str, name: str) -> None:
        await redis.zadd(keys.due(shard), {member: T0_MS + 86_400_000})

    dispatcher = Dispatcher(redis, clock, SHARDS)
    dispatcher.register_timer("ALERTS", rearm)
    await redis.zadd(keys.due(shard), {member: T0_MS})

    assert (await dispatcher.claim_once()).timers == 1
    assert await redis.zscore(keys.due(shard), member) == T0_MS + 86_400_000


async def test_a_slow_timer_handler_holds_back_no_notice(redis: Redis, clock: ManualClock) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(shard: int, parcel_id: str, name: str) -> None:
        started.set()
        await release.wait()

    dispatcher = Dispatcher(redis, clock, SHARDS, max_idle_s=30.0)
    dispatcher.register_timer("ALERTS", slow)
    await redis.zadd(keys.due(keys.shard_of("slow", SHARDS)), {timer_member("slow", "ALERTS"): T0_MS})
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        async with asyncio.timeout(5):
            await started.wait()
        await schedule(redis, [("due-now", T0_MS)])
        dispatcher.wake()
        begun = time.monotonic()
        assert await redis.xread({keys.outbox(keys.shard_of("due-now", SHARDS)): "0"}, block=5000)
        assert time.monotonic() - begun < 0.5  # was the handler's whole run
        assert not release.is_set()
    finally:
        release.set()
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_a_handler_past_its_timeout_is_cancelled_and_its_timer_left_to_the_lease(
    redis: Redis, clock: ManualClock
) -> None:
    cancelled: list[str] = []

    async def hangs(shard: int, parcel_id: str, name: str) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(parcel_id)
            raise

    dispatcher = Dispatcher(redis, clock, SHARDS, timer_timeout_s=0.1)
    dispatcher.register_timer("ALERTS", hangs)
    member = timer_member("stuck", "ALERTS")
    shard = keys.shard_of("stuck", SHARDS)
    await redis.zadd(keys.due(shard), {member: T0_MS})

    async with asyncio.timeout(2):
        stats = await dispatcher.claim_once()

    assert (stats.timers, stats.timer_failures, cancelled) == (1, 1, ["stuck"])
    assert await redis.zscore(keys.due(shard), member) == T0_MS + 200  # its lease: twice the timeout


class PeakCheck:
    """A timer handler that takes ``pause_s`` and counts the most of its calls running at once."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s
        self.running = self.peak = 0

    async def __call__(self, shard: int, parcel_id: str, name: str) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(self.pause_s)
        self.running -= 1


async def test_timers_run_bounded_and_those_beyond_wait_in_redis(redis: Redis, clock: ManualClock) -> None:
    check = PeakCheck(0.001)
    dispatcher = Dispatcher(redis, clock, [0], timer_concurrency=1)
    dispatcher.register_timer("ALERTS", check)
    held = 1 * HELD_PER_SLOT
    parcels = [p for p in (f"b{i}" for i in range(2000)) if keys.shard_of(p, SHARDS) == 0][: held + 5]
    await redis.zadd(keys.due(0), {timer_member(p, "ALERTS"): T0_MS for p in parcels})
    await schedule(redis, [(parcel_on(0, "n"), T0_MS)])

    stats = await dispatcher.claim_once()

    assert (stats.claimed, stats.timers, stats.timers_deferred, check.peak) == (1, held, 5, 1)
    # The ones beyond (the last in due order: same score, so by name) are tried again a little
    # later, not lost; the others are settled.
    members = sorted(timer_member(p, "ALERTS").encode() for p in parcels)
    due_later = [(m, float(T0_MS + TIMER_DEFER_MS)) for m in members[held:]]
    assert await redis.zrange(keys.due(0), 0, -1, withscores=True) == due_later


async def test_stop_hands_running_timers_back(redis: Redis, clock: ManualClock) -> None:
    started = asyncio.Event()

    async def hangs(shard: int, parcel_id: str, name: str) -> None:
        started.set()
        await asyncio.sleep(30)

    dispatcher = Dispatcher(redis, clock, SHARDS)
    dispatcher.register_timer("ALERTS", hangs)
    member = timer_member("busy", "ALERTS")
    shard = keys.shard_of("busy", SHARDS)
    await redis.zadd(keys.due(shard), {member: T0_MS})
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    async with asyncio.timeout(5):
        await started.wait()
    clock.advance_ms(5)
    stop.set()
    async with asyncio.timeout(STOP_GRACE_S + 2):
        await task

    # Due at once for whoever claims next, not after its lease.
    assert await redis.zscore(keys.due(shard), member) == T0_MS + 5
