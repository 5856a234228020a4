"""The scheduler's ``RELAIS_SCHEDULER_*`` settings reach the dispatcher relais builds, against a real
Redis: its idle limit, its timer handlers' time limit (and so their lease), how many handlers run at
once, and when a failed one is tried again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from redis.asyncio import Redis

from common import keys
from common.clock import ManualClock
from common.settings import Settings
from engine.app import build_dispatcher
from engine.scheduler import Dispatcher, TimerHandler, timer_member

from ..conftest import T0_MS
from .test_scheduler import SHARDS, schedule
from .test_scheduler_timers import PeakCheck


def dispatcher_with(
    redis: Redis, clock: ManualClock, env: Mapping[str, str], timers: Mapping[str, TimerHandler]
) -> Dispatcher:
    """The dispatcher ``relais serve`` would build under ``env``."""
    return build_dispatcher(Settings.from_env({"RELAIS_SHARDS": str(SHARDS), **env}), redis, clock, timers)


def due_key(parcel_id: str) -> str:
    return keys.due(keys.shard_of(parcel_id, SHARDS))


async def due_timers(redis: Redis, *parcel_ids: str) -> None:
    for parcel_id in parcel_ids:
        await redis.zadd(due_key(parcel_id), {timer_member(parcel_id, "ALERTS"): T0_MS})


async def test_the_timer_timeout_setting_limits_handlers_and_sets_their_lease(
    redis: Redis, clock: ManualClock
) -> None:
    async def hangs(shard: int, parcel_id: str, name: str) -> None:
        await asyncio.sleep(30)

    dispatcher = dispatcher_with(redis, clock, {"RELAIS_SCHEDULER_TIMER_TIMEOUT_S": "0.2"}, {"ALERTS": hangs})
    await due_timers(redis, "slow")
    async with asyncio.timeout(5):  # the default would wait 10 s for the handler
        stats = await dispatcher.claim_once()
    assert stats.timer_failures == 1
    # Left to its lease, twice the handler's limit (the default's would end at T0 + 20 s).
    assert (
        await redis.zscore(keys.due(keys.shard_of("slow", SHARDS)), timer_member("slow", "ALERTS"))
        == T0_MS + 400
    )


async def test_the_timer_concurrency_setting_caps_the_handlers_running_at_once(
    redis: Redis, clock: ManualClock
) -> None:
    check = PeakCheck(0.05)
    dispatcher = dispatcher_with(redis, clock, {"RELAIS_SCHEDULER_TIMER_CONCURRENCY": "2"}, {"ALERTS": check})
    await due_timers(redis, *(f"t{i}" for i in range(6)))
    assert (await dispatcher.claim_once()).timers == 6
    assert check.peak == 2  # the default runs all 6 at once


async def test_the_timer_retry_setting_sets_when_a_failed_handler_runs_again(
    redis: Redis, clock: ManualClock
) -> None:
    async def fails(shard: int, parcel_id: str, name: str) -> None:
        raise RuntimeError("down")

    dispatcher = dispatcher_with(redis, clock, {"RELAIS_SCHEDULER_TIMER_RETRY_MS": "5000"}, {"ALERTS": fails})
    await due_timers(redis, "failing")
    assert (await dispatcher.claim_once()).timer_failures == 1
    assert await redis.zscore(due_key("failing"), timer_member("failing", "ALERTS")) == T0_MS + 5000


async def test_the_idle_setting_sets_how_long_the_dispatcher_sleeps_unwoken(
    redis: Redis, clock: ManualClock
) -> None:
    dispatcher = dispatcher_with(redis, clock, {"RELAIS_SCHEDULER_MAX_IDLE_S": "30"}, {})
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await asyncio.sleep(0.1)  # claimed once, now asleep
        # Written without a wake-up (as by hand): the default idle limit (1 s) would find it.
        await schedule(redis, [("unannounced", T0_MS)])
        outbox = keys.outbox(keys.shard_of("unannounced", SHARDS))
        assert await redis.xread({outbox: "0"}, block=1500) == []
        begun = time.monotonic()
        dispatcher.wake()
        assert await redis.xread({outbox: "0"}, block=5000)
        assert time.monotonic() - begun < 0.5
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
