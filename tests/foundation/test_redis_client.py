"""``connect`` packs commands with hiredis: every argument type the project sends arrives intact."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from common.redis_client import INCLUDE, LUA_DIR, PackingConnection, connect, lua_source, pack_command


def test_pack_command_matches_the_protocol() -> None:
    assert pack_command(("SET", b"k", 1, 2.5, "é")) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n2.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    # A command name with a space is two words, as redis-py sends it.
    assert pack_command(("CONFIG GET", "maxmemory")).startswith(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n")


@pytest.mark.parametrize("bad", [None, True])
def test_pack_command_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(DataError):
        pack_command(("SET", "k", bad))


async def test_values_round_trip_through_redis(redis: Redis) -> None:
    assert redis.connection_pool.connection_class is PackingConnection
    blob = bytes(range(256)) * 300  # binary, and larger than redis-py's buffer cutoff
    pipe = redis.pipeline(transaction=False)
    pipe.set("relais:test:{0}:blob", blob)
    pipe.hset("relais:test:{0}:h", mapping={"i": 7, "f": 0.25, "s": "é", b"b": b"\x00\xff"})
    pipe.zadd("relais:test:{0}:z", {"m": 1_773_133_200_000})
    await pipe.execute()
    assert await redis.get("relais:test:{0}:blob") == blob
    fields = await redis.hgetall("relais:test:{0}:h")  # type: ignore[misc]
    assert fields == {
        b"i": b"7",
        b"f": b"0.25",
        b"s": "é".encode(),
        b"b": b"\x00\xff",
    }
    assert await redis.zscore("relais:test:{0}:z", "m") == 1_773_133_200_000
    script = redis.register_script("return {ARGV[1], #ARGV[2]}")
    assert await script(keys=["relais:test:{0}:k"], args=[12, blob]) == [b"12", len(blob)]
    assert await redis.config_get("maxmemory")  # a two-word command


async def test_connect_closes_its_pool(redis_url: str) -> None:
    client = connect(redis_url)
    assert await client.ping()
    await client.aclose()
    assert client.auto_close_connection_pool


async def script_exists_calls(redis: Redis) -> int:
    """SCRIPT EXISTS calls so far. Redis 7 counts each subcommand apart; 6.2 (the embedded fallback)
    counts every SCRIPT call under one name, so the test makes no other SCRIPT call while it counts."""
    stats = await redis.info("commandstats")
    counted = stats.get("cmdstat_script|exists") or stats.get("cmdstat_script") or {}
    return int(counted.get("calls", 0))


async def test_pipelines_check_their_scripts_once_even_after_a_flush(redis: Redis) -> None:
    echo = redis.register_script("return ARGV[1]")
    await redis.script_load(echo.script)  # loaded before counting: the first check finds it
    before = await script_exists_calls(redis)
    for n in range(5):
        pipe = redis.pipeline(transaction=False)
        await echo(keys=[], args=[n], client=pipe)
        assert await pipe.execute() == [str(n).encode()]
    # redis-py alone asks SCRIPT EXISTS before each of the five: here only the first does.
    assert await script_exists_calls(redis) - before == 1

    # A lost script is loaded again by the pipeline that met NOSCRIPT (tests/foundation/
    # test_script_reload.py), with no check: the pipelines after it do not check either.
    await redis.script_flush()
    for word in (b"lost", b"back"):
        pipe = redis.pipeline(transaction=False)
        await echo(keys=[], args=[word], client=pipe)
        assert await pipe.execute() == [word]
    # Only Redis 7 counts SCRIPT EXISTS apart from the SCRIPT FLUSH and LOAD made since.
    if "cmdstat_script|exists" in await redis.info("commandstats"):
        assert await script_exists_calls(redis) - before == 1


async def test_calls_beyond_the_pool_wait_for_a_connection(redis_url: str) -> None:
    # Six calls holding a connection for 0.1 s each on a pool of two: they queue, none fails (a plain
    # pool raised "Too many connections" for the third).
    client = connect(redis_url, max_connections=2)

    async def hold(i: int) -> object:
        return await client.execute_command("BLPOP", f"relais:test:{{0}}:empty{i}", "0.1")  # type: ignore[no-untyped-call]

    try:
        replies = await asyncio.gather(*(hold(i) for i in range(6)))
        assert replies == [None] * 6
        assert_all_free(client, 2)
    finally:
        await client.aclose()


async def test_waiting_callers_are_served_in_arrival_order(redis_url: str) -> None:
    client = connect(redis_url, max_connections=1)
    served: list[int] = []

    async def call(i: int) -> None:
        await client.execute_command("BLPOP", f"relais:test:{{0}}:order{i}", "0.02")  # type: ignore[no-untyped-call]
        served.append(i)

    try:
        first = asyncio.create_task(call(0))
        await asyncio.sleep(0.005)  # the first holds the only connection; the rest queue behind it
        rest = []
        for i in range(1, 5):
            rest.append(asyncio.create_task(call(i)))
            await asyncio.sleep(0)
        await asyncio.gather(first, *rest)
        assert served == [0, 1, 2, 3, 4]
    finally:
        await client.aclose()


def hold(client: Redis, seconds: float) -> asyncio.Future[object]:
    """A call that keeps one connection busy for ``seconds`` (a BLPOP on an empty list)."""
    return asyncio.ensure_future(client.execute_command("BLPOP", "relais:test:{0}:held", seconds))  # type: ignore[no-untyped-call]


def assert_all_free(client: Redis, connections: int) -> None:
    pool = client.connection_pool
    assert len(pool._in_use_connections) == 0
    assert len(pool._available_connections) == connections


@pytest.mark.parametrize("gives_up", ["timeout", "cancelled"])
async def test_a_caller_who_gives_up_waiting_leaves_no_trace(redis_url: str, gives_up: str) -> None:
    client = connect(redis_url, max_connections=1)
    client.connection_pool.timeout = 0.05  # type: ignore[attr-defined]
    try:
        held = hold(client, 0.1)
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(client.get("relais:test:{0}:k"))
        if gives_up == "timeout":
            with pytest.raises(RedisConnectionError, match=r"no Redis connection free within 0\.05 s"):
                await waiting
        else:
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert await held is None
        # The next call takes the free connection at once: nobody is left queued before it.
        assert await client.set("relais:test:{0}:k", 1)
        assert_all_free(client, 1)
    finally:
        await client.aclose()


async def test_a_connection_handed_over_then_cancelled_goes_to_the_next_caller(redis_url: str) -> None:
    client = connect(redis_url, max_connections=1)
    pool = client.connection_pool
    try:
        mine = await pool.get_connection()
        cancelled = asyncio.create_task(pool.get_connection())
        after = asyncio.ensure_future(client.set("relais:test:{0}:k", 3))
        await asyncio.sleep(0.01)
        await pool.release(mine)  # handed to the first waiter...
        cancelled.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(after, 1.0)
        assert_all_free(client, 1)
    finally:
        await client.aclose()


async def test_a_connection_redis_closed_is_reopened_when_taken(redis: Redis, redis_url: str) -> None:
    client = connect(redis_url, max_connections=1)
    try:
        assert await client.set("relais:test:{0}:k", 4)
        await client.client_setname("closed-while-idle")
        victim = next(c for c in await client.client_list() if c["name"] == "closed-while-idle")
        await redis.client_kill_filter(_id=victim["id"])
        await asyncio.sleep(0.05)  # idle in the pool while the event loop sees the end of the stream
        assert await client.get("relais:test:{0}:k") == b"4"
    finally:
        await client.aclose()


def test_every_script_has_its_includes_pasted_in() -> None:
    for path in LUA_DIR.glob("*.lua"):
        lines = lua_source(path.stem).splitlines()
        assert not [line for line in lines if line.startswith(INCLUDE)], path.name
    # The shared functions reach the scripts that use them.
    assert "local function pending_kinds" in lua_source("read_parcels")
    assert "local function due_scores" in lua_source("view_parcel")
    assert "local function group_info" in lua_source("settle")
    assert "local function group_info" in lua_source("outbox_depth")
