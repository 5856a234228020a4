"""Connections to Redis (redis-py's ``redis.asyncio``, with hiredis parsing and packing) and the Lua
scripts."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.commands.core import AsyncScript
from redis.exceptions import DataError

LUA_DIR = Path(__file__).parent / "lua"


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol, packed by hiredis (C) instead of redis-py's pure Python.

    redis-py packs argument by argument through its encoder: for a script call with a large blob or a
    pipeline of hundreds of commands that cost more than Redis spends running them. Like redis-py, a
    first argument with spaces (``"CONFIG GET"``) is split into words; bytes, str, int and float
    arguments are accepted, anything else (None, bool) is refused with ``DataError`` as redis-py does.
    """
    first = args[0]
    if isinstance(first, str):
        if " " in first:
            args = (*first.split(), *args[1:])
    elif isinstance(first, bytes) and b" " in first:
        args = (*first.split(), *args[1:])
    # hiredis itself refuses anything else (None, bool): no Python loop over the arguments here.
    try:
        packed: bytes = hiredis.pack_command(args)
        return packed
    except TypeError as exc:
        raise DataError(str(exc)) from exc


class _HiredisPacking(AbstractConnection):
    """Packs commands and pipelines with ``pack_command``: one bytes object per write."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return [pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([pack_command(tuple(cmd)) for cmd in commands])]


class PackingConnection(_HiredisPacking, Connection):
    pass


class PackingUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class PackingSSLConnection(_HiredisPacking, SSLConnection):
    pass


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: PackingConnection,
    UnixDomainSocketConnection: PackingUnixConnection,
    SSLConnection: PackingSSLConnection,
}


def connect(url: str, *, max_connections: int = 64) -> Redis:
    """Values are protobuf bytes, so responses are not decoded; commands are packed by hiredis."""
    pool = ConnectionPool.from_url(url, decode_responses=False, max_connections=max_connections)
    pool.connection_class = _PACKING.get(pool.connection_class, pool.connection_class)
    return Redis.from_pool(pool)


@cache
def lua_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def register(redis: Redis, name: str) -> AsyncScript:
    """Load ``common/lua/<name>.lua`` once; calls go by EVALSHA and reload after a Redis restart."""
    return redis.register_script(lua_source(name))
