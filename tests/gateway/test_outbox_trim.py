"""Settled outbox entries are trimmed in bulk by the settle script, never an entry still pending or
never delivered; the outbox-depth gauge counts the unsettled entries, not the stream's length."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from redis.asyncio import Redis

from common import keys
from common.settings import Settings
from common.telemetry import sample_outbox_depth, setup_telemetry
from gateway.consumer import Outbox
from gateway.scripts import LuaScript
from gateway.settle import Settlement

SHARD = 1
STREAM = keys.outbox(SHARD)
# Several of the stream's nodes (100 entries each at most): trims drop whole nodes.
ENTRIES = 450


async def fill(redis: Redis, count: int = ENTRIES) -> list[bytes]:
    await redis.xgroup_create(STREAM, keys.OUTBOX_GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(STREAM, {"n": str(n)})
    return list(await pipe.execute())


async def read(redis: Redis, consumer: str, count: int) -> list[bytes]:
    reply = await redis.xreadgroup(keys.OUTBOX_GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]]


async def settle(redis: Redis, entry_ids: Sequence[bytes]) -> None:
    settlement = Settlement(LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=1, now_ms=1)
    for entry_id in entry_ids:
        settlement.ack(SHARD, entry_id)
    await settlement.execute(redis, load_scripts=True)


async def in_stream(redis: Redis) -> set[bytes]:
    return {entry_id for entry_id, _ in await redis.xrange(STREAM)}


async def depth(redis: Redis) -> int:
    """The gauge's value for the shard, as an exporter reads it."""
    reader = InMemoryMetricReader()
    await sample_outbox_depth(redis, SHARD + 1, setup_telemetry(Settings(), metric_reader=reader).metrics)
    data = reader.get_metrics_data()
    points = [
        point
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "relais.outbox.depth"
        for point in metric.data.data_points
        if isinstance(point, NumberDataPoint)
    ]
    (value,) = [point.value for point in points if (point.attributes or {})["shard"] == SHARD]
    return int(value)


async def test_trimming_keeps_every_pending_and_undelivered_entry(redis: Redis) -> None:
    ids = await fill(redis)
    # One gateway holds the oldest entries (a batch in flight, or a gateway that died with them)...
    held = await read(redis, "slow", 120)
    # ...while another reads and settles the next ones; the rest were never delivered.
    settled = await read(redis, "fast", 200)
    await settle(redis, settled)
    undelivered = ids[len(held) + len(settled) :]

    left = await in_stream(redis)
    assert set(held) <= left
    assert set(undelivered) <= left
    assert (await redis.xpending(STREAM, keys.OUTBOX_GROUP))["pending"] == len(held)
    assert await depth(redis) == len(held) + len(undelivered)

    # The slow gateway settles part of its batch: the trim may pass those, not the rest of it.
    done, still_held = held[: len(held) * 3 // 4], held[len(held) * 3 // 4 :]
    await settle(redis, done)
    left = await in_stream(redis)
    assert set(still_held) <= left
    assert set(undelivered) <= left
    assert await depth(redis) == len(still_held) + len(undelivered)


async def test_a_dead_gateways_entries_stay_to_be_reclaimed(redis: Redis) -> None:
    await fill(redis)
    dead = await read(redis, "dead", 150)
    await settle(redis, await read(redis, "alive", ENTRIES))
    assert await in_stream(redis) >= set(dead)

    survivor = Outbox(redis, SHARD + 1, "survivor", batch_size=ENTRIES, block_ms=1, min_idle_ms=0)
    await survivor.ensure_groups()
    reclaimed = await survivor.reclaim()
    assert [entry.entry_id for entry in reclaimed] == dead
    assert all(entry.body is not None for entry in reclaimed)
    await settle(redis, dead)
    assert await redis.xlen(STREAM) == 0
    assert await depth(redis) == 0


async def test_settled_entries_leave_the_stream(redis: Redis) -> None:
    ids = await fill(redis)
    first = await read(redis, "g", 300)
    await settle(redis, first)
    assert set(ids[len(first) :]) <= await in_stream(redis)
    # Whole nodes below the trim point are gone: settled entries stay only in the node that holds
    # the trim point, with the first entries not delivered yet.
    node_entries = int((await redis.config_get("stream-node-max-entries"))["stream-node-max-entries"])
    assert len(set(first) & await in_stream(redis)) < node_entries
    await settle(redis, await read(redis, "g", ENTRIES))
    assert await redis.xlen(STREAM) == 0
    assert (await redis.xpending(STREAM, keys.OUTBOX_GROUP))["pending"] == 0


async def test_the_gauge_counts_unsettled_entries_when_redis_gives_no_lag(redis: Redis) -> None:
    """Redis 7 reports the group's lag, except after an entry beyond the last delivered one was
    deleted (and Redis 6.2 never does): the gauge then counts the stream itself."""
    ids = await fill(redis)
    held = await read(redis, "slow", 100)
    settled = await read(redis, "fast", 150)
    await settle(redis, settled)
    await redis.xdel(STREAM, ids[-1])
    groups = await redis.xinfo_groups(STREAM)
    assert groups[0].get("lag") is None
    undelivered = ids[len(held) + len(settled) : -1]
    assert await depth(redis) == len(held) + len(undelivered)


async def test_the_gauge_counts_a_stream_no_gateway_read_yet(redis: Redis) -> None:
    for n in range(3):
        await redis.xadd(STREAM, {"n": str(n)})
    assert await depth(redis) == 3
    await redis.xgroup_create(STREAM, keys.OUTBOX_GROUP, id="0")
    assert await depth(redis) == 3
