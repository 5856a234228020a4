"""Per-caller request quotas: GCRA in Redis, one script call per RPC.

Each principal (``carrier:swisspost``, ``merchant:acme``, ``operator``) has its own key, so a tenant
over its quota is slowed down alone. Rate and burst are configured per principal kind; a rate of 0
turns the quota off for that kind. A client stream (StreamEvents) is charged per message, so a
carrier's batches count the same whether it streams them or calls RecordEvents; over quota the stream
ends RESOURCE_EXHAUSTED after the acks of the batches that were let in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from common import keys
from common.clock import Clock
from common.redis_client import register
from engine.auth import Principal, PrincipalKind


@dataclass(frozen=True, slots=True)
class QuotaLimit:
    """``rate_per_s`` requests per second on average, up to ``burst`` at once; rate 0 = unlimited."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate_per_s < 0 or self.burst < 1:
            raise ValueError(f"quota rate {self.rate_per_s}/s burst {self.burst}: need rate >= 0, burst >= 1")

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate_per_s


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    retry_after_ms: int = 0


ALLOWED = QuotaDecision(allowed=True)


class QuotaLimiter:
    def __init__(
        self, redis: Redis, clock: Clock, limits: Mapping[PrincipalKind, QuotaLimit], *, shards: int
    ) -> None:
        self._clock = clock
        self._limits = dict(limits)
        self._shards = shards
        self._script = register(redis, "quota")

    async def check(self, principal: Principal) -> QuotaDecision:
        """Charge one request to ``principal``: allowed, or the milliseconds to wait."""
        limit = self._limits.get(principal.kind)
        if limit is None or limit.rate_per_s == 0:
            return ALLOWED
        key = keys.quota(str(principal), self._shards)
        wait_ms = int(
            await self._script(
                keys=[key], args=[self._clock.now_ms(), f"{limit.interval_ms:.6f}", limit.burst]
            )
        )
        return ALLOWED if wait_ms == 0 else QuotaDecision(allowed=False, retry_after_ms=wait_ms)
