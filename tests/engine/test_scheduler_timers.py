"""The scheduler's timers against a real Redis: never lost to another shard's failure, a crash or a
slow handler, and never holding notices back."""

from __future__ import annotations

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
