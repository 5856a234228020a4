"""Streams spread over workers by load (``engine.stream_balance``): real gRPC servers, each with its
private Unix socket, sharing one board and one Redis, in this process so each worker's store can be
asked what it applied."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import tracking_pb2, tracking_pb2_grpc, types_pb2

from common import keys
from common.clock import ManualClock
from common.settings import SecuritySettings, Settings
from common.telemetry import Telemetry, noop_telemetry, setup_telemetry
from engine.auth import hash_key
from engine.ingest import Ingestor
from engine.server import EngineServer, start_server
from engine.state import ParcelStore
from engine.stream_balance import (
    DIRECTORY_PREFIX,
    OWNER_FILE,
    PEER_GONE,
    RELAY_MIN_EVENTS,
    LoadBoard,
    WorkerPeers,
    peers_directory,
)
from engine.tracking_service import MAX_REJECTED_EVENTS, TOO_MANY, TrackingServicer, add_tracking_service
from tests.engine.core_support import event
from tests.security.test_telemetry import metric_points

SHARDS = 4
TRANSIT = types_pb2.TRACKING_STATUS_IN_TRANSIT
SETTINGS = Settings(listen="127.0.0.1:0", shards=SHARDS)


@dataclass
class Worker:
    running: EngineServer
    store: ParcelStore
    peers: WorkerPeers


@contextlib.asynccontextmanager
async def workers(
    redis: Redis,
    clock: ManualClock,
    settings: Settings = SETTINGS,
    count: int = 2,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[list[Worker]]:
    """``count`` engine workers as ``relais serve --workers`` wires them, each on a port of its own."""
    started: list[Worker] = []
    telemetry = telemetry or noop_telemetry()
    with peers_directory(settings, count) as directory:
        try:
            for index in range(count):
                peers = WorkerPeers.open(directory, count, index, settings, telemetry)
                assert peers is not None
                store = ParcelStore(redis, settings, clock)
                ingestor = Ingestor(store, clock, tracer=telemetry.tracer)
                servicer = TrackingServicer(ingestor, window=3, relay=peers.relay)
                register = [add_tracking_service(servicer)]
                running = await start_server(settings, redis, register=register, telemetry=telemetry)
                await peers.attach(running, ingestor)
                started.append(Worker(running, store, peers))
            yield started
        finally:
            for worker in started:
                await worker.running.stop(0)


@contextlib.asynccontextmanager
async def busy_client(
    worker: Worker, streams: int = 1
) -> AsyncIterator[tracking_pb2_grpc.TrackingServiceAsyncStub]:
    """A client of ``worker`` while it already applies ``streams`` streams of its own: a new stream
    or large call it takes goes to a less loaded peer."""
    with contextlib.ExitStack() as held:
        for _ in range(streams):
            held.enter_context(worker.peers.board.own())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.running.port}") as channel:
            yield tracking_pb2_grpc.TrackingServiceStub(channel)


def batch(seq: int, *parcel_ids: str, at_ms: int, carrier: str = "swisspost") -> tracking_pb2.EventBatch:
    events = [event(f"{pid}-e{seq}", pid, TRANSIT, at_ms) for pid in parcel_ids]
    for e in events:
        e.carrier = carrier
    return tracking_pb2.EventBatch(seq=seq, events=events)


async def exists(redis: Redis, parcel_id: str) -> bool:
    return bool(await redis.exists(keys.parcel(keys.shard_of(parcel_id, SHARDS), parcel_id)))


async def read_all(
    call: grpc.aio.StreamStreamCall[tracking_pb2.EventBatch, tracking_pb2.BatchAck],
) -> tuple[list[tracking_pb2.BatchAck], grpc.aio.AioRpcError | None]:
    """The acks left, and the status that ended the call if not OK."""
    acks: list[tracking_pb2.BatchAck] = []
    try:
        while (ack := await next_ack(call)) is not None:
            acks.append(ack)
    except grpc.aio.AioRpcError as error:
        return acks, error
    return acks, None


async def next_ack(
    call: grpc.aio.StreamStreamCall[tracking_pb2.EventBatch, tracking_pb2.BatchAck],
) -> tracking_pb2.BatchAck | None:
    """The next ack, None at the end of the stream (``read`` gives gRPC's EOF marker then)."""
    ack = await call.read()
    return ack if isinstance(ack, tracking_pb2.BatchAck) else None


async def settled(board: LoadBoard, loads: Sequence[int]) -> None:
    """The board as expected once the server side of the calls finished (just after the client's)."""
    for _ in range(100):
        if [board.load(w) for w in range(board.count)] == list(loads):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"loads {[board.load(w) for w in range(board.count)]}, expected {list(loads)}")


