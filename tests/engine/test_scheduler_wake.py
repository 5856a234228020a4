"""The scheduler's wake-up channel against a real Redis: a notice planned due now by ingest (in any
process) wakes a sleeping dispatcher at once, and so does every other writer of a due set (the
gateway's reschedule, a dead-letter replay, an alert check timer, a timer another dispatcher hands
back); many wake-ups cost one claim round; the channel outlives a Redis restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from relais.v1 import alerts_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.redis_client import connect
from common.redis_server import EmbeddedRedis, free_port
from engine.alert_rules import Evaluation, Finding
from engine.alert_store import CHECK_TIMER, AlertStore
from engine.scheduler import Dispatcher, TimerHandler, timer_member
from gateway.dlq import replay
from gateway.scripts import LuaScript
from gateway.settle import Settlement
from tests.alerts.support import parcel_facts
from tests.gateway.support import make_notice

from ..conftest import T0_MS
from .core_support import SETTINGS, engine_for, event, registration
from .test_ingest import register
from .test_scheduler import command_calls, schedule

SHARDS = SETTINGS.shards


@contextlib.asynccontextmanager
async def running(
    redis_url: str, clock: ManualClock, timers: dict[str, TimerHandler] | None = None
) -> AsyncIterator[Dispatcher]:
    """A dispatcher running on its own connections, as in another worker, that nothing but the
    wake-up channel would wake within the test (its idle limit is 30 s); stopped on the way out."""
    own = connect(redis_url)
    dispatcher = Dispatcher(own, clock, SHARDS, max_idle_s=30.0)
    for name, handler in (timers or {}).items():
        dispatcher.register_timer(name, handler)
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


@pytest.fixture
async def sleeping(redis_url: str, clock: ManualClock) -> AsyncIterator[Dispatcher]:
    async with running(redis_url, clock) as dispatcher:
        yield dispatcher


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


async def _in_outbox_within(redis: Redis, parcel_id: str, limit_s: float) -> None:
    begun = time.monotonic()
    assert await redis.xread({keys.outbox(keys.shard_of(parcel_id, SHARDS)): "0"}, block=5000)
    assert time.monotonic() - begun < limit_s  # was up to the dispatcher's 30 s idle limit


async def _pending_notice(redis: Redis, parcel_id: str, version: int = 1) -> None:
    """A notice as the engine leaves it while its gateway tries: body and version in its parcel hash."""
    notice = make_notice(parcel_id, version=version)
    await redis.hset(  # type: ignore[misc]
        keys.parcel(notice.shard, parcel_id),
        mapping={"n:SHIPPED": notice.SerializeToString(), "nv:SHIPPED": version},
    )


async def test_a_notice_the_gateway_reschedules_due_now_wakes_a_sleeping_dispatcher(
    redis: Redis, clock: ManualClock, sleeping: Dispatcher
) -> None:
    await _pending_notice(redis, "G-1")
    settlement = Settlement(LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=1, now_ms=T0_MS)
    settlement.reschedule(keys.shard_of("G-1", SHARDS), make_notice("G-1"), T0_MS)
    await settlement.execute(redis, load_scripts=True)
    await _in_outbox_within(redis, "G-1", 0.5)


async def test_a_reschedule_publishes_the_earliest_time_it_wrote_and_nothing_when_superseded(
    redis: Redis,
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.SCHEDULER_WAKE_CHANNEL)
    try:
        await _pending_notice(redis, "R-1")
        await _pending_notice(redis, "R-2", version=2)  # the engine planned it again meanwhile
        settlement = Settlement(
            LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=1, now_ms=T0_MS
        )
        settlement.reschedule(keys.shard_of("R-1", SHARDS), make_notice("R-1"), T0_MS + 5_000)
        settlement.reschedule(keys.shard_of("R-2", SHARDS), make_notice("R-2"), T0_MS)  # superseded
        assert await settlement.execute(redis, load_scripts=True) == 1
        assert [m async for m in _messages(pubsub)] == [b"%d" % (T0_MS + 5_000)]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_dead_letter_replay_wakes_a_sleeping_dispatcher(
    redis: Redis, clock: ManualClock, sleeping: Dispatcher
) -> None:
    await _pending_notice(redis, "D-1")
    notice = make_notice("D-1")
    entry = {"n": notice.SerializeToString(), "reason": "out of retries", "at": 0}
    await redis.xadd(keys.dead_letters(notice.shard), entry)  # type: ignore[arg-type]
    assert (await replay(redis, SHARDS, clock)).replayed == 1
    await _in_outbox_within(redis, "D-1", 0.5)


async def test_an_alert_check_timer_due_now_wakes_a_sleeping_dispatcher(
    redis_url: str, redis: Redis, clock: ManualClock
) -> None:
    checked = asyncio.Event()

    async def check(shard: int, parcel_id: str, name: str) -> None:
        checked.set()

    store = AlertStore(redis, shards=SHARDS, retention_ms=86_400_000)
    async with running(redis_url, clock, {CHECK_TIMER: check}):
        begun = time.monotonic()
        await store.apply([(parcel_facts("A-1"), Evaluation((), frozenset(), T0_MS))], T0_MS)
        async with asyncio.timeout(5):
            await checked.wait()
        assert time.monotonic() - begun < 0.5


async def test_an_alerts_write_publishes_the_check_timer_it_wrote_and_nothing_else(redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.SCHEDULER_WAKE_CHANNEL)
    try:
        store = AlertStore(redis, shards=SHARDS, retention_ms=86_400_000)
        returned = Finding(alerts_pb2.ALERT_KIND_RETURNED, "returning to sender")
        # An alert opened, its index entries added (scores 0), no check timer: nothing to wake for.
        await store.apply([(parcel_facts("A-2"), Evaluation((returned,), frozenset(), None))], T0_MS)
        assert [m async for m in _messages(pubsub)] == []
        later = Evaluation((), frozenset(), T0_MS + 60_000)
        await store.apply([(parcel_facts("A-3"), later), (parcel_facts("A-4"), later)], T0_MS)
        published = [m async for m in _messages(pubsub)]
        assert published  # one per shard written
        assert set(published) == {b"%d" % (T0_MS + 60_000)}
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_timer_a_stopping_dispatcher_hands_back_wakes_another(
    redis_url: str, redis: Redis, clock: ManualClock
) -> None:
    started = asyncio.Event()
    taken_over = asyncio.Event()

    async def hangs(shard: int, parcel_id: str, name: str) -> None:
        started.set()
        await asyncio.sleep(60)

    async def check(shard: int, parcel_id: str, name: str) -> None:
        taken_over.set()

    member = timer_member("H-1", CHECK_TIMER)
    async with running(redis_url, clock, {CHECK_TIMER: check}):
        stopping = Dispatcher(redis, clock, SHARDS, max_idle_s=30.0)
        stopping.register_timer(CHECK_TIMER, hangs)
        stop = asyncio.Event()
        task = asyncio.create_task(stopping.run(stop))
        # Leased by the one whose handler hangs: the other sleeps until the lease ends (20 s).
        await redis.zadd(keys.due(keys.shard_of("H-1", SHARDS)), {member: T0_MS})
        stopping.wake()
        async with asyncio.timeout(5):
            await started.wait()
        stop.set()
        async with asyncio.timeout(5):
            await task  # handed back due now
        begun = time.monotonic()
        async with asyncio.timeout(5):
            await taken_over.wait()
        assert time.monotonic() - begun < 0.5
