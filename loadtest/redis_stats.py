"""What Redis did: round trips seen from the client, commands and memory seen from the server.

Round trips are counted where they happen, in the connection: a pipeline or a script call is one
write to the socket however many commands it carries. ``INFO commandstats`` deltas give the commands
Redis executed (those run inside Lua scripts included), ``INFO memory`` the bytes it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Connection, ConnectionPool, Redis


@dataclass(slots=True)
class RoundTrips:
    count: int = 0


def counting_client(url: str, trips: RoundTrips, *, max_connections: int = 64) -> Redis:
    """A client like ``common.redis_client.connect`` whose every socket write adds one to ``trips``."""

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            trips.count += 1
            await super().send_packed_command(command, check_health)

    pool = ConnectionPool.from_url(
        url, connection_class=CountingConnection, decode_responses=False, max_connections=max_connections
    )
    return Redis(connection_pool=pool)


@dataclass(frozen=True, slots=True)
class CommandStats:
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def minus(self, before: CommandStats) -> CommandStats:
        names = set(self.calls) | set(before.calls)
        delta = {n: self.calls.get(n, 0) - before.calls.get(n, 0) for n in names}
        return CommandStats({n: d for n, d in delta.items() if d})


async def command_stats(redis: Redis) -> CommandStats:
    info: dict[str, Any] = await redis.info("commandstats")
    return CommandStats({name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()})


async def used_memory(redis: Redis) -> int:
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"])
