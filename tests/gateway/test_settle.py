"""A recorded attempt: its bytes appended to earlier ones parse as one view with every attempt."""

from __future__ import annotations

from redis.asyncio import Redis
from relais.v1 import notice_pb2, types_pb2

from common import keys
from gateway.scripts import LuaScript
from gateway.settle import Settlement, attempt_view, attempt_view_of, timestamp
from tests.gateway.support import hget, hset


def test_attempt_view_is_the_serialised_notice_view() -> None:
    earlier = notice_pb2.DeliveryAttempt(status=notice_pb2.NOTICE_STATUS_RETRYING, error="timeout")
    for error in ("", "x" * 100, "é" * 200, "y" * 20_000):
        attempt = notice_pb2.DeliveryAttempt(
            channel=types_pb2.CHANNEL_EMAIL,
            provider="email",
            status=notice_pb2.NOTICE_STATUS_SENT,
            attempted_at=timestamp(1_700_000_000_123),
            error=error,
            idempotency_key="p-1:SHIPPED:1:email",
            version=3,
        )
        view = attempt_view(attempt)
        assert view == notice_pb2.NoticeView(attempts=[attempt]).SerializeToString()
        both = notice_pb2.NoticeView()
        both.ParseFromString(attempt_view(earlier) + view)
        assert list(both.attempts) == [earlier, attempt]


def test_attempt_view_of_writes_protobufs_own_bytes() -> None:
    """The hand-written view is byte for byte what protobuf serialises, zero fields left out."""
    for channel, provider, message_id, status, at_ms, error, key, version, trace_id in (
        (
            types_pb2.CHANNEL_EMAIL,
            "email",
            "m-1",
            notice_pb2.NOTICE_STATUS_SENT,
            1_700_000_000_123,
            "",
            "k",
            3,
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (
            types_pb2.CHANNEL_PUSH,
            "fcm",
            "",
            notice_pb2.NOTICE_STATUS_RETRYING,
            1_700_000_000_000,
            "é" * 200,
            "",
            0,
            "",
        ),
        (
            types_pb2.CHANNEL_SMS,
            "",
            "x" * 300,
            notice_pb2.NOTICE_STATUS_FAILED,
            0,
            "timeout",
            "p:1:sms",
            2**31,
            "",
        ),
    ):
        attempt = notice_pb2.DeliveryAttempt(
            channel=channel,
            provider=provider,
            provider_message_id=message_id,
            status=status,
            attempted_at=timestamp(at_ms),
            error=error,
            idempotency_key=key,
            version=version,
            trace_id=trace_id,
        )
        view = attempt_view_of(channel, provider, message_id, status, at_ms, error, key, version, trace_id)
        assert view == attempt_view(attempt)


async def test_a_shard_acknowledges_and_deletes_thousands_of_entries_in_one_call(redis: Redis) -> None:
    """The settle script acknowledges entries in chunks (Lua's unpack is bounded): more than a chunk
    of one shard's entries all leave the stream and the group's pending list."""
    shard, count = 2, 2_500
    stream = keys.outbox(shard)
    await redis.xgroup_create(stream, keys.OUTBOX_GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(stream, {"n": str(n)})
    await pipe.execute()
    read = await redis.xreadgroup(keys.OUTBOX_GROUP, "t", {stream: ">"}, count=count)
    settlement = Settlement(
        LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=60_000, now_ms=1
    )
    for entry_id, _ in read[0][1]:
        settlement.ack(shard, entry_id)

    assert await settlement.execute(redis, load_scripts=True) == 0
    assert await redis.xlen(stream) == 0
    assert (await redis.xpending(stream, keys.OUTBOX_GROUP))["pending"] == 0


async def test_outcomes_append_to_a_parcel_and_never_bring_one_back(redis: Redis) -> None:
    """Each recorded attempt is appended to the parcel's earlier ones; a parcel gone (removed after
    retention: no hash, so no version) gets nothing, and no hash is created for it."""
    shard = 3
    here = notice_pb2.Notice(parcel_id="p-here", kind=types_pb2.NOTICE_KIND_SHIPPED, version=2)
    gone = notice_pb2.Notice(parcel_id="p-gone", kind=types_pb2.NOTICE_KIND_SHIPPED, version=2)
    await hset(redis, keys.parcel(shard, here.parcel_id), "v", 5)
    attempts = [
        notice_pb2.DeliveryAttempt(status=status, attempted_at=timestamp(at_ms), version=2)
        for status, at_ms in (
            (notice_pb2.NOTICE_STATUS_FAILED, 1_000),
            (notice_pb2.NOTICE_STATUS_SENT, 2_000),
        )
    ]
    for attempt in attempts:
        settlement = Settlement(
            LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=60_000, now_ms=1
        )
        settlement.record(shard, here, attempt)
        settlement.record(shard, gone, attempt)
        await settlement.execute(redis, load_scripts=True)

    view = notice_pb2.NoticeView()
    view.ParseFromString(await hget(redis, keys.parcel(shard, here.parcel_id), "a:SHIPPED") or b"")
    assert list(view.attempts) == attempts
    assert await redis.exists(keys.parcel(shard, gone.parcel_id)) == 0