def test_the_board_picks_the_ready_peer_applying_the_fewest_streams(tmp_path: Path) -> None:
    rows = [LoadBoard(tmp_path, 3, index) for index in range(3)]
    first, second, third = rows
    assert [first.load(w) for w in range(3)] == [0, 0, 0]
    assert first.choose() is None  # no one ready, and no one less loaded
    second.set_ready(True)
    third.set_ready(True)
    assert first.choose() is None  # a tie keeps the stream where it is: no hop for nothing
    with first.own(), first.own(), third.relayed(1):
        # Every row sees the same loads: the first applies 2 of its own, the second 1 relayed to it.
        assert [third.load(w) for w in range(3)] == [2, 1, 0]
        assert first.choose() == 2
        third.set_ready(False)  # draining: takes no more
        assert first.choose() == 1
        assert second.choose() is None
    assert [second.load(w) for w in range(3)] == [0, 0, 0]


def test_balancing_is_on_by_default_with_several_workers_and_can_be_turned_off() -> None:
    assert Settings.from_env({}).engine.balance_streams
    off = Settings.from_env({"RELAIS_ENGINE_BALANCE_STREAMS": "off"})
    assert not off.engine.balance_streams
    with peers_directory(off, 4) as none, peers_directory(SETTINGS, 1) as alone:
        assert none is None
        assert alone is None
    with peers_directory(SETTINGS, 2) as directory:
        assert directory is not None
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / OWNER_FILE).read_text() == str(os.getpid())
        assert WorkerPeers.open(None, 2, 0, SETTINGS, noop_telemetry()) is None
    assert not directory.exists()


