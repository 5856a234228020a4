"""The scheduler's wake-up channel against a real Redis: a notice planned due now by ingest (in any
process) wakes a sleeping dispatcher at once; many wake-ups cost one claim round; the channel
outlives a Redis restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from relais.v1 import tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.redis_client import connect
from common.redis_server import EmbeddedRedis, free_port
from engine.scheduler import Dispatcher

from ..conftest import T0_MS
from .core_support import SETTINGS, engine_for, event, registration
from .test_ingest import register
from .test_scheduler import command_calls, schedule

SHARDS = SETTINGS.shards


@pytest.fixture
async def sleeping(redis_url: str, clock: ManualClock) -> AsyncIterator[Dispatcher]:
    """A dispatcher on its own connections, as in another worker, that nothing but the wake-up
    channel would wake within the test (its idle limit is 30 s)."""
    own = connect(redis_url)
    dispatcher = Dispatcher(own, clock, SHARDS, max_idle_s=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(0.1)  # claimed once, subscribed, now asleep
    try:
        yield dispatcher
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
        await own.aclose()


async def test_a_notice_ingest_plans_due_now_wakes_a_sleeping_dispatcher(
    redis: Redis, clock: ManualClock, sleeping: Dispatcher
) -> None:
    core = engine_for(redis, clock)
    for i in range(3):
        pid = f"W-{i}"
        await register(core, registration(pid))
        begun = time.monotonic()
        batch = tracking_pb2.EventBatch(
            seq=i, events=[event(f"{pid}-1", pid, types_pb2.TRACKING_STATUS_IN_TRANSIT, T0_MS - 1000)]
        )
        assert (await core.ingestor.apply(batch)).accepted == 1
        assert await redis.xread({keys.outbox(keys.shard_of(pid, SHARDS)): "0"}, block=5000)
        assert time.monotonic() - begun < 0.3  # was up to max_idle_s


async def test_a_write_publishes_its_earliest_due_time_in_the_same_round_trip(
    redis: Redis, clock: ManualClock
) -> None:
    core = engine_for(redis, clock)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.SCHEDULER_WAKE_CHANNEL)
    try:
        pids = [f"E-{i}" for i in range(8)]
        await register(core, *(registration(p) for p in pids))
        events = [event(f"{p}-1", p, types_pb2.TRACKING_STATUS_IN_TRANSIT, T0_MS - 1000) for p in pids]
        before = core.store.round_trips
        await core.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=events))
        assert core.store.round_trips - before == 3  # read parcels, read preferences, write

        published = [m async for m in _messages(pubsub)]
        scores: list[float] = []
        for shard in range(SHARDS):
            scores += [score for _m, score in await redis.zrange(keys.due(shard), 0, -1, withscores=True)]
        earliest = int(min(scores))
        assert published == [b"%d" % earliest]  # one per write, not one per notice

        # A write that schedules nothing publishes nothing.
        again = [event(f"{p}-2", p, types_pb2.TRACKING_STATUS_IN_TRANSIT, T0_MS - 500) for p in pids]
        await core.ingestor.apply(tracking_pb2.EventBatch(seq=2, events=again))
        assert [m async for m in _messages(pubsub)] == []
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _messages(pubsub: PubSub) -> AsyncIterator[bytes]:
    """What is published within 0.3 s (None stands for nothing, and for a subscription's own reply)."""
    until = time.monotonic() + 0.3
    while (left_s := until - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left_s)
        if message is not None:
            yield message["data"]


async def test_many_wake_ups_at_once_cost_one_claim_round(
    redis: Redis, clock: ManualClock, sleeping: Dispatcher
) -> None:
    await schedule(redis, [(f"burst-{i}", T0_MS) for i in range(200)])
    before = await command_calls(redis)
    pipe = redis.pipeline(transaction=False)
    for _ in range(200):
        pipe.publish(keys.SCHEDULER_WAKE_CHANNEL, b"%d" % T0_MS)
    await pipe.execute()
    await asyncio.sleep(0.3)

    delta = await command_calls(redis) - before
    assert delta["xadd"] == 200
    # One round (a script call per shard) takes them all; a second at most, for wake-ups that came
    # in during the first.
    assert delta["evalsha"] <= 2 * SHARDS


async def test_the_wake_up_channel_outlives_a_redis_restart(clock: ManualClock) -> None:
    port = free_port()
    server = EmbeddedRedis(port=port)
    server.start()
    client = connect(server.url)
    dispatcher = Dispatcher(client, clock, SHARDS, max_idle_s=30.0, max_backoff_s=0.4)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        await asyncio.sleep(0.1)
        server.stop()
        await asyncio.sleep(1.0)
        assert not task.done()
        server = EmbeddedRedis(port=port)
        server.start()
        await asyncio.sleep(1.0)  # the claims' and the channel's backoffs (0.4 s at most) are over
        producer = connect(server.url)
        try:
            await schedule(producer, [("after", T0_MS)])
            begun = time.monotonic()
            await producer.publish(keys.SCHEDULER_WAKE_CHANNEL, b"%d" % T0_MS)
            assert await producer.xread({keys.outbox(keys.shard_of("after", SHARDS)): "0"}, block=5000)
            assert time.monotonic() - begun < 0.3
        finally:
            await producer.aclose()
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
        await client.aclose()
        server.stop()
