"""Connections to Redis (redis-py's ``redis.asyncio``, with hiredis parsing and packing) and the Lua
scripts."""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
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
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.commands.core import AsyncScript, Script
from redis.exceptions import ConnectionError as RedisConnectionError
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
    NOSCRIPT (a restart, a failover or SCRIPT FLUSH emptied its script cache). Then the pipeline
    loads its lost scripts and runs again only the calls that met NOSCRIPT, in one more round trip:
    the rest of the pipeline already ran, and some of it must not run twice (HINCRBY, XADD, PUBLISH).
    The caller gets every reply in its place, as if nothing happened. A second NOSCRIPT in a row is an
    error like any other: something else is wrong. A call whose script the pipeline does not know
    (an ``evalsha`` queued without the script) keeps its NOSCRIPT; its caller reloads it. In a
    transaction the re-run is a second MULTI, so the two parts are not atomic together and a WATCH
    does not guard the second: no code here calls scripts in a transaction.
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
        # Every execute ends with reset(), which puts new lists in place: these stay for a second run.
        stack, scripts, transaction = self.command_stack, self.scripts, self.explicit_transaction
        # Errors come back in place, raised below only once the NOSCRIPT calls had their second run.
        replies: list[Any] = await super().execute(raise_on_error=False)
        if scripts:
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:
                self._loaded.clear()  # Redis lost every script, not only these: check them all again
                await self._run_again(stack, scripts, lost, replies, transaction)
        if raise_on_error:
            self.raise_first_error(stack, replies)
        return replies

    async def _run_again(
        self,
        stack: list[Any],
        scripts: Iterable[Script | AsyncScript],
        lost: list[int],
        replies: list[Any],
        transaction: bool,
    ) -> None:
        """Load the lost scripts and run again, in one round trip, the calls (``stack[i]`` for ``i`` in
        ``lost``, EVALSHA with the sha second) that met NOSCRIPT; their new replies go into ``replies``.

        ``scripts`` are the pipeline's: redis-py declares them ``Script``, its asyncio ones land there.
        """
        by_sha: dict[str, Any] = {script.sha: script.script for script in scripts}
        again = [i for i in lost if stack[i][0][1] in by_sha]
        if not again:
            return
        shas = dict.fromkeys(stack[i][0][1] for i in again)
        # SCRIPT LOAD queued ahead of the calls: Redis runs them in order (in a MULTI too), so the calls
        # find their scripts without a round trip of their own (nor the SCRIPT EXISTS of a check).
        self.command_stack = [(("SCRIPT LOAD", by_sha[sha]), {}) for sha in shas]
        self.command_stack += [stack[i] for i in again]
        self.explicit_transaction = transaction  # a MULTI begun after WATCH stays one
        rerun: list[Any] = await super().execute(raise_on_error=False)
        for i, reply in zip(again, rerun[len(shas) :], strict=True):
            replies[i] = reply
        if not any(isinstance(reply, NoScriptError) for reply in rerun):
            self._loaded.update(shas)


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


class WaitingConnectionPool(ConnectionPool):
    """A pool whose callers wait their turn (first come, first served, up to ``timeout`` seconds)
    when every connection is in use, instead of failing with "Too many connections".

    redis-py's ``BlockingConnectionPool`` waits too, but every command pays for it: a condition
    acquired on the way in and out, and a zero-timeout read that must be cancelled to learn that the
    connection holds no stray reply. That was 40% of a single command's client CPU (93 -> 56 us).
    Here a free connection is taken and given back with no await, and a released connection goes
    straight to the oldest waiter. The stray-reply read is not needed: redis-py disconnects a
    connection whose exchange was interrupted (error, timeout or cancellation), so a connection back
    in the pool is between replies. One that Redis closed meanwhile shows it on its stream (end of
    file, seen by the event loop without a read of ours) and is reopened when it is taken.
    """

    def __init__(self, *args: Any, timeout: float = POOL_WAIT_S, **kwargs: Any) -> None:
        self._waiters: deque[asyncio.Future[AbstractConnection]] = deque()
        super().__init__(*args, **kwargs)
        self.timeout = timeout

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        full = not self._available_connections and len(self._in_use_connections) >= self.max_connections
        if full or self._waiters:
            connection = await self._wait_for_connection()
        else:
            connection = self.get_available_connection()  # type: ignore[no-untyped-call]
        reader = connection._reader
        if reader is not None and reader.at_eof():
            # Redis closed it while it sat here (restart, idle timeout, CLIENT KILL): open a new one.
            await connection.disconnect(nowait=True)
        if not connection.is_connected:
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
        return connection

    async def _wait_for_connection(self) -> AbstractConnection:
        turn: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        taken = False
        try:
            async with asyncio.timeout(self.timeout):
                connection = await turn
            taken = True
            return connection
        except TimeoutError as exc:
            raise RedisConnectionError(f"no Redis connection free within {self.timeout:g} s") from exc
        finally:
            if not taken and turn.done() and not turn.cancelled():
                # Handed a connection, then cancelled before taking it: it goes to the next caller.
                self._give_back(turn.result())
            elif not taken:
                turn.cancel()
                if turn in self._waiters:
                    self._waiters.remove(turn)

    async def release(self, connection: AbstractConnection) -> None:
        self._give_back(connection)

    def _give_back(self, connection: AbstractConnection) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(connection)  # stays in use: it is that caller's now
                return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)


