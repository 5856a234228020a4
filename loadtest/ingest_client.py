"""A lean asyncio client that streams pre-encoded event batches and times the acks.

Used by the benchmarks against the engine and against the echo server alike, so both see the very
same bytes: several concurrent ``StreamEvents`` calls, each with a bounded window of unacknowledged
batches. Batches are encoded before the clock starts (``loadtest.wire``), so the figure is the
server's, not the client's protobuf building.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from loadtest.journeys import Group
from loadtest.wire import decode_ack, encode_next

STREAM_EVENTS = "/relais.v1.TrackingService/StreamEvents"

Batch = tuple[bytes, int]  # serialized EventBatch, number of events
AckRow = tuple[int, int, int, float]  # accepted, duplicates, rejected, seconds to the ack


@dataclass(frozen=True, slots=True)
class StreamResult:
    events: int
    accepted: int
    duplicates: int
    rejected: int
    seconds: float
    ack_ms: tuple[float, ...]

    @property
    def events_per_s(self) -> float:
        return (self.accepted + self.duplicates) / self.seconds if self.seconds > 0 else 0.0


def plan_streams(groups: Sequence[Group], streams: int, now_ms: int) -> list[list[Batch]]:
    """Every stage of every group, encoded; each group kept on one stream so its parcels' events stay
    in order, groups dealt round-robin over the streams."""
    out: list[list[Batch]] = [[] for _ in range(streams)]
    seq = 0
    for n, group in enumerate(groups):
        while not group.done:
            seq += 1
            out[n % streams].append(encode_next(group, seq, now_ms))
    return out


async def _one_stream(channel: grpc.aio.Channel, batches: Sequence[Batch], window: int) -> list[AckRow]:
    credits = asyncio.Semaphore(window)
    sent_at: dict[int, float] = {}
    seqs = [decode_seq(data) for data, _ in batches]

    async def requests() -> AsyncIterator[bytes]:
        for (data, _), seq in zip(batches, seqs, strict=True):
            await credits.acquire()
            sent_at[seq] = time.perf_counter()
            yield data

    call = channel.stream_stream(STREAM_EVENTS, request_serializer=None, response_deserializer=decode_ack)(
        requests()
    )
    acks: list[AckRow] = []
    async for ack in call:
        acks.append((ack.accepted, ack.duplicates, len(ack.rejected), time.perf_counter() - sent_at[ack.seq]))
        credits.release()
    return acks


def decode_seq(data: bytes) -> int:
    """The seq of an encoded batch (field 1, a varint, always written first by ``wire``)."""
    if not data or data[0] != 0x08:
        return 0
    value, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
        i += 1


async def stream_batches(
    target: str, streams: Sequence[Sequence[Batch]], *, window: int = 8, connections: int | None = None
) -> StreamResult:
    """Send every stream's batches concurrently, each stream on its own connection (as carriers'
    systems are: an engine with several workers on one port spreads connections, not streams), or
    dealt over ``connections`` (1: all on one, as one gRPC channel sends them); the clock runs from
    the first send to the last ack."""
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
        # Channels to one target share a connection unless each has its own subchannel pool.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    sending = [s for s in streams if s]
    count = len(sending) if connections is None else connections
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(_one_stream(channels[n % count], s, window) for n, s in enumerate(sending))
        )
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    acks = [a for r in replies for a in r]
    return StreamResult(
        events=sum(n for s in streams for _, n in s),
        accepted=sum(a[0] for a in acks),
        duplicates=sum(a[1] for a in acks),
        rejected=sum(a[2] for a in acks),
        seconds=seconds,
        ack_ms=tuple(a[3] * 1000 for a in acks),
    )
