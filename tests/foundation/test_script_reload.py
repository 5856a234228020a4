"""Redis lost its scripts (a restart, a failover, SCRIPT FLUSH) while it is up: the next calls load them
again and run, the callers see no error, and nothing that already ran runs twice."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError
from relais.v1 import tracking_pb2, types_pb2

from common.clock import ManualClock
from tests.conftest import T0_MS
from tests.engine.core_support import engine_for, event

# Each call appends its argument to a list: how many times the script ran, and with what.
APPEND = "return redis.call('RPUSH', KEYS[1], ARGV[1])"
CALLS = "relais:test:{0}:calls"
COUNTER = "relais:test:{0}:n"


async def calls(redis: Redis) -> list[bytes]:
    return await redis.lrange(CALLS, 0, -1)  # type: ignore[no-any-return,misc]


@pytest.mark.parametrize("transaction", [False, True])
@pytest.mark.parametrize("raise_on_error", [True, False])
async def test_a_pipeline_runs_again_only_what_met_noscript(
    redis: Redis, transaction: bool, raise_on_error: bool
) -> None:
    append = redis.register_script(APPEND)
    other = redis.register_script("return 'other'")
    pipe = redis.pipeline(transaction=transaction)
    await append(keys=[CALLS], args=["warm"], client=pipe)
    await pipe.execute()  # the scripts are checked: later pipelines trust them

    await redis.script_flush()
    pipe = redis.pipeline(transaction=transaction)
    pipe.incr(COUNTER)
    await append(keys=[CALLS], args=["a"], client=pipe)
    pipe.publish("relais:test:{0}:channel", "p")
    await other(keys=[], args=[], client=pipe)
    await append(keys=[CALLS], args=["b"], client=pipe)
    pipe.incr(COUNTER)

    replies = await pipe.execute(raise_on_error=raise_on_error)

    # In their original places; callbacks applied as on any pipeline (INCR's reply is an int).
    assert replies == [1, 2, 0, b"other", 3, 2]
    assert await redis.get(COUNTER) == b"2"  # each INCR once
    assert await calls(redis) == [b"warm", b"a", b"b"]  # each script call once, in order


@pytest.mark.parametrize("transaction", [False, True])
async def test_other_errors_keep_their_place(redis: Redis, transaction: bool) -> None:
    append = redis.register_script(APPEND)
    await redis.script_flush()
    await redis.set(COUNTER, "not a number")
    pipe = redis.pipeline(transaction=transaction)
    pipe.incr(COUNTER)
    await append(keys=[CALLS], args=["a"], client=pipe)

    replies = await pipe.execute(raise_on_error=False)

    assert isinstance(replies[0], ResponseError)
    assert not isinstance(replies[0], NoScriptError)
    assert replies[1] == 1
    pipe = redis.pipeline(transaction=transaction)
    pipe.incr(COUNTER)
    await append(keys=[CALLS], args=["b"], client=pipe)
    with pytest.raises(ResponseError, match="not an integer"):
        await pipe.execute()
    assert await calls(redis) == [b"a", b"b"]


@pytest.mark.parametrize("raise_on_error", [True, False])
async def test_a_second_noscript_in_a_row_is_an_error(redis: Redis, raise_on_error: bool) -> None:
    # A script whose sha is not its text's: loading the text does not make the sha known, so the
    # call meets NOSCRIPT again after the reload. Something else is wrong: no third try.
    broken = redis.register_script(APPEND)
    broken.sha = "0" * 40
    pipe = redis.pipeline(transaction=False)
    pipe.incr(COUNTER)
    await broken(keys=[CALLS], args=["x"], client=pipe)
    if raise_on_error:
        with pytest.raises(NoScriptError):
            await pipe.execute()
    else:
        replies = await pipe.execute(raise_on_error=False)
        assert replies[0] == 1
        assert isinstance(replies[1], NoScriptError)
    assert await redis.get(COUNTER) == b"1"  # the INCR is not run again
    assert await calls(redis) == []

    # The cache of checked scripts was reset: a sound script still runs.
    append = redis.register_script(APPEND)
    pipe = redis.pipeline(transaction=False)
    await append(keys=[CALLS], args=["ok"], client=pipe)
    assert await pipe.execute() == [1]


async def test_a_single_script_call_after_a_flush(redis: Redis) -> None:
    append = redis.register_script(APPEND)
    assert await append(keys=[CALLS], args=["a"]) == 1
    await redis.script_flush()
    assert await append(keys=[CALLS], args=["b"]) == 2
    assert await calls(redis) == [b"a", b"b"]


async def test_the_first_batch_after_a_flush_is_acknowledged(redis: Redis, clock: ManualClock) -> None:
    core = engine_for(redis, clock)
    status = types_pb2.TRACKING_STATUS_IN_TRANSIT
    first = tracking_pb2.EventBatch(seq=1, events=[event("e1", "NS-1", status, T0_MS - 1000)])
    assert (await core.ingestor.apply(first)).accepted == 1

    await redis.script_flush()
    second = tracking_pb2.EventBatch(seq=2, events=[event("e2", "NS-1", status, T0_MS - 900)])
    ack = await core.ingestor.apply(second)

    assert (ack.seq, ack.accepted, ack.duplicates) == (2, 1, 0)
    parcel = await core.store.read(["NS-1"])
    assert [e.event.event_id for e in parcel["NS-1"].state.timeline] == ["e1", "e2"]
