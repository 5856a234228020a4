"""TrackingService: carriers' event batches in, one ack per batch, in order.

``StreamEvents`` applies up to ``window`` batches of a stream at once (their Redis round trips overlap)
and acknowledges them in the order they came. It reads the next batch only when a slot of the window
is free, and a slot frees only when an ack was handed to gRPC: a client that stops reading acks stalls
the acks, then the window, then reading, and HTTP/2 flow control pushes back on the client. The
server's memory per stream stays bounded by the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from redis.exceptions import RedisError
from relais.v1 import tracking_pb2, tracking_pb2_grpc

from engine.ingest import Ingestor
from engine.state import ConflictError
from engine.validation import MAX_BATCH_EVENTS

Context = grpc.aio.ServicerContext[object, object]
TOO_MANY = f"events: at most {MAX_BATCH_EVENTS} per batch"


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class TrackingServicer(tracking_pb2_grpc.TrackingServiceServicer):
    def __init__(self, ingestor: Ingestor, *, window: int) -> None:
        self._ingestor = ingestor
        self._window = window

    async def _apply(self, batch: tracking_pb2.EventBatch, context: Context) -> tracking_pb2.BatchAck:
        if len(batch.events) > MAX_BATCH_EVENTS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, TOO_MANY)
        try:
            return await self._ingestor.apply(batch)
        except ConflictError:
            await _abort(
                context, grpc.StatusCode.ABORTED, "parcels changed concurrently; send the batch again"
            )
        except RedisError:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "storage unavailable; send the batch again")

    async def RecordEvents(  # noqa: N802 - gRPC method name
        self, request: tracking_pb2.EventBatch, context: Context
    ) -> tracking_pb2.BatchAck:
        return await self._apply(request, context)

    async def StreamEvents(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[tracking_pb2.EventBatch], context: Context
    ) -> AsyncIterator[tracking_pb2.BatchAck]:
        # Acks to send, in arrival order; ``slots`` bounds how many batches are read but not acked.
        acks: asyncio.Queue[asyncio.Task[tracking_pb2.BatchAck] | None] = asyncio.Queue()
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
                    acks.put_nowait(asyncio.create_task(self._apply(batch, context)))
            finally:
                acks.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await acks.get()) is not None:
                yield await task
                slots.release()
            await reader  # surfaces a failed read
        finally:
            reader.cancel()
            while not acks.empty():
                left = acks.get_nowait()
                if left is not None:
                    left.cancel()


def add_tracking_service(servicer: TrackingServicer) -> Callable[[grpc.aio.Server], None]:
    """A ``register`` callable for ``engine.server.start_server``."""

    def add(server: grpc.aio.Server) -> None:
        tracking_pb2_grpc.add_TrackingServiceServicer_to_server(servicer, server)

    return add
