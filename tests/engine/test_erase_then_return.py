"""EraseRecipient, then the recipient sets preferences again: what the erasure cancelled comes back
while the situation still holds ("nothing more is sent to them until they set preferences again"),
whether the news came just before the erasure or during it. The whole engine (``build_engine``)
over gRPC on loopback and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import (
    parcel_pb2,
    parcel_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
    types_pb2,
)

from common.clock import ManualClock
from common.settings import Settings
from engine.app import build_engine
from engine.server import start_server
from tests.conftest import T0_MS
from tests.engine.core_support import due_members, registration
from tests.gateway.support import claim_due

T = types_pb2
DAY_MS = 86_400_000
RID = "acme/r-back"
PREFERENCES = preferences_pb2.UpdatePreferencesRequest(
    preferences=preferences_pb2.RecipientPreferences(recipient_id=RID, email="r@example.org")
)


@pytest.fixture
async def channel(redis: Redis, clock: ManualClock) -> AsyncIterator[grpc.aio.Channel]:
    settings = Settings(listen="127.0.0.1:0", shards=4)
    engine = build_engine(settings, redis, clock)
    running = await start_server(settings, redis, register=engine.register, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            yield ch
    finally:
        await running.stop(0)


def stubs(
    channel: grpc.aio.Channel,
) -> tuple[
    parcel_pb2_grpc.ParcelServiceAsyncStub,
    tracking_pb2_grpc.TrackingServiceAsyncStub,
    preferences_pb2_grpc.PreferenceServiceAsyncStub,
]:
    return (
        parcel_pb2_grpc.ParcelServiceStub(channel),
        tracking_pb2_grpc.TrackingServiceStub(channel),
        preferences_pb2_grpc.PreferenceServiceStub(channel),
    )


def ev(eid: str, pid: str, status: int, at_ms: int, **kw: object) -> tracking_pb2.TrackingEvent:
    e = tracking_pb2.TrackingEvent(event_id=eid, parcel_id=pid, carrier="swisspost", status=status, **kw)  # type: ignore[arg-type]
    e.occurred_at.FromMilliseconds(at_ms)
    return e


async def test_notices_cancelled_by_an_erasure_resume_alike_when_preferences_return(
    channel: grpc.aio.Channel, redis: Redis, clock: ManualClock
) -> None:
    parcels, tracking, prefs = stubs(channel)
    await prefs.UpdatePreferences(PREFERENCES)
    regs = [registration(pid, recipient_id=RID) for pid in ("PICK", "MISS", "ADDR")]
    assert (await parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=regs))).registered == 3

    at_pickup = ev("e1", "PICK", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS - 60_000)
    at_pickup.pickup_point.id, at_pickup.pickup_point.name = "PP1", "Kiosk"
    at_pickup.pickup_point.deadline.FromMilliseconds(T0_MS + 5 * DAY_MS)
    missed = ev(
        "e2",
        "MISS",
        T.TRACKING_STATUS_ATTEMPT_FAIL,
        T0_MS - 60_000,
        exception_reason=T.EXCEPTION_REASON_RECIPIENT_ABSENT,
    )
    address = ev(
        "e3",
        "ADDR",
        T.TRACKING_STATUS_EXCEPTION,
        T0_MS - 60_000,
        exception_reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM,
    )
    ack = await tracking.RecordEvents(tracking_pb2.EventBatch(seq=1, events=[at_pickup, missed, address]))
    assert ack.accepted == 3, ack
    # Each situation still holds and each notice is pending (to be sent a moment from now).
    assert "PICK:AVAILABLE_FOR_PICKUP" in await due_members(redis, "PICK")
    assert "MISS:ATTEMPT_FAILED" in await due_members(redis, "MISS")
    assert "ADDR:EXCEPTION" in await due_members(redis, "ADDR")

    erased = await prefs.EraseRecipient(preferences_pb2.EraseRecipientRequest(recipient_id=RID))
    assert erased.preferences_erased
    assert erased.notices_cancelled >= 3  # and the pickup reminder
    for pid in ("PICK", "MISS", "ADDR"):
        assert await due_members(redis, pid) == {}

    # A minute later the recipient sets preferences again; nothing changed for their parcels.
    clock.advance_ms(60_000)
    await prefs.UpdatePreferences(PREFERENCES)
    back = {pid: set(await due_members(redis, pid)) for pid in ("PICK", "MISS", "ADDR")}
    # The pickup notice comes back (the parcel still waits at the point)...
    assert "PICK:AVAILABLE_FOR_PICKUP" in back["PICK"], back
    # ...and so do the failed attempt (arrange a new delivery) and the address check (a paid order
    # held for its address): both still hold.
    assert "MISS:ATTEMPT_FAILED" in back["MISS"], back
    assert "ADDR:EXCEPTION" in back["ADDR"], back


async def test_a_failed_attempt_is_told_on_return_whether_it_came_before_or_during_the_erasure(
    channel: grpc.aio.Channel, redis: Redis, clock: ManualClock
) -> None:
    """The same news, the same moment of return: told alike whether the event came just before the
    erasure (its notice cancelled by it) or during it (nothing planned while erased)."""
    parcels, tracking, prefs = stubs(channel)
    await prefs.UpdatePreferences(PREFERENCES)
    regs = [registration(pid, recipient_id=RID) for pid in ("BEFORE", "AFTER")]
    await parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=regs))
    absent = T.EXCEPTION_REASON_RECIPIENT_ABSENT
    before = ev("b1", "BEFORE", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS - 60_000, exception_reason=absent)
    await tracking.RecordEvents(tracking_pb2.EventBatch(seq=1, events=[before]))
    await prefs.EraseRecipient(preferences_pb2.EraseRecipientRequest(recipient_id=RID))
    after = ev("a1", "AFTER", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS - 30_000, exception_reason=absent)
    await tracking.RecordEvents(tracking_pb2.EventBatch(seq=2, events=[after]))
    clock.advance_ms(60_000)
    await prefs.UpdatePreferences(PREFERENCES)
    told = {pid: set(await due_members(redis, pid)) for pid in ("BEFORE", "AFTER")}
    assert "AFTER:ATTEMPT_FAILED" in told["AFTER"], told
    assert "BEFORE:ATTEMPT_FAILED" in told["BEFORE"], told


async def test_a_failed_attempt_told_before_the_erasure_is_not_told_again_on_return(
    channel: grpc.aio.Channel, redis: Redis, clock: ManualClock
) -> None:
    """Only what the erasure cancelled comes back: a notice that went out before it is not sent twice."""
    parcels, tracking, prefs = stubs(channel)
    await prefs.UpdatePreferences(PREFERENCES)
    await parcels.RegisterParcels(
        parcel_pb2.RegisterParcelsRequest(parcels=[registration("SENT", recipient_id=RID)])
    )
    absent = T.EXCEPTION_REASON_RECIPIENT_ABSENT
    missed = ev("s1", "SENT", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS - 60_000, exception_reason=absent)
    await tracking.RecordEvents(tracking_pb2.EventBatch(seq=1, events=[missed]))
    assert await claim_due(redis, clock.now_ms()) >= 1  # it went out, with the shipped notice
    await prefs.EraseRecipient(preferences_pb2.EraseRecipientRequest(recipient_id=RID))
    clock.advance_ms(60_000)
    await prefs.UpdatePreferences(PREFERENCES)
    assert await due_members(redis, "SENT") == {}
