"""StreamEvents when a batch cannot be applied: the acks of the batches before it still reach the
client, an oversized batch is rejected in its own ack and the stream goes on, and a storage failure
ends the stream only after the earlier acks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import tracking_pb2, tracking_pb2_grpc, types_pb2

from common import keys
from common.clock import ManualClock
from common.settings import Settings
from engine.ingest import Ingestor
from engine.server import start_server
from engine.state import ParcelStore
from engine.tracking_service import MAX_REJECTED_EVENTS, TrackingServicer, add_tracking_service
from engine.validation import MAX_BATCH_EVENTS
from tests.engine.core_support import event

SHARDS = 4
TRANSIT = types_pb2.TRACKING_STATUS_IN_TRANSIT


@pytest.fixture
async def tracking(
    redis: Redis, clock: ManualClock
) -> AsyncIterator[tracking_pb2_grpc.TrackingServiceAsyncStub]:
    settings = Settings(listen="127.0.0.1:0", shards=SHARDS)
    ingestor = Ingestor(ParcelStore(redis, settings, clock), clock)
    running = await start_server(
        settings, redis, register=[add_tracking_service(TrackingServicer(ingestor, window=3))]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield tracking_pb2_grpc.TrackingServiceStub(channel)
    finally:
        await running.stop(0)


def batch(seq: int, *parcel_ids: str, at_ms: int) -> tracking_pb2.EventBatch:
    return tracking_pb2.EventBatch(
        seq=seq, events=[event(f"{pid}-e{seq}", pid, TRANSIT, at_ms) for pid in parcel_ids]
    )


async def stream(
    stub: tracking_pb2_grpc.TrackingServiceAsyncStub, batches: Sequence[tracking_pb2.EventBatch]
) -> tuple[list[tracking_pb2.BatchAck], grpc.aio.AioRpcError | None]:
    """Write every batch before reading a single ack (so they share the window), then read."""
    # The stubs type only the iterator form; the aio call also takes writes.
    call = stub.StreamEvents()  # type: ignore[call-arg]
    for b in batches:
        await call.write(b)
    await call.done_writing()
    acks: list[tracking_pb2.BatchAck] = []
    try:
        async for ack in call:
            acks.append(ack)
    except grpc.aio.AioRpcError as error:
        return acks, error
    return acks, None


async def exists(redis: Redis, parcel_id: str) -> bool:
    return bool(await redis.exists(keys.parcel(keys.shard_of(parcel_id, SHARDS), parcel_id)))


async def test_an_oversized_batch_is_rejected_in_its_ack_and_the_stream_goes_on(
    tracking: tracking_pb2_grpc.TrackingServiceAsyncStub, redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    oversized = batch(2, *(f"BIG-{i}" for i in range(MAX_BATCH_EVENTS + 1)), at_ms=at_ms)

    acks, error = await stream(
        tracking, [batch(1, "OK-1", at_ms=at_ms), oversized, batch(3, "OK-3", at_ms=at_ms)]
    )

    assert error is None
    assert [(a.seq, a.accepted) for a in acks] == [(1, 1), (2, 0), (3, 1)]
    rejected = acks[1].rejected
    assert [r.index for r in rejected] == list(range(MAX_BATCH_EVENTS + 1))
    assert {(r.code, r.field) for r in rejected} == {(tracking_pb2.REJECT_CODE_INVALID_ARGUMENT, "events")}
    assert all(str(MAX_BATCH_EVENTS) in r.reason for r in rejected)
    assert rejected[7].event_id == "BIG-7-e2"
    assert await exists(redis, "OK-1")
    assert await exists(redis, "OK-3")
    assert not await exists(redis, "BIG-0")


async def test_a_storage_failure_ends_the_stream_after_the_earlier_acks(
    tracking: tracking_pb2_grpc.TrackingServiceAsyncStub, redis: Redis, clock: ManualClock
) -> None:
    # A parcel hash of the wrong type fails its batch's read script with an error reply; batch 1 is
    # large, so it is still being applied when batch 2 has already failed.
    await redis.set(keys.parcel(keys.shard_of("BAD", SHARDS), "BAD"), b"not a hash")
    at_ms = clock.now_ms() - 1000
    first = batch(1, *(f"OK-{i}" for i in range(1000)), at_ms=at_ms)

    acks, error = await stream(
        tracking, [first, batch(2, "BAD", at_ms=at_ms), batch(3, "LATER", at_ms=at_ms)]
    )

    assert [(a.seq, a.accepted) for a in acks] == [(1, 1000)]
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "send the batch again" in (error.details() or "")


async def test_a_batch_too_large_even_to_reject_ends_the_stream_after_the_earlier_acks(
    tracking: tracking_pb2_grpc.TrackingServiceAsyncStub, clock: ManualClock
) -> None:
    # Empty events cost 2 bytes each: answering each with a rejection would multiply the batch's size.
    huge = tracking_pb2.EventBatch(seq=2, events=[tracking_pb2.TrackingEvent()] * (MAX_REJECTED_EVENTS + 1))

    acks, error = await stream(tracking, [batch(1, "OK-1", at_ms=clock.now_ms() - 1000), huge])

    assert [a.seq for a in acks] == [1]
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MAX_BATCH_EVENTS) in (error.details() or "")


async def test_record_events_answers_a_whole_batch_with_a_status(
    tracking: tracking_pb2_grpc.TrackingServiceAsyncStub, redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    with pytest.raises(grpc.aio.AioRpcError) as oversized:
        await tracking.RecordEvents(batch(1, *(f"BIG-{i}" for i in range(MAX_BATCH_EVENTS + 1)), at_ms=at_ms))
    assert oversized.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await redis.set(keys.parcel(keys.shard_of("BAD", SHARDS), "BAD"), b"not a hash")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await tracking.RecordEvents(batch(2, "BAD", at_ms=at_ms))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
