"""The after-update hook (the alert monitor) runs in update order per parcel, while the next update of
the same parcels already reads and writes: the two stages overlap instead of queueing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from redis.asyncio import Redis
from relais.v1 import tracking_pb2, types_pb2

from common.clock import ManualClock
from engine.ingest import Ingestor
from engine.state import ParcelChange, ParcelRecord, ParcelStore
from tests.conftest import T0_MS
from tests.engine.core_support import SETTINGS, event

T = types_pb2


async def test_hooks_keep_order_and_overlap_the_next_update(redis: Redis, clock: ManualClock) -> None:
    first_hook_started, first_hook_may_end, second_wrote = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[tuple[str, int]] = []

    async def hook(records: Sequence[ParcelRecord]) -> None:
        (record,) = records
        seen.append((record.parcel_id, len(record.state.timeline)))
        if len(seen) == 1:
            first_hook_started.set()
            await first_hook_may_end.wait()

    store = ParcelStore(redis, SETTINGS, clock, after_update=hook)
    ingestor = Ingestor(store, clock)
    write = store.write

    async def noting_write(changes: Mapping[str, tuple[int, ParcelChange]]) -> set[str]:
        conflicts = await write(changes)
        if first_hook_started.is_set():
            second_wrote.set()
        return conflicts

    store.write = noting_write  # type: ignore[method-assign]

    first = asyncio.create_task(
        ingestor.apply(
            tracking_pb2.EventBatch(seq=1, events=[event("h1", "H1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)])
        )
    )
    await first_hook_started.wait()
    # The first hook is still running: the second update of the same parcel goes ahead and writes...
    second = asyncio.create_task(
        ingestor.apply(
            tracking_pb2.EventBatch(
                seq=2, events=[event("h2", "H1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + 1)]
            )
        )
    )
    await asyncio.wait_for(second_wrote.wait(), timeout=5)
    # ...but its hook waits for the first one.
    assert seen == [("H1", 1)]
    first_hook_may_end.set()
    await asyncio.gather(first, second)
    assert seen == [("H1", 1), ("H1", 2)]
