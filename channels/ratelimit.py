"""A client-side token bucket: stay under a provider's documented send rate so it rarely answers 429.
The gateway limits globally; this only keeps one process polite. Time and sleep are injectable so
tests drive the bucket without waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        monotonic_s: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._monotonic_s = monotonic_s
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated_s = monotonic_s()
        # One waiter at a time refills and takes; the others queue in order behind the lock.
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now_s = self._monotonic_s()
        self._tokens = min(float(self.burst), self._tokens + (now_s - self._updated_s) * self.rate_per_s)
        self._updated_s = now_s

    async def acquire(self) -> None:
        async with self._lock:
            self._refill()
            while self._tokens < 1.0:
                await self._sleep((1.0 - self._tokens) / self.rate_per_s)
                self._refill()
            self._tokens -= 1.0
