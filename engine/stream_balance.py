"""Carriers' streams and calls spread over the engine's workers by load, not by the kernel's hash.

``relais serve --workers N`` shares one port (SO_REUSEPORT): the kernel hashes each *connection* to a
worker, and a carrier's ``StreamEvents`` stays on its connection's worker for as long as it runs.
Sixteen streams split 11 to 5 leave one core with a backlog while the other idles (the ingest
benchmark measured the busiest of two workers doing 0.62-0.70 of the work). So a worker that takes a
new stream while a peer applies fewer relays it: it opens the same stream on that peer's private
socket and passes batches one way and acks the other. A stream goes whole to one worker, so its
batches still apply in the order they came, taking turns on shared parcels within that worker
(``engine.state.ParcelStore``), as they would without the relay. A ``RecordEvents`` call of at least
``RELAY_MIN_EVENTS`` events is relayed the same way (smaller ones cost less to apply than to pass on).

The board is a small file every worker maps, in the supervisor's private directory: one row per
worker, written by that worker only: ``[ready, own, relayed to worker 0 .. N-1]``, counting streams
and calls in progress. A worker's load is its own plus what every row relays to it: a stream
counts as much as a call, whatever its rate. (Adding the batches being applied, so a busy stream
would outweigh a quiet one, spread the benchmark's 16 equal streams worse: they open at once, and
the batches in flight when each is placed are noise. Busiest worker's share 0.52-0.57 against
0.50-0.53.) Reads race the writes harmlessly: the figure only picks a worker, it guards nothing.

A peer's socket serves TrackingService behind the error guard (spans, internal errors) but without
authentication: the caller's principal comes in metadata (``relais-principal``), trusted because
only the engine's own processes can open a socket in a directory only its user may enter (0700).
Quotas were charged on the way in, by the worker the carrier is connected to. The trace context
goes along, so a relayed batch stays in its caller's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from relais.v1 import tracking_pb2, tracking_pb2_grpc

from common.settings import Settings
from common.telemetry import Metrics, Telemetry, inject_trace_context
from engine.auth import Principal, bind_principal, current_principal, unbind_principal
from engine.ingest import Ingestor
from engine.interceptors import ErrorGuard, GuardedRegistry
from engine.tracking_service import (
    CONFLICT,
    TOO_LARGE,
    UNAVAILABLE,
    Context,
    Failure,
    TrackingServicer,
    abort_with,
)

if TYPE_CHECKING:
    from engine.server import EngineServer

log = logging.getLogger(__name__)

PRINCIPAL_HEADER = "relais-principal"
# A RecordEvents batch smaller than this is applied where it lands. Passing a call on costs a unary
# call's server and client CPU once more (0.6-0.7 ms, docs/benchmarks.md session 3), what applying
# about 5 events costs (~125 us each): from 32 events on, the relay adds a sixth at most.
RELAY_MIN_EVENTS = 32
BOARD_FILE = "streams.board"
DIRECTORY_PREFIX = "relais-workers-"
# The supervisor's pid, so a later engine can tell the directory of one killed outright.
OWNER_FILE = "owner.pid"
# A peer that does not answer: the carrier resends from the first unacknowledged batch, as after any
# other worker failure.
PEER_GONE = "engine worker unavailable; send the batch again"
# What a peer's servicer ends a stream with on its own, passed on as it is; any other status means the
# peer itself failed.
PEER_FAILURES = frozenset({TOO_LARGE, CONFLICT, UNAVAILABLE})


@contextlib.contextmanager
def peers_directory(settings: Settings, count: int) -> Iterator[Path | None]:
    """The private directory (mode 0700) of one engine's ``count`` workers, for the board and their
    sockets, removed after them; None when there is nothing to balance."""
    if count < 2 or not settings.engine.balance_streams:
        yield None
        return
    _remove_abandoned(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=DIRECTORY_PREFIX) as directory:
        (Path(directory) / OWNER_FILE).write_text(str(os.getpid()))
        yield Path(directory)


def _remove_abandoned(parent: Path) -> None:
    """Directories left by engines killed outright (SIGKILL leaves no time to clean up): theirs is
    the owner's pid, and that process is gone. Ours only (mode 0700: another user's are unreadable)."""
    for directory in parent.glob(DIRECTORY_PREFIX + "*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge, or still being created
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def peer_socket(directory: Path, index: int) -> str:
    return f"unix:{directory / f'worker-{index}.sock'}"


class LoadBoard:
    """The shared rows of work counts (see the module's docstring); this process writes row ``index``."""

    def __init__(self, directory: Path, count: int, index: int) -> None:
        self.count = count
        self.index = index
        self._width = count + 2
        size = count * self._width * 8
        fd = os.open(directory / BOARD_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Every worker sizes it the same; the kernel zero-fills what it adds.
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Aligned 8-byte cells: a write is one store, never seen half done.
        self._cells = memoryview(self._map).cast("q")

    def _at(self, row: int, column: int) -> int:
        return row * self._width + column

    def _add(self, column: int, delta: int) -> None:
        cell = self._at(self.index, column)
        self._cells[cell] += delta

    def set_ready(self, ready: bool) -> None:
        self._cells[self._at(self.index, 0)] = 1 if ready else 0

    def ready(self, worker: int) -> bool:
        return self._cells[self._at(worker, 0)] == 1

    def load(self, worker: int) -> int:
        """Streams and calls ``worker`` applies: its own and those relayed to it."""
        relayed = sum(self._cells[self._at(row, 2 + worker)] for row in range(self.count))
        return self._cells[self._at(worker, 1)] + relayed

    def choose(self) -> int | None:
        """The ready peer with the least load if it has less than this worker; else None."""
        best: int | None = None
        best_load = self.load(self.index)
        for worker in range(self.count):
            if worker != self.index and self.ready(worker) and (load := self.load(worker)) < best_load:
                best, best_load = worker, load
        return best

    @contextlib.contextmanager
    def _counting(self, column: int) -> Iterator[None]:
        self._add(column, 1)
        try:
            yield
        finally:
            self._add(column, -1)

    def own(self) -> contextlib.AbstractContextManager[None]:
        """A stream or call this worker applies for its own caller."""
        return self._counting(1)

    def relayed(self, worker: int) -> contextlib.AbstractContextManager[None]:
        """A stream or call this worker relays to ``worker``."""
        return self._counting(2 + worker)


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]


@dataclass
class StreamRelay:
    """Where a new stream or call goes: applied here, or relayed whole to a less loaded peer."""

    board: LoadBoard
    directory: Path
    settings: Settings
    metrics: Metrics | None = None
    _stubs: dict[int, tracking_pb2_grpc.TrackingServiceAsyncStub] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def choose(self) -> int | None:
        return self.board.choose()

    @staticmethod
    def worth_relaying(batch: tracking_pb2.EventBatch) -> bool:
        return len(batch.events) >= RELAY_MIN_EVENTS

    def own(self) -> contextlib.AbstractContextManager[None]:
        return self.board.own()

    def _stub(self, worker: int) -> tracking_pb2_grpc.TrackingServiceAsyncStub:
        stub = self._stubs.get(worker)
        if stub is None:
            channel = grpc.aio.insecure_channel(
                peer_socket(self.directory, worker), options=channel_options(self.settings)
            )
            self._channels.append(channel)
            stub = self._stubs[worker] = tracking_pb2_grpc.TrackingServiceStub(channel)
        return stub

    async def relay(
        self,
        worker: int,
        requests: AsyncIterator[tracking_pb2.EventBatch],
        context: Context,
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        """The stream applied by ``worker``: batches passed on as they come, its acks passed back.

        Flow control holds end to end: a batch is read from the carrier only once the peer took the
        previous one, and an ack is read from the peer only once the carrier took the previous one.
        """
        # The stubs type only the iterator form; the aio call also takes writes.
        call = self._stub(worker).StreamEvents(  # type: ignore[call-arg]
            metadata=_as_caller(), timeout=context.time_remaining()
        )

        async def pump() -> None:
            try:
                async for batch in requests:
                    await call.write(batch)
            finally:
                # Also when reading the carrier failed: the peer acknowledges what it took, then that
                # failure ends the call, as it would on a worker applying the stream itself.
                if not call.done():
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.done_writing()

        if self.metrics is not None:
            self.metrics.relayed_call("stream")
        with self.board.relayed(worker):
            pumping = asyncio.create_task(pump())
            # Its failure is raised below when the peer's acks end; if the peer failed first, it is moot.
            pumping.add_done_callback(lambda task: task.cancelled() or task.exception())
            try:
                try:
                    async for ack in call:
                        yield ack
                except grpc.aio.AioRpcError as error:
                    await abort_with(context, _failure_of(error))
                await pumping  # the carrier's side failed: its error ends the call
            finally:
                pumping.cancel()
                call.cancel()

    async def record(
        self, worker: int, batch: tracking_pb2.EventBatch, context: Context
    ) -> tracking_pb2.BatchAck:
        """``RecordEvents`` applied by ``worker``."""
        if self.metrics is not None:
            self.metrics.relayed_call("call")
        with self.board.relayed(worker):
            try:
                ack: tracking_pb2.BatchAck = await self._stub(worker).RecordEvents(
                    batch, metadata=_as_caller(), timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as error:
                await abort_with(context, _failure_of(error))
            return ack

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


def _as_caller() -> tuple[tuple[str, str], ...]:
    """The metadata that has a peer apply as the current caller, in the current trace."""
    metadata: dict[str, str] = {}
    inject_trace_context(metadata)
    principal = current_principal()
    if principal is not None:
        metadata[PRINCIPAL_HEADER] = str(principal)
    return tuple(metadata.items())


def _failure_of(error: grpc.aio.AioRpcError) -> Failure:
    """A peer's status as the relaying worker answers it. A bug on the peer stays INTERNAL (with its
    trace id), so the carrier does not resend into it as into a peer that went away."""
    failure = Failure(error.code(), error.details() or "")
    if failure in PEER_FAILURES or failure.code == grpc.StatusCode.INTERNAL:
        return failure
    return Failure(grpc.StatusCode.UNAVAILABLE, PEER_GONE)


def _principal_of(context: Context) -> Principal | None:
    for name, value in context.invocation_metadata() or ():
        if name == PRINCIPAL_HEADER and isinstance(value, str):
            return Principal.parse(value)
    return None


class PeerTrackingServicer(TrackingServicer):
    """TrackingService on a worker's private socket: streams its peers relay, as their caller."""

    async def StreamEvents(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[tracking_pb2.EventBatch], context: Context
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        token = bind_principal(_principal_of(context))
        try:
            async for ack in super().StreamEvents(request_iterator, context):
                yield ack
        finally:
            # A generator closed from another context cannot reset; the call's context dies anyway.
            with contextlib.suppress(ValueError):
                unbind_principal(token)

    async def RecordEvents(  # noqa: N802 - gRPC method name
        self, request: tracking_pb2.EventBatch, context: Context
    ) -> tracking_pb2.BatchAck:
        token = bind_principal(_principal_of(context))
        try:
            return await super().RecordEvents(request, context)
        finally:
            unbind_principal(token)


@dataclass
class WorkerPeers:
    """One worker's part in balancing: its row of the board, its relay, and its private socket."""

    board: LoadBoard
    relay: StreamRelay
    telemetry: Telemetry
    server: grpc.aio.Server | None = None

    @classmethod
    def open(
        cls, directory: Path | None, count: int, index: int, settings: Settings, telemetry: Telemetry
    ) -> WorkerPeers | None:
        """Worker ``index``'s part, or None when ``peers_directory`` gave none (nothing to balance)."""
        if directory is None:
            return None
        board = LoadBoard(directory, count, index)
        return cls(board, StreamRelay(board, directory, settings, telemetry.metrics), telemetry)

    async def attach(self, running: EngineServer, ingestor: Ingestor) -> None:
        """Serve relayed streams on this worker's socket beside ``running``, which drains both."""
        await self.start(ingestor)
        running.peers = self

    async def start(self, ingestor: Ingestor) -> None:
        """Serve relayed streams on this worker's socket, then tell the peers it takes them."""
        settings = self.relay.settings
        server = grpc.aio.server(options=channel_options(settings))
        servicer = PeerTrackingServicer(ingestor, window=settings.engine.stream_window)
        registry = GuardedRegistry(server, [ErrorGuard(self.telemetry)])
        tracking_pb2_grpc.add_TrackingServiceServicer_to_server(servicer, registry)
        address = peer_socket(self.relay.directory, self.board.index)
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises (older releases returned 0)
            bound = 0
        if bound == 0:
            # E.g. a TMPDIR so long the socket's path passes the kernel's 107 bytes. This worker
            # still serves its own callers, and relays to peers that could listen; none relay here.
            log.warning("cannot listen on %s: streams will not be relayed to this worker", address)
            return
        await server.start()
        self.server = server
        self.board.set_ready(True)

    def withdraw(self) -> None:
        """No new streams relayed here (draining); the ones running go on."""
        self.board.set_ready(False)

    async def stop(self, grace_s: float | None) -> None:
        """Stop serving relayed streams (within the grace period). The relay's own channels stay
        open: streams this worker relays drain with its public server; ``close`` them after."""
        self.withdraw()
        if self.server is not None:
            await self.server.stop(grace_s)

    async def close(self) -> None:
        await self.relay.close()
