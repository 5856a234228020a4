"""Rate limits with GCRA, a whole batch in one Lua call (``common/lua/gcra.lua``).

Each entry (one send) names its limits: the provider's throughput and the merchant's share, which
many entries of a batch name together, and the recipient's frequency cap, which is the entry's own.
An entry is allowed only when all its limits allow it, and only then charged. A limited entry gets
the milliseconds until it would pass: the gateway reschedules it, never drops it.

GCRA keeps one number per key, the theoretical arrival time (TAT): with emission interval ``T = 1 /
rate`` and burst ``b``, a send at ``now`` passes when ``max(TAT, now) + T - b*T <= now``, and moves TAT
by ``T``. Over any window of ``w`` seconds at most ``b + w * rate`` pass: the rate holds exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common import keys
from common.redis_client import lua_array
from gateway.scripts import LuaScript


@dataclass(frozen=True, slots=True)
class Rate:
    """``rate_per_s`` sends per second on average, up to ``burst`` at once."""

    rate_per_s: float
    burst: int
    interval_ms: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"rate_per_s must be > 0 and burst >= 1, not {self.rate_per_s} and {self.burst}")
        object.__setattr__(self, "interval_ms", 1000.0 / self.rate_per_s)


@dataclass(frozen=True, slots=True)
class Limit:
    """One named limit (a provider's, a merchant's): its Redis key and its rate."""

    scope: str
    ident: str
    rate: Rate
    # Derived once: a limit is built once per name and named in many batches.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", keys.rate_limit(self.scope, self.ident))


class LimitBatch:
    """The limits of one batch's entries, in the script's terms.

    An entry names a tuple of shared limits and at most one personal limit. A tuple of shared limits
    is recognised by identity, so the caller builds each once and reuses it (the gateway keeps one per
    provider and merchant). Every personal limit has the batch's one personal rate, so a personal limit
    costs its key alone: a batch of thousands of recipients sends one key each and two numbers per
    entry, and builds no object per recipient. The personal scope is not one of the shared limits'
    (the gateway's are ``provider`` and ``merchant``), so no key is both.
    """

    __slots__ = (
        "_combo_refs",
        "_combos",
        "_entries",
        "_personal",
        "_personal_keys",
        "_scope",
        "_shared",
        "_shared_shapes",
    )

    def __init__(self, personal_scope: str = "recipient", personal: Rate | None = None) -> None:
        self._scope = personal_scope
        self._personal = personal
        self._shared: dict[str, int] = {}  # shared key -> its index in KEYS (1-based)
        self._shared_shapes: list[float] = []
        self._combos: dict[int, tuple[tuple[Limit, ...], int]] = {}  # id(tuple) -> (tuple, position)
        self._combo_refs: list[int] = []
        self._personal_keys: dict[str, int] = {}  # personal key -> its position among them (0-based)
        self._entries: list[int] = []

    def add(self, shared: tuple[Limit, ...], personal: str | None = None) -> None:
        """One entry: its shared limits and the ident of its personal limit (None: no personal limit)."""
        combo = self._combos.get(id(shared))
        # The tuple is kept with its position, so its id cannot be reused by another while the batch lives.
        if combo is None or combo[0] is not shared:
            combo = self._combos[id(shared)] = (shared, self._new_combo(shared))
        own = 0
        if personal is not None:
            if self._personal is None:
                raise ValueError("a personal limit needs the batch's personal rate")
            key = keys.rate_limit(self._scope, personal)
            position = self._personal_keys.get(key)
            if position is None:
                position = self._personal_keys[key] = len(self._personal_keys)
            own = position + 1
        self._entries += (combo[1], own)

    def extend(self, entries: Iterable[tuple[tuple[Limit, ...], str | None]]) -> LimitBatch:
        for shared, personal in entries:
            self.add(shared, personal)
        return self

    def __len__(self) -> int:
        return len(self._entries) // 2

    def _new_combo(self, shared: tuple[Limit, ...]) -> int:
        position = len(self._combo_refs) + 1
        self._combo_refs.append(len(shared))
        for limit in shared:
            index = self._shared.get(limit.key)
            if index is None:
                index = self._shared[limit.key] = len(self._shared) + 1
                self._shared_shapes += (limit.rate.interval_ms, limit.rate.burst)
            self._combo_refs.append(index)
        return position

    def keys_and_args(self, now_ms: int, amount: int) -> tuple[list[str], list[Any]]:
        personal = self._personal
        shapes = [*self._shared_shapes, *((personal.interval_ms, personal.burst) if personal else (0, 0))]
        script_keys = [*self._shared, *self._personal_keys]
        args = [now_ms, amount, len(self._shared), lua_array(shapes), lua_array(self._combo_refs)]
        return script_keys, [*args, lua_array(self._entries)]


class Limiter:
    """Builds the one GCRA call of a batch; queue it on a pipeline with the batch's other commands."""

    def __init__(self, redis: Redis) -> None:
        self._script = LuaScript(redis, "gcra")

    async def load(self) -> None:
        await self._script.load()

    def queue(self, pipe: Pipeline, now_ms: int, batch: LimitBatch, *, amount: int = 1) -> None:
        """Queue the call; its reply is a list of retry-after ms, one per entry (0 = allowed)."""
        self._script.queue(pipe, *batch.keys_and_args(now_ms, amount))

    async def check(self, now_ms: int, batch: LimitBatch, *, amount: int = 1) -> list[int]:
        """One round trip: retry-after ms per entry (0 = allowed, and charged)."""
        if not len(batch):
            return []
        reply = await self._script(*batch.keys_and_args(now_ms, amount))
        return [int(wait) for wait in reply]
