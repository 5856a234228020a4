"""StreamEvents reads no faster than it acknowledges: a carrier that stops reading acks cannot make
the server hold more than ``stream_window`` batches, and every batch is still acked, in order."""

from __future__ import annotations

import asyncio

import grpc
from redis.asyncio import Redis
from relais.v1 import tracking_pb2, tracking_pb2_grpc, types_pb2

from common.clock import ManualClock
from common.settings import Settings
from engine.ingest import Ingestor
from engine.server import start_server
from engine.state import ParcelStore
from engine.tracking_service import TrackingServicer, add_tracking_service
from tests.engine.core_support import event

WINDOW = 3
BATCHES = 30


class GaugedIngestor(Ingestor):
    """The real ingestor, with a gauge of how many batches it holds at once (and a little latency,
    so that batches overlap as they do under load)."""

    def __init__(self, store: ParcelStore, clock: ManualClock) -> None:
        super().__init__(store, clock)
        self.holding = 0
        self.most_held = 0

    async def apply(self, batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck:
        self.holding += 1
        self.most_held = max(self.most_held, self.holding)
        try:
            await asyncio.sleep(0.01)
            return await super().apply(batch)
        finally:
            self.holding -= 1


async def test_a_client_not_reading_acks_is_held_to_the_window(redis: Redis, clock: ManualClock) -> None:
    settings = Settings(listen="127.0.0.1:0", shards=4)
    ingestor = GaugedIngestor(ParcelStore(redis, settings, clock), clock)
    running = await start_server(
        settings, redis, register=[add_tracking_service(TrackingServicer(ingestor, window=WINDOW))]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            # The stubs type only the iterator form; the aio call also takes writes.
            call = tracking_pb2_grpc.TrackingServiceStub(channel).StreamEvents()  # type: ignore[call-arg]
            # Write every batch before reading a single ack.
            for seq in range(1, BATCHES + 1):
                e = event(f"e{seq}", f"BP-{seq}", types_pb2.TRACKING_STATUS_IN_TRANSIT, clock.now_ms() - 1000)
                await call.write(tracking_pb2.EventBatch(seq=seq, events=[e]))
            await call.done_writing()
            await asyncio.sleep(0.3)
            assert 1 <= ingestor.most_held <= WINDOW
            acks = [ack async for ack in call]
    finally:
        await running.stop(0)
    assert [a.seq for a in acks] == list(range(1, BATCHES + 1))
    assert all(a.accepted == 1 for a in acks)
    assert ingestor.most_held <= WINDOW
