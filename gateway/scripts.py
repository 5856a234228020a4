"""Lua scripts queued on pipelines from synchronous code (the gateway builds its pipelines in plain
functions).

A queued script is registered with the pipeline, so the client from ``common.redis_client.connect``
checks it once, not at every execute; after Redis lost its scripts (a restart, a failover), the
pipeline loads them again and runs again only the script calls that met NOSCRIPT, so the batch goes
on as if nothing happened.
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
        # What redis-py's own script call does on a pipeline, minus the await (its annotation says
        # Script; its asyncio scripts add themselves here just the same).
        pipe.scripts.add(self._script)  # type: ignore[arg-type]
        pipe.evalsha(self._script.sha, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A single call (off the hot path): reloads the script itself if Redis lost it."""
        return await self._script(keys=list(keys), args=list(args))
