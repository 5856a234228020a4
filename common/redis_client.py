"""Connections to Redis (redis-py's ``redis.asyncio``, with hiredis parsing) and the Lua scripts."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).parent / "lua"


def connect(url: str, *, max_connections: int = 64) -> Redis:
    """Values are protobuf bytes, so responses are not decoded."""
    client: Redis = Redis.from_url(url, decode_responses=False, max_connections=max_connections)
    return client


@cache
def lua_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def register(redis: Redis, name: str) -> AsyncScript:
    """Load ``common/lua/<name>.lua`` once; calls go by EVALSHA and reload after a Redis restart."""
    return redis.register_script(lua_source(name))
