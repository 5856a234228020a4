"""``relais serve --workers N``: real processes sharing one port and one Redis, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc, tracking_pb2, tracking_pb2_grpc, types_pb2

from common import keys
from common.errors import ListenError, SettingsError
from common.redis_server import free_port
from common.settings import Settings
from engine.server import SAME_STOP_S, start_server
from engine.stream_balance import LoadBoard
from tests.engine.core_support import event, registration
from tests.foundation.test_relais_run import wait_serving

RELAIS = Path(sys.executable).parent / "relais"
WORKERS = 2
TRANSIT = types_pb2.TRACKING_STATUS_IN_TRANSIT


def test_workers_setting_and_flag_are_checked() -> None:
    assert Settings.from_env({"RELAIS_ENGINE_WORKERS": "4"}).engine.workers == 4
    assert Settings.from_env({}).engine.workers == 1
    with pytest.raises(SettingsError, match="RELAIS_ENGINE_WORKERS"):
        Settings.from_env({"RELAIS_ENGINE_WORKERS": "0"})
    done = subprocess.run(
        [str(RELAIS), "serve", "--workers", "0"], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert b"--workers" in done.stderr


async def test_a_lone_server_keeps_its_port_and_workers_share_it(redis: Redis) -> None:
    """Without reuse_port a second engine on the same address fails loudly; with it, both listen."""
    first = await start_server(Settings(listen="127.0.0.1:0"), redis)
    try:
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await start_server(Settings(listen=f"127.0.0.1:{first.port}"), redis)
    finally:
        await first.stop(0)
    shared = [await start_server(Settings(listen="127.0.0.1:0"), redis, reuse_port=True)]
    listen = f"127.0.0.1:{shared[0].port}"
    try:
        shared.append(await start_server(Settings(listen=listen), redis, reuse_port=True))
        assert shared[1].port == shared[0].port
    finally:
        for running in shared:
            await running.stop(0)


@pytest.fixture
def engine(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    env |= {"REDIS_URL": redis_url, "RELAIS_LISTEN": f"127.0.0.1:{port}", "RELAIS_GRACE_S": "2"}
    log = (tmp_path / "engine.log").open("wb")
    args = [str(RELAIS), "serve", "--workers", str(WORKERS)]
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for child in _workers(proc.pid, port, alive_only=False):
            child.kill()
        log.close()


def _workers(pid: int, port: int, *, alive_only: bool = True) -> list[psutil.Process]:
    """The supervisor's children that listen on the port (not multiprocessing's resource tracker)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    listening = []
    for child in children:
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections()):
                listening.append(child)
        except psutil.NoSuchProcess:
            if not alive_only:
                listening.append(child)
    return listening


def _serves(worker: psutil.Process, client_ports: set[int]) -> bool:
    return any(c.raddr and c.raddr.port in client_ports for c in worker.net_connections("tcp"))


async def _channel_per_worker(port: int, workers: list[psutil.Process]) -> dict[int, grpc.aio.Channel]:
    """One client connection served by each worker: connect until every worker holds one (the kernel
    picks the worker per connection), matching our socket's port with the worker's peer port."""
    me = psutil.Process()
    found: dict[int, grpc.aio.Channel] = {}
    for _ in range(64):
        before = {c.laddr.port for c in me.net_connections("tcp")}
        # A private subchannel pool: otherwise channels to one target share one connection.
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        await asyncio.wait_for(channel.channel_ready(), 10)
        mine = {c.laddr.port for c in me.net_connections("tcp") if c.raddr and c.raddr.port == port} - before
        owner = next(
            (
                w.pid
                for w in workers
                if any(c.raddr and c.raddr.port in mine for c in w.net_connections("tcp"))
            ),
            None,
        )
        if owner is not None and owner not in found:
            found[owner] = channel
            if len(found) == len(workers):
                return found
        else:
            await channel.close(None)
    raise AssertionError(f"64 connections did not reach all {len(workers)} workers")


async def _all_listening(proc: subprocess.Popen[bytes], port: int) -> list[psutil.Process]:
    """Every worker, once each listens (the second may still be starting when the first answers)."""
    await wait_serving(port, timeout_s=60)
    for _ in range(100):
        workers = _workers(proc.pid, port)
        if len(workers) == WORKERS:
            return workers
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(workers)} of {WORKERS} workers listen")


async def test_workers_serve_one_port_from_one_redis_and_stop_on_sigterm(
    engine: tuple[subprocess.Popen[bytes], int], redis: Redis
) -> None:
    proc, port = engine
    workers = await _all_listening(proc, port)
    channels = await _channel_per_worker(port, workers)
    try:
        first, second = (parcel_pb2_grpc.ParcelServiceStub(c) for c in channels.values())
        reply = await first.RegisterParcels(
            parcel_pb2.RegisterParcelsRequest(parcels=[registration("WRK-1")]), timeout=10
        )
        assert reply.registered == 1
        view = await second.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="WRK-1"), timeout=10)
        assert (view.parcel_id, view.merchant_id, view.registered) == ("WRK-1", "acme", True)
    finally:
        for channel in channels.values():
            await channel.close(None)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


