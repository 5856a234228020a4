"""Turns per key within one process: concurrent calls that touch the same keys (parcels, a
recipient's preferences) go one after another instead of conflicting on Redis' optimistic checks,
which stay the guard between processes. Waiters are woken in the order they came."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager


class Turns:
    def __init__(self) -> None:
        self._holders: dict[str, asyncio.Future[None]] = {}

    async def take(self, keys: Sequence[str]) -> asyncio.Future[None]:
        """Wait until none of ``keys`` is held, then hold them all; pass the result to ``release``."""
        holders = self._holders
        while busy := {holders[key] for key in keys if key in holders}:
            await asyncio.wait(busy)
        # No await between the check and the claim: all of them or none.
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            holders[key] = turn
        return turn

    def release(self, keys: Sequence[str], turn: asyncio.Future[None]) -> None:
        for key in keys:
            if self._holders.get(key) is turn:
                del self._holders[key]
        turn.set_result(None)

    @asynccontextmanager
    async def one(self, key: str) -> AsyncIterator[None]:
        """Hold ``key`` for the block."""
        keys = (key,)
        turn = await self.take(keys)
        try:
            yield
        finally:
            self.release(keys, turn)
