"""The engine server over a real gRPC connection: health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from common.redis_client import connect
from common.redis_server import free_port
from common.settings import Settings
from engine.server import EngineServer, start_server
from engine.services import SERVICE_NAMES

SLOW_METHOD = "/relais.test.Slow/Wait"


def slow_service(started: asyncio.Event) -> grpc.GenericRpcHandler[bytes, bytes]:
    async def wait(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        started.set()
        await asyncio.sleep(0.5)
        return b"done:" + request

    handler = grpc.unary_unary_rpc_method_handler(wait)
    return grpc.method_handlers_generic_handler("relais.test.Slow", {"Wait": handler})


@pytest.fixture
async def server(redis: Redis) -> AsyncIterator[EngineServer]:
    running = await start_server(Settings(listen="127.0.0.1:0"), redis)
    try:
        yield running
    finally:
        await running.stop(0)


async def health_status(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):  # SERVING follows Redis' first answer, a moment after start
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        return int(reply.status)


async def test_health_is_serving_for_every_service(server: EngineServer) -> None:
    for service in ("", *SERVICE_NAMES):
        assert await health_status(server.port, service) == health_pb2.HealthCheckResponse.SERVING


async def test_health_not_serving_while_redis_is_unreachable() -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    running = await start_server(Settings(listen="127.0.0.1:0"), dead)
    try:
        await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop(0)
        await dead.aclose()


async def list_services(port: int) -> set[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names: set[str] = set()
        async for reply in call:
            names.update(s.name for s in reply.list_services_response.service)
        return names


async def test_reflection_lists_the_four_services(server: EngineServer) -> None:
    names = await list_services(server.port)
    assert {
        "relais.v1.TrackingService",
        "relais.v1.ParcelService",
        "relais.v1.PreferenceService",
        "relais.v1.AlertService",
    } <= names
    assert "grpc.health.v1.Health" in names


async def test_reflection_serves_the_contract_files(server: EngineServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="relais.v1.TrackingService")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    assert replies[0].file_descriptor_response.file_descriptor_proto


async def test_graceful_shutdown_completes_the_in_flight_call(redis: Redis) -> None:
    started = asyncio.Event()
    running = await start_server(
        Settings(listen="127.0.0.1:0", grace_s=5.0),
        redis,
        register=[lambda server: server.add_generic_rpc_handlers([slow_service(started)])],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        wait = channel.unary_unary(SLOW_METHOD, None, None)
        in_flight = asyncio.ensure_future(wait(b"x", timeout=10))
        await started.wait()
        stopping = asyncio.ensure_future(running.stop())
        await asyncio.sleep(0.05)
        # Draining: load balancers see NOT_SERVING while the call is still running.
        assert running.draining
        assert await in_flight == b"done:x"
        await stopping
    # After the grace period nothing listens any more.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(SLOW_METHOD, None, None)(b"y", timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_shutdown_with_zero_grace_cancels_the_in_flight_call(redis: Redis) -> None:
    started = asyncio.Event()
    running = await start_server(
        Settings(listen="127.0.0.1:0"),
        redis,
        register=[lambda server: server.add_generic_rpc_handlers([slow_service(started)])],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        in_flight = asyncio.ensure_future(channel.unary_unary(SLOW_METHOD, None, None)(b"x", timeout=10))
        await started.wait()
        await running.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):
            await in_flight
