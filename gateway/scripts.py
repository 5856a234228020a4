"""Lua scripts queued on pipelines by their SHA, without redis-py's per-execute SCRIPT EXISTS.

redis-py checks every script of a pipeline with ``SCRIPT EXISTS`` before each execute: one more round
trip per batch. The gateway loads its scripts once at start instead and sends bare ``EVALSHA``; after
a Redis restart the batch fails with NOSCRIPT, is left unacknowledged and comes back after reloading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common.redis_client import register


class LuaScript:
    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = name
        self._script = register(redis, name)

    async def load(self) -> None:
        await self.redis.script_load(self._script.script)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(self._script.sha, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A single call (off the hot path): reloads the script itself if Redis lost it."""
        return await self._script(keys=list(keys), args=list(args))
