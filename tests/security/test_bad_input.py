"""What bad input and bugs get: oversized messages, deadlines, and no traceback for the caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc, tracking_pb2, tracking_pb2_grpc

from common.clock import ManualClock
from common.settings import SecuritySettings
from tests.security.conftest import bearer, serving, settings_with
from tests.security.probe import SECRET_EMAIL, ProbeParcels, add_probes


async def test_a_bug_becomes_internal_without_its_message_and_is_logged_without_personal_data(
    redis: Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(settings_with(SecuritySettings()), redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = parcel_pb2_grpc.ParcelServiceStub(channel)
            with caplog.at_level(logging.DEBUG), pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="boom"), timeout=5)
            error = info.value
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == "internal error"
            assert "Traceback" not in str(error)
            assert SECRET_EMAIL not in str(error)
            # The server still answers.
            view = await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="p1"), timeout=5)
            assert view.parcel_id == "p1"
    logged = [r for r in caplog.records if r.name == "engine.interceptors"]
    assert len(logged) == 1
    assert "ValueError" in logged[0].getMessage()
    assert "GetParcel" in logged[0].getMessage()
    assert all(SECRET_EMAIL not in r.getMessage() and not r.exc_info for r in caplog.records)


async def test_oversized_messages_are_resource_exhausted(redis: Redis, clock: ManualClock) -> None:
    settings = settings_with(SecuritySettings(), max_message_bytes=64 * 1024)
    async with serving(settings, redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tracking_pb2_grpc.TrackingServiceStub(channel)
            events = [tracking_pb2.TrackingEvent(event_id=f"e{i}", description="x" * 200) for i in range(400)]
            big = tracking_pb2.EventBatch(seq=1, events=events)
            assert big.ByteSize() > 64 * 1024
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RecordEvents(big, timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = tracking_pb2.EventBatch(seq=2, events=events[:10])
            assert (await stub.RecordEvents(small, timeout=5)).accepted == 10


async def test_a_call_past_its_deadline_is_cancelled_on_the_server(
    redis: Redis, clock: ManualClock, keys_file: Path
) -> None:
    parcels = ProbeParcels()
    settings = settings_with(SecuritySettings(keys_file=keys_file))
    async with serving(settings, redis, clock, [lambda s: add_probes(s, parcels)]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = parcel_pb2_grpc.ParcelServiceStub(channel)
            call = stub.GetParcel(
                parcel_pb2.GetParcelRequest(parcel_id="hang"), metadata=bearer("operator"), timeout=0.3
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(parcels.cancelled.wait(), timeout=5)
            assert parcels.hanging.is_set()


async def test_a_body_that_does_not_parse_is_invalid_argument_not_the_parsers_message(
    redis: Redis, clock: ManualClock
) -> None:
    async with serving(settings_with(SecuritySettings()), redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            # No serializers: the bodies go on the wire as they are.
            unary = channel.unary_unary("/relais.v1.TrackingService/RecordEvents", None, None)
            stream = channel.stream_stream("/relais.v1.TrackingService/StreamEvents", None, None)
            # Corrupt wire format, and a string field that is not UTF-8.
            for body in (b"\xff\xff\xff", b"\x12\x03\x0a\x01\xff"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary(body, timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "the request body is not a valid relais.v1.EventBatch"

            async def bodies() -> AsyncIterator[bytes]:
                yield tracking_pb2.EventBatch(seq=1).SerializeToString()
                yield b"\xff\xff"

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ack in stream(bodies(), timeout=5):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_away_is_unavailable_not_internal(clock: ManualClock) -> None:
    from common.redis_client import connect
    from common.redis_server import free_port
    from engine.app import build_engine

    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    settings = settings_with(SecuritySettings())
    try:
        async with serving(settings, dead, clock, build_engine(settings, dead, clock).register) as running:  # noqa: SIM117
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = parcel_pb2_grpc.ParcelServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="p1"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == "storage unavailable; retry later"
    finally:
        await dead.aclose()


async def test_an_unknown_method_is_unimplemented_and_the_server_keeps_serving(
    redis: Redis, clock: ManualClock
) -> None:
    async with serving(settings_with(SecuritySettings()), redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for n in range(3):
                unknown = channel.unary_unary(f"/relais.v1.ParcelService/NoSuchMethod{n}", None, None)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unknown(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stub = parcel_pb2_grpc.ParcelServiceStub(channel)
            view = await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="p1"), timeout=5)
            assert view.parcel_id == "p1"
