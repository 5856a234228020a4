"""The scheduler's timers against a real Redis: never lost to another shard's failure, a crash or a
slow handler, and never holding notices back."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import keys
from common.clock import ManualClock
from engine.scheduler import Dispatcher, timer_member

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