def connect(url: str, *, max_connections: int = 64) -> Redis:
    """Values are protobuf bytes, so responses are not decoded; commands are packed by hiredis.

    The pool waits for a free connection (up to ``POOL_WAIT_S``) instead of failing at once: during a
    stall more calls than ``max_connections`` are in flight, and they should queue, not error."""
    pool = WaitingConnectionPool.from_url(url, decode_responses=False, max_connections=max_connections)
    pool.connection_class = _PACKING.get(pool.connection_class, pool.connection_class)
    return RelaisRedis.from_pool(pool)


def lua_array(items: Sequence[bytes | str | int | float]) -> bytes:
    """One script argument holding many values: a MessagePack array, which the script unpacks in C
    with Redis's ``cmsgpack`` instead of a Lua step per value. Bytes go as raw strings, since that
    ``cmsgpack`` predates MessagePack's bin type."""
    return msgpack.packb(items, use_bin_type=False)


INCLUDE = "-- #include "


@cache
def lua_source(name: str) -> str:
    """``common/lua/<name>.lua``, with each ``-- #include <other>`` line replaced by that file: Redis
    runs each script alone, so what several scripts share (a Lua function) is pasted in."""
    lines = (LUA_DIR / f"{name}.lua").read_text().splitlines(keepends=True)
    return "".join(
        lua_source(line.removeprefix(INCLUDE).strip()) if line.startswith(INCLUDE) else line for line in lines
    )


def register(redis: Redis, name: str) -> AsyncScript:
    """Load ``common/lua/<name>.lua`` once; calls go by EVALSHA and reload after a Redis restart."""
    return redis.register_script(lua_source(name))


def default_consumer_name() -> str:
    """A stream consumer's name, unique per process: a restarted process is a new consumer, and its
    predecessor's pending entries are taken over (the gateway's outbox, the alert digests)."""
    return f"{socket.gethostname()}-{os.getpid()}"


# A consumer idle this long is a process gone: a live one reads every few seconds.
CONSUMER_FORGET_IDLE_MS = 3_600_000


async def forget_gone_consumers(
    redis: Redis, streams: Iterable[str], group: str, idle_ms: int = CONSUMER_FORGET_IDLE_MS
) -> int:
    """Delete the consumers of ``group`` on ``streams`` idle for ``idle_ms`` with nothing pending, and
    say how many. Each process start is a new consumer (``default_consumer_name``): without this a
    group would keep one more per restart, forever. One with entries pending is kept, since deleting it
    would drop them from the group's pending list, where a live process takes them over; one deleted
    by mistake costs nothing, as its next read makes it again. Two round trips, at start only."""
    names = list(streams)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.xinfo_consumers(name, group)
    replies = await pipe.execute(raise_on_error=False)
    pipe = redis.pipeline(transaction=False)
    gone = 0
    for name, consumers in zip(names, replies, strict=True):
        if isinstance(consumers, Exception):
            continue  # no such stream or group yet: nothing to forget
        for consumer in consumers:
            if consumer["pending"] == 0 and consumer["idle"] >= idle_ms:
                pipe.xgroup_delconsumer(name, group, consumer["name"])
                gone += 1
    if gone:
        await pipe.execute()
    return gone
