"""Rate limits with GCRA, a whole batch in one Lua call (``common/lua/gcra.lua``).

Each entry (one send) names its limits: the provider's throughput, the recipient's frequency cap, the
merchant's share. An entry is allowed only when all its limits allow it, and only then charged. A
limited entry gets the milliseconds until it would pass: the gateway reschedules it, never drops it.

GCRA keeps one number per key, the theoretical arrival time (TAT): with emission interval ``T = 1 /
rate`` and burst ``b``, a send at ``now`` passes when ``max(TAT, now) + T - b*T <= now``, and moves TAT
by ``T``. Over any window of ``w`` seconds at most ``b + w * rate`` pass: the rate holds exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common import keys
from common.redis_client import lua_array
from gateway.scripts import LuaScript


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate_per_s`` sends per second on average, up to ``burst`` at once."""

    scope: str
    ident: str
    rate_per_s: float
    burst: int
    # Derived once: a limit is built once per name and named in many batches. The key names the
    # limit (scope and ident) in Redis and in a batch.
    key: str = field(init=False, repr=False, compare=False)
    interval_ms: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"limit {self.scope}: rate_per_s must be > 0 and burst >= 1")
        object.__setattr__(self, "key", keys.rate_limit(self.scope, self.ident))
        object.__setattr__(self, "interval_ms", 1000.0 / self.rate_per_s)


class Limiter:
    """Builds the one GCRA call of a batch; queue it on a pipeline with the batch's other commands."""

    def __init__(self, redis: Redis) -> None:
        self._script = LuaScript(redis, "gcra")

    async def load(self) -> None:
        await self._script.load()

    def queue(
        self, pipe: Pipeline, now_ms: int, entries: Sequence[Sequence[Limit]], *, amount: int = 1
    ) -> None:
        """Queue the call; its reply is a list of retry-after ms, one per entry (0 = allowed)."""
        self._script.queue(pipe, *self._keys_and_args(now_ms, entries, amount))

    async def check(self, now_ms: int, entries: Sequence[Sequence[Limit]], *, amount: int = 1) -> list[int]:
        """One round trip: retry-after ms per entry (0 = allowed, and charged)."""
        if not entries:
            return []
        reply = await self._script(*self._keys_and_args(now_ms, entries, amount))
        return [int(wait) for wait in reply]

    @staticmethod
    def _keys_and_args(
        now_ms: int, entries: Sequence[Sequence[Limit]], amount: int
    ) -> tuple[list[str], list[Any]]:
        # Each distinct limit is sent once (key, interval, burst); entries name theirs by index, so
        # a batch sharing a provider and a merchant costs a few arguments per entry. A limit is one
        # Redis key, which names it here too (a string whose hash Python keeps, not the dataclass).
        index: dict[str, int] = {}
        shapes: list[Any] = []
        refs: list[Any] = []
        for limits in entries:
            refs.append(len(limits))
            for limit in limits:
                position = index.get(limit.key)
                if position is None:
                    position = index[limit.key] = len(index) + 1
                    shapes += (limit.interval_ms, limit.burst)
                refs.append(position)
        return list(index), [now_ms, amount, lua_array(shapes), lua_array(refs)]
