"""TrackingService: carriers' event batches in, one ack per batch, in order.

``StreamEvents`` applies up to ``window`` batches of a stream at once (their Redis round trips overlap)
and acknowledges them in the order they came. It reads the next batch only when a slot of the window
is free, and a slot frees only when an ack was handed to gRPC: a client that stops reading acks stalls
the acks, then the window, then reading, and HTTP/2 flow control pushes back on the client. The
server's memory per stream stays bounded by the window.

A failure never costs the acks of batches already applied: an apply task returns its failure instead
of ending the call itself, and the stream ends (UNAVAILABLE, ABORTED) only when that failure's turn
comes, after every earlier ack was handed to gRPC. The client resends from the failed batch on; the
batches read after it may have been applied too, which a resend turns into duplicates, not harm. A
batch over ``MAX_BATCH_EVENTS`` is answered in its own ack, every event rejected, and the stream goes
on; only one too large even for that (``MAX_REJECTED_EVENTS``) ends it, after the earlier acks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc
from redis.exceptions import RedisError
from relais.v1 import tracking_pb2, tracking_pb2_grpc

from engine.ingest import Ingestor
from engine.state import ConflictError
from engine.validation import MAX_BATCH_EVENTS

if TYPE_CHECKING:
    from engine.stream_balance import StreamRelay

Context = grpc.aio.ServicerContext[object, object]
TOO_MANY = f"events: at most {MAX_BATCH_EVENTS} per batch"
# The largest batch a stream answers with one rejection per event. Beyond it the ack could outgrow
# what the batch cost to send (an empty event is 2 bytes, its rejection about 50) and gRPC's message
# limit: such a batch ends the stream instead. tracking.proto states both limits: keep them in step.
MAX_REJECTED_EVENTS = 4 * MAX_BATCH_EVENTS


@dataclass(frozen=True, slots=True)
class Failure:
    """A batch that could not be applied: the status that ends the call when its ack's turn comes."""

    code: grpc.StatusCode
    details: str


TOO_LARGE = Failure(grpc.StatusCode.INVALID_ARGUMENT, TOO_MANY)
CONFLICT = Failure(grpc.StatusCode.ABORTED, "parcels changed concurrently; send the batch again")
UNAVAILABLE = Failure(grpc.StatusCode.UNAVAILABLE, "storage unavailable; send the batch again")


async def abort_with(context: Context, failure: Failure) -> NoReturn:
    await context.abort(failure.code, failure.details)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    def __init__(self, ingestor: Ingestor, *, window: int, relay: StreamRelay | None = None) -> None:
        self._ingestor = ingestor
        self._window = window
        # With several workers: a new stream or large call may go whole to a less loaded one
        # (engine.stream_balance).
        self._relay = relay

    async def _apply(self, batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck | Failure:
        try:
            return await self._ingestor.apply(batch)
        except ConflictError:
            return CONFLICT
        except RedisError:
            return UNAVAILABLE

    async def _apply_streamed(self, batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck | Failure:
        count = len(batch.events)
        if count > MAX_REJECTED_EVENTS:
            return TOO_LARGE
        if count > MAX_BATCH_EVENTS:
            return _reject_all(batch)
        return await self._apply(batch)

    async def RecordEvents(  # noqa: N802 - gRPC method name
        self, request: tracking_pb2.EventBatch, context: Context
    ) -> tracking_pb2.BatchAck:
        # One batch, one answer: a status for the whole of it is as clear as an ack, and nothing else
        # is waiting to be acknowledged.
        if len(request.events) > MAX_BATCH_EVENTS:
            await abort_with(context, TOO_LARGE)
        relay = self._relay
        if relay is None:
            outcome = await self._apply(request)
        elif relay.worth_relaying(request) and (worker := relay.choose()) is not None:
            return await relay.record(worker, request, context)
        else:
            with relay.own():
                outcome = await self._apply(request)
        if isinstance(outcome, Failure):
            await abort_with(context, outcome)
        return outcome

    async def StreamEvents(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[tracking_pb2.EventBatch], context: Context
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        relay = self._relay
        if relay is None:
            async for ack in self._stream(request_iterator, context):
                yield ack
            return
        worker = relay.choose()
        if worker is not None:
            async for ack in relay.relay(worker, request_iterator, context):
                yield ack
            return
        with relay.own():
            async for ack in self._stream(request_iterator, context):
                yield ack

    async def _stream(
        self, request_iterator: AsyncIterator[tracking_pb2.EventBatch], context: Context
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        # Acks to send, in arrival order; ``slots`` bounds how many batches are read but not acked.
        acks: asyncio.Queue[asyncio.Task[tracking_pb2.BatchAck | Failure] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._window)

        async def read() -> None:
            batches = aiter(request_iterator)
            try:
                while True:
                    # A free slot first, then the next batch: never more than `window` held.
                    await slots.acquire()
                    try:
                        batch = await anext(batches)
                    except StopAsyncIteration:
                        return
                    acks.put_nowait(asyncio.create_task(self._apply_streamed(batch)))
            finally:
                acks.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await acks.get()) is not None:
                outcome = await task
                if isinstance(outcome, Failure):
                    # Every earlier ack is with gRPC already: they reach the client before the status.
                    await abort_with(context, outcome)
                yield outcome
                slots.release()
            await reader  # surfaces a failed read
        finally:
            reader.cancel()
            while not acks.empty():
                left = acks.get_nowait()
                if left is not None:
                    left.cancel()


def _reject_all(batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck:
    """The ack of a batch over the limit: nothing applied, every event rejected by index (the
    contract's "every other event was applied" then holds), each naming the limit."""
    return tracking_pb2.BatchAck(
        seq=batch.seq,
        rejected=[
            tracking_pb2.RejectedEvent(
                index=index,
                code=tracking_pb2.REJECT_CODE_INVALID_ARGUMENT,
                field="events",
                reason=TOO_MANY,
                event_id=event.event_id[:128],
            )
            for index, event in enumerate(batch.events)
        ],
    )


def add_tracking_service(servicer: TrackingServicer) -> Callable[[grpc.aio.Server], None]:
    """A ``register`` callable for ``engine.server.start_server``."""

    def add(server: grpc.aio.Server) -> None:
        tracking_pb2_grpc.add_TrackingServiceServicer_to_server(servicer, server)

    return add
