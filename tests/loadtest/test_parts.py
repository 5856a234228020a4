"""The harness's own parts against real servers: the echo baselines, the streaming client, the
counting channel and its reader, Redis round-trip counting."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc

from channels.base import Accepted, EmailAddress, Message
from common.redis_server import free_port
from loadtest.counting_channel import CountingChannel, read_deliveries
from loadtest.echo_server import read_views, start_echo, write_views
from loadtest.ingest_client import plan_streams, stream_batches
from loadtest.journeys import EventBudget, JourneyFactory
from loadtest.redis_stats import RoundTrips, command_stats, counting_client
from tests.conftest import T0_MS


async def test_echo_server_acks_every_event_of_the_streamed_batches() -> None:
    server, port = await start_echo()
    try:
        factory = JourneyFactory(prefix="E", recipients=3)
        budget = EventBudget(900)
        groups = []
        while (group := budget.take_group(factory, 40)) is not None:
            groups.append(group)
        streams = plan_streams(groups, 2, T0_MS)
        result = await stream_batches(f"127.0.0.1:{port}", streams, window=3)
    finally:
        await server.stop(0)
    assert result.events == result.accepted == 900
    assert result.rejected == 0
    assert result.seconds > 0
    assert len(result.ack_ms) == sum(len(s) for s in streams)  # one ack per batch


def _views(count: int) -> list[parcel_pb2.ParcelView]:
    views = []
    for n in range(count):
        view = parcel_pb2.ParcelView(parcel_id=f"V{n}", merchant_id="m-1", substatus="HUB_SCAN" * n)
        view.timeline.add().event.event_id = f"V{n}-e1"
        views.append(view)
    return views


async def _get(port: int, parcel_id: str) -> parcel_pb2.ParcelView:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = parcel_pb2_grpc.ParcelServiceStub(channel)
        reply: parcel_pb2.ParcelView = await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=parcel_id))
        return reply


async def test_echo_server_answers_get_parcel_with_its_views_in_turn() -> None:
    views = _views(2)
    server, port = await start_echo(views=views)
    try:
        answers = [await _get(port, f"any-{n}") for n in range(3)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await parcel_pb2_grpc.ParcelServiceStub(channel).RegisterParcels(
                    parcel_pb2.RegisterParcelsRequest()
                )
    finally:
        await server.stop(0)
    assert answers == [views[0], views[1], views[0]]
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_echo_server_without_views_does_not_serve_get_parcel() -> None:
    server, port = await start_echo()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _get(port, "P1")
    finally:
        await server.stop(0)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_views_file_keeps_every_view_whole(tmp_path: Path) -> None:
    views = _views(5)
    write_views(tmp_path / "views.bin", views)
    assert read_views(tmp_path / "views.bin") == views


async def test_echo_server_workers_share_one_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    views = _views(3)
    write_views(tmp_path / "views.bin", views)
    port = free_port()
    command = [sys.executable, "-m", "loadtest.echo_server", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we signal and reap below, not awaited IO
        [*command, "--views", str(tmp_path / "views.bin")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = asyncio.get_running_loop().time() + 30
        # Both workers listen on the one port before the stop: each then reports and ends cleanly.
        while _listening_workers(proc.pid, port) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the workers did not both listen"
            await asyncio.sleep(0.1)
        answers = [await _get(port, f"P{n}") for n in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert all(answer in views for answer in answers)
    assert out.decode().count("echo services on") == 2, err.decode()  # one line per worker
    assert proc.returncode == 0, err.decode()


def _listening_workers(supervisor: int, port: int) -> int:
    listening = 0
    for child in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            sockets = child.net_connections(kind="tcp")
            listening += any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)
    return listening


async def test_counting_channel_records_each_send_and_reader_counts_duplicates(tmp_path: Path) -> None:
    channel = CountingChannel.from_options({"dir": str(tmp_path)})
    to = EmailAddress("lt-r-1@example.test")
    first = [Message(idempotency_key=f"P{n}:SHIPPED:1:email", to=to, subject="s", text="t") for n in range(3)]
    results = await channel.send(first)
    await channel.send(first[:1])
    await channel.aclose()
    assert all(isinstance(r, Accepted) for r in results)
    assert channel.sent == 4
    deliveries = read_deliveries(tmp_path)
    assert deliveries.total == 4
    assert deliveries.duplicated == {"P0:SHIPPED:1:email": 2}
    assert set(deliveries.first_sent_ms) == {f"P{n}:SHIPPED:1:email" for n in range(3)}


async def test_round_trips_count_a_pipeline_once(redis: Redis, redis_url: str) -> None:
    trips = RoundTrips()
    client = counting_client(redis_url, trips)
    try:
        await client.ping()
        before = await command_stats(redis)
        trips.count = 0
        pipe = client.pipeline(transaction=False)
        for n in range(10):
            pipe.set(f"relais:test:{{0}}:{n}", n)
        await pipe.execute()
        delta = (await command_stats(redis)).minus(before)
    finally:
        await client.aclose()
    assert trips.count == 1
    assert delta.calls.get("set") == 10
