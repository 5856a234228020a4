"""Connections to Redis (redis-py's ``redis.asyncio``, with hiredis parsing and packing) and the Lua
scripts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import hiredis
import msgpack
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, NoScriptError

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


class _ScriptsCheckedOnce(Pipeline):
    """A pipeline that asks Redis whether its scripts exist once per client, not at every execute.

    redis-py sends ``SCRIPT EXISTS`` before each pipeline that calls a script: one more round trip per
    batch on every hot path. Here a script checked (or loaded) once is trusted until Redis answers
    NOSCRIPT (a restart or SCRIPT FLUSH): that pipeline fails, the caller's retry path applies, and the
    next pipeline checks again.
    """

    def __init__(self, loaded: set[str], *args: Any) -> None:
        super().__init__(*args)
        self._loaded = loaded

    async def load_scripts(self) -> None:
        missing = [s for s in self.scripts if s.sha not in self._loaded]
        if not missing:
            return
        # redis-py leaves immediate_execute_command untyped.
        immediate = self.immediate_execute_command
        exists = await immediate("SCRIPT EXISTS", *[s.sha for s in missing])  # type: ignore[no-untyped-call]
        for script, exist in zip(missing, exists, strict=True):
            if not exist:
                script.sha = await immediate("SCRIPT LOAD", script.script)  # type: ignore[no-untyped-call]
        self._loaded.update(s.sha for s in missing)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            replies: list[Any] = await super().execute(raise_on_error)
        except NoScriptError:
            self._loaded.clear()
            raise
        return replies


class RelaisRedis(Redis):
    """``Redis`` whose pipelines check their scripts once (see ``_ScriptsCheckedOnce``)."""

    _scripts_loaded: set[str]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        if not hasattr(self, "_scripts_loaded"):
            self._scripts_loaded = set()
        return _ScriptsCheckedOnce(
            self._scripts_loaded, self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


# How long a call waits for one of the pool's connections before it fails (UNAVAILABLE to gRPC callers).
POOL_WAIT_S = 5.0


def connect(url: str, *, max_connections: int = 64) -> Redis:
    """Values are protobuf bytes, so responses are not decoded; commands are packed by hiredis.

    The pool waits for a free connection (up to ``POOL_WAIT_S``) instead of failing at once: during a
    stall more calls than ``max_connections`` are in flight, and they should queue, not error."""
    pool = BlockingConnectionPool.from_url(
        url, decode_responses=False, max_connections=max_connections, timeout=POOL_WAIT_S
    )
    pool.connection_class = _PACKING.get(pool.connection_class, pool.connection_class)
    return RelaisRedis.from_pool(pool)


def lua_array(items: Sequence[bytes | str | int | float]) -> bytes:
    """One script argument holding many values: a MessagePack array, which the script unpacks in C
    with Redis's ``cmsgpack`` instead of a Lua step per value. Bytes go as raw strings, since that
    ``cmsgpack`` predates MessagePack's bin type."""
    return msgpack.packb(items, use_bin_type=False)


@cache
def lua_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def register(redis: Redis, name: str) -> AsyncScript:
    """Load ``common/lua/<name>.lua`` once; calls go by EVALSHA and reload after a Redis restart."""
    return redis.register_script(lua_source(name))