async def test_a_worker_that_dies_stops_the_others(engine: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, port = engine
    workers = await _all_listening(proc, port)
    workers[0].kill()
    assert await asyncio.to_thread(proc.wait, 30) == 1
    assert not workers[1].is_running() or workers[1].status() == psutil.STATUS_ZOMBIE


async def _board(workers: list[psutil.Process]) -> LoadBoard:
    """The workers' board, read from this process, once every worker takes relayed streams."""
    for _ in range(100):
        # A Unix socket's address is its path.
        sockets = [str(c.laddr) for w in workers for c in w.net_connections("unix")]
        sockets = [path for path in sockets if path.endswith(".sock")]
        if len(sockets) >= WORKERS:
            board = LoadBoard(Path(sockets[0]).parent, WORKERS, 0)  # reads only: it writes no row
            if all(board.ready(w) for w in range(WORKERS)):
                return board
        await asyncio.sleep(0.1)
    raise AssertionError("the workers' sockets did not all appear")


async def _open_streams(channel: grpc.aio.Channel, count: int, prefix: str, at_ms: int) -> list[Any]:
    """``count`` StreamEvents calls on ``channel``, each with its first batch (one event for parcel
    ``<prefix>-<n>``) acked."""
    stub = tracking_pb2_grpc.TrackingServiceStub(channel)
    calls = []
    for n in range(count):
        call = stub.StreamEvents()  # type: ignore[call-arg]
        await call.write(
            tracking_pb2.EventBatch(seq=1, events=[event(f"{prefix}-{n}-1", f"{prefix}-{n}", TRANSIT, at_ms)])
        )
        ack = await call.read()
        assert isinstance(ack, tracking_pb2.BatchAck)
        assert ack.accepted == 1
        calls.append(call)
    return calls


async def _last_batch_acked(calls: list[Any], prefix: str, at_ms: int) -> None:
    """Each of ``_open_streams``'s calls sends its second and last batch: acked, and the call ends OK."""
    for n, call in enumerate(calls):
        await call.write(
            tracking_pb2.EventBatch(seq=2, events=[event(f"{prefix}-{n}-2", f"{prefix}-{n}", TRANSIT, at_ms)])
        )
        await call.done_writing()
        ack = await call.read()
        assert isinstance(ack, tracking_pb2.BatchAck)
        assert (ack.seq, ack.accepted) == (2, 1)
        assert await call.code() == grpc.StatusCode.OK


async def test_streams_on_one_connection_are_applied_by_both_workers(
    engine: tuple[subprocess.Popen[bytes], int], redis: Redis
) -> None:
    """One client connection reaches one worker; half its streams are relayed to the other."""
    proc, port = engine
    board = await _board(await _all_listening(proc, port))
    at_ms = time.time_ns() // 1_000_000 - 1000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = await _open_streams(channel, 4, "BAL", at_ms)
        # Four streams open on one connection: two on each worker, whichever the kernel chose.
        assert [board.load(w) for w in range(WORKERS)] == [2, 2]
        for call in calls:
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    for n in range(4):
        view = await redis.exists(keys.parcel(keys.shard_of(f"BAL-{n}", Settings().shards), f"BAL-{n}"))
        assert view == 1
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_sigterm_lets_a_relayed_stream_finish(engine: tuple[subprocess.Popen[bytes], int]) -> None:
    """Draining, a worker that only applies a stream relayed to it must not exit under it: both
    streams of the connection get their last batch acked within the grace period."""
    proc, port = engine
    board = await _board(await _all_listening(proc, port))
    at_ms = time.time_ns() // 1_000_000 - 1000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = await _open_streams(channel, WORKERS, "DRN", at_ms)
        assert [board.load(w) for w in range(WORKERS)] == [1, 1]  # one of them relayed
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # well inside the 2 s grace
        await _last_batch_acked(calls, "DRN", at_ms)
    assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_sigterm_to_the_whole_process_group_still_drains(
    engine: tuple[subprocess.Popen[bytes], int],
) -> None:
    """systemd's default stop (KillMode=control-group), `kill -TERM -<pgid>` or `timeout` signal every
    process at once: each worker gets SIGTERM from the sender and again from its supervisor. That is
    one request to stop, not a second "stop now": the streams still get their last batch acked."""
    proc, port = engine
    workers = await _all_listening(proc, port)
    board = await _board(workers)
    at_ms = time.time_ns() // 1_000_000 - 1000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = await _open_streams(channel, WORKERS, "GRP", at_ms)
        assert [board.load(w) for w in range(WORKERS)] == [1, 1]
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # well inside the 2 s grace
        await _last_batch_acked(calls, "GRP", at_ms)
    assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_a_later_second_sigterm_stops_at_once(engine: tuple[subprocess.Popen[bytes], int]) -> None:
    """A second SIGTERM past ``SAME_STOP_S`` is an operator's "stop now": open streams are cut before
    the 2 s grace ends."""
    proc, port = engine
    await _board(await _all_listening(proc, port))
    at_ms = time.time_ns() // 1_000_000 - 1000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = await _open_streams(channel, WORKERS, "NOW", at_ms)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(SAME_STOP_S + 0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 0.6) == 0  # the grace would end 0.6 s later
        for call in calls:
            assert await call.code() != grpc.StatusCode.OK
