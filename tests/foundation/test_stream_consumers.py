"""Stream consumers of processes long gone are forgotten: one more per restart must not pile up."""

from __future__ import annotations

from redis.asyncio import Redis

from common.redis_client import forget_gone_consumers

GROUP = "g"


async def consumers(redis: Redis, stream: str) -> dict[bytes, int]:
    return {c["name"]: c["pending"] for c in await redis.xinfo_consumers(stream, GROUP)}


async def test_gone_consumers_are_forgotten_unless_they_hold_entries(redis: Redis) -> None:
    streams = ["relais:test:{0}:s", "relais:test:{1}:s"]
    for stream in streams:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xadd(streams[0], {"n": b"1"})
    # A process that read an entry and died before settling it, two that read nothing.
    await redis.xreadgroup(GROUP, "host-1", {streams[0]: ">"})
    await redis.xgroup_createconsumer(streams[0], GROUP, "host-2")
    await redis.xgroup_createconsumer(streams[1], GROUP, "host-3")

    # None idle long enough yet: all stay.
    assert await forget_gone_consumers(redis, streams, GROUP) == 0
    assert await consumers(redis, streams[0]) == {b"host-1": 1, b"host-2": 0}

    # Idle past the limit: those with nothing pending go; the one holding an entry stays, so a live
    # process can still take the entry over.
    assert await forget_gone_consumers(redis, [*streams, "relais:test:{2}:none"], GROUP, idle_ms=0) == 2
    assert await consumers(redis, streams[0]) == {b"host-1": 1}
    assert await consumers(redis, streams[1]) == {}