async def test_a_stream_reaching_a_busy_worker_is_applied_whole_by_the_idle_one(
    redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    async with workers(redis, clock) as (busy, idle):
        board = busy.peers.board
        async with busy_client(busy, streams=2) as stub:
            call = stub.StreamEvents()  # type: ignore[call-arg]
            await call.write(batch(1, "R-1", "R-2", at_ms=at_ms))
            first = await next_ack(call)
            # While the stream runs, every worker sees it counted on the idle one.
            assert [idle.peers.board.load(w) for w in range(2)] == [2, 1]
            await call.write(batch(2, "R-1", at_ms=at_ms + 1))
            again = batch(3, "R-3", at_ms=at_ms)
            await call.write(again)
            again.seq = 4
            await call.write(again)  # the same event again
            await call.done_writing()
            rest, error = await read_all(call)
        await settled(board, [0, 0])
    assert error is None
    assert first is not None
    acks = [first, *rest]
    assert [a.seq for a in acks] == [1, 2, 3, 4]
    assert [(a.accepted, a.duplicates) for a in acks] == [(2, 0), (1, 0), (1, 0), (0, 1)]
    # The idle worker's store read and wrote every parcel; the busy one's never went to Redis.
    assert busy.store.round_trips == 0
    assert idle.store.round_trips > 0
    for pid in ("R-1", "R-2", "R-3"):
        assert await exists(redis, pid)


async def test_streams_stay_where_they_land_while_the_workers_are_even(
    redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    async with (
        workers(redis, clock) as (first, second),
        grpc.aio.insecure_channel(f"127.0.0.1:{first.running.port}") as channel,
    ):
        call = tracking_pb2_grpc.TrackingServiceStub(channel).StreamEvents()  # type: ignore[call-arg]
        await call.write(batch(1, "S-1", at_ms=at_ms))
        await call.read()
        assert [first.peers.board.load(w) for w in range(2)] == [1, 0]
        await call.done_writing()
        _, error = await read_all(call)
    assert error is None
    assert first.store.round_trips > 0
    assert second.store.round_trips == 0


async def test_a_draining_peer_takes_no_new_stream(redis: Redis, clock: ManualClock) -> None:
    at_ms = clock.now_ms() - 1000
    async with workers(redis, clock) as (busy, draining):
        draining.peers.withdraw()
        async with busy_client(busy) as stub:
            acks = [a async for a in stub.StreamEvents(iter([batch(1, "D-1", at_ms=at_ms)]))]
    assert [a.accepted for a in acks] == [1]
    assert draining.store.round_trips == 0
    assert busy.store.round_trips > 0


async def test_a_peer_that_dies_mid_stream_ends_it_unavailable_after_the_acks_before(
    redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    async with workers(redis, clock) as (busy, dying), busy_client(busy) as stub:
        call = stub.StreamEvents()  # type: ignore[call-arg]
        await call.write(batch(1, "X-1", at_ms=at_ms))
        first = await next_ack(call)
        # Gone without draining, as a crashed process: its row still says ready.
        assert dying.peers.server is not None
        await dying.peers.server.stop(0)
        # Nothing more written: a write racing the relay's end of the call fails on gRPC's
        # client side (INTERNAL), which would hide the status the engine sent.
        rest, error = await read_all(call)
    assert first is not None
    assert first.seq == 1
    assert first.accepted == 1
    assert rest == []
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == PEER_GONE


async def test_a_peer_ending_a_stream_for_the_carrier_is_heard_as_it_said_it(
    redis: Redis, clock: ManualClock
) -> None:
    """A batch too large even to reject event by event ends the stream INVALID_ARGUMENT, relayed or not."""
    at_ms = clock.now_ms() - 1000
    empty = tracking_pb2.TrackingEvent()
    too_large = tracking_pb2.EventBatch(seq=2, events=[empty] * (MAX_REJECTED_EVENTS + 1))
    async with workers(redis, clock) as (busy, _idle), busy_client(busy) as stub:
        call = stub.StreamEvents(iter([batch(1, "L-1", at_ms=at_ms), too_large]))
        acks, error = await read_all(call)
    assert [a.seq for a in acks] == [1]
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == TOO_MANY


@pytest.fixture
def carrier_keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.jsonl"
    path.write_text(f'{{"sha256": "{hash_key("key-swisspost")}", "principal": "carrier:swisspost"}}\n')
    return path


async def test_relayed_streams_and_calls_keep_their_callers_rights(
    redis: Redis, clock: ManualClock, carrier_keys: Path
) -> None:
    """The peer applies as the carrier that called: its events pass, another carrier's are refused."""
    settings = Settings(
        listen="127.0.0.1:0",
        shards=SHARDS,
        security=SecuritySettings(keys_file=carrier_keys),
    )
    at_ms = clock.now_ms() - 1000
    mixed = batch(1, "K-1", at_ms=at_ms)
    mixed.events.append(batch(1, "K-2", at_ms=at_ms, carrier="dhl-de").events[0])
    # A call large enough to be relayed, its last event another carrier's.
    called = batch(2, *(f"KC-{i}" for i in range(RELAY_MIN_EVENTS - 1)), at_ms=at_ms)
    called.events.append(batch(2, "KC-other", at_ms=at_ms, carrier="dhl-de").events[0])
    async with workers(redis, clock, settings) as (busy, idle), busy_client(busy) as stub:
        metadata = (("authorization", "Bearer key-swisspost"),)
        acks = [a async for a in stub.StreamEvents(iter([mixed]), metadata=metadata)]
        acks.append(await stub.RecordEvents(called, metadata=metadata))
        # No message sent: a write racing the server's refusal fails on the client's side.
        refused, error = await read_all(stub.StreamEvents(iter([])))
    assert idle.store.round_trips > 0
    assert busy.store.round_trips == 0
    assert [a.accepted for a in acks] == [1, RELAY_MIN_EVENTS - 1]
    assert [[(r.index, r.code, r.field) for r in a.rejected] for a in acks] == [
        [(1, tracking_pb2.REJECT_CODE_PERMISSION_DENIED, "carrier")],
        [(RELAY_MIN_EVENTS - 1, tracking_pb2.REJECT_CODE_PERMISSION_DENIED, "carrier")],
    ]
    assert await exists(redis, "K-1")
    assert await exists(redis, "KC-0")
    assert not await exists(redis, "K-2")
    assert not await exists(redis, "KC-other")
    # Without a key the carrier's worker refuses the call itself: nothing is relayed.
    assert refused == []
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_relayed_stream_drains_with_the_worker_it_reached(redis: Redis, clock: ManualClock) -> None:
    """SIGTERM's drain: the carrier's worker lets its streams finish within the grace period, relayed
    ones included, although no stream was relayed to it (its own peer socket stops at once)."""
    at_ms = clock.now_ms() - 1000
    async with workers(redis, clock) as (busy, idle), busy_client(busy) as stub:
        call = stub.StreamEvents()  # type: ignore[call-arg]
        await call.write(batch(1, "G-1", at_ms=at_ms))
        assert await next_ack(call) is not None
        draining = asyncio.create_task(busy.running.stop(5.0))
        await asyncio.sleep(0.2)  # its peer socket has stopped by now; its public server drains
        assert not draining.done()
        await call.write(batch(2, "G-2", at_ms=at_ms))
        await call.done_writing()
        rest, error = await read_all(call)
        await draining
    assert error is None
    assert [a.seq for a in rest] == [2]
    assert idle.store.round_trips > 0
    assert busy.store.round_trips == 0


async def test_a_large_record_call_goes_to_the_idle_worker_and_a_small_one_stays(
    redis: Redis, clock: ManualClock
) -> None:
    at_ms = clock.now_ms() - 1000
    large = batch(1, *(f"U-{i}" for i in range(RELAY_MIN_EVENTS)), at_ms=at_ms)
    small = batch(2, *(f"V-{i}" for i in range(RELAY_MIN_EVENTS - 1)), at_ms=at_ms)
    async with workers(redis, clock) as (busy, idle), busy_client(busy) as stub:
        relayed = await stub.RecordEvents(large)
        assert idle.store.round_trips > 0
        assert busy.store.round_trips == 0
        kept = await stub.RecordEvents(small)
        assert busy.store.round_trips > 0
        await settled(busy.peers.board, [1, 0])
        # The peer gone (its row still ready, as after a crash): the call fails, to be resent.
        assert idle.peers.server is not None
        await idle.peers.server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.RecordEvents(large)
    assert (relayed.seq, relayed.accepted) == (1, RELAY_MIN_EVENTS)
    assert (kept.seq, kept.accepted) == (2, RELAY_MIN_EVENTS - 1)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == PEER_GONE
    for pid in ("U-0", f"U-{RELAY_MIN_EVENTS - 1}", "V-0"):
        assert await exists(redis, pid)


async def test_a_worker_that_cannot_open_its_socket_serves_on_and_is_not_relayed_to(
    redis: Redis, clock: ManualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_dir = tmp_path / ("d" * 120)  # a socket path past the kernel's limit
    long_dir.mkdir()
    peers = WorkerPeers.open(long_dir, 2, 1, SETTINGS, noop_telemetry())
    assert peers is not None
    ingestor = Ingestor(ParcelStore(redis, SETTINGS, clock), clock)
    await peers.start(ingestor)
    assert peers.server is None
    assert not LoadBoard(long_dir, 2, 0).ready(1)
    assert "streams will not be relayed to this worker" in caplog.text
    await peers.stop(0)
    await peers.close()


async def test_a_relayed_stream_stays_in_its_callers_trace_and_is_counted(
    redis: Redis, clock: ManualClock
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(SETTINGS, span_exporter=spans, metric_reader=reader)
    at_ms = clock.now_ms() - 1000
    try:
        async with workers(redis, clock, telemetry=telemetry) as (busy, idle), busy_client(busy) as stub:
            acks = [a async for a in stub.StreamEvents(iter([batch(1, "T-1", at_ms=at_ms)]))]
        assert idle.store.round_trips > 0
        telemetry.tracer_provider.force_flush()  # type: ignore[union-attr]
    finally:
        telemetry.shutdown()
    assert [a.accepted for a in acks] == [1]
    servers = [s for s in spans.get_finished_spans() if s.name.endswith("TrackingService/StreamEvents")]
    applied = [s for s in spans.get_finished_spans() if s.name == "ingest.batch"]
    # The carrier's call on the busy worker, the relayed one on the idle worker, its child; one trace.
    assert len(servers) == 2
    assert len(applied) == 1
    outer, inner = sorted(servers, key=lambda s: s.start_time or 0)
    assert inner.parent is not None
    assert {s.context.trace_id for s in (outer, inner, applied[0])} == {outer.context.trace_id}
    # Operators see the relays counted.
    assert metric_points(reader)["relais.ingest.relayed"] == [({"kind": "stream"}, 1)]


def test_a_directory_left_by_a_killed_engine_is_removed_by_the_next(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    abandoned = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
    (abandoned / OWNER_FILE).write_text(str(gone.pid))
    running = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
    (running / OWNER_FILE).write_text(str(os.getpid()))
    unknown = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))  # no owner file: not judged
    try:
        with peers_directory(SETTINGS, 2) as directory:
            assert directory is not None
            assert not abandoned.exists()
            assert running.exists()
            assert unknown.exists()
    finally:
        for path in (abandoned, running, unknown):
            shutil.rmtree(path, ignore_errors=True)
