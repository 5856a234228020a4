"""TrackingService and ParcelService over real gRPC on loopback, against the real Redis fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import (
    alerts_pb2,
    notice_pb2,
    parcel_pb2,
    parcel_pb2_grpc,
    state_pb2,
    tracking_pb2,
    tracking_pb2_grpc,
    types_pb2,
)

from common import keys
from common.clock import ManualClock
from engine.server import EngineServer, start_server
from engine.state import DAY_MS, attempts_field, load_state
from tests.conftest import T0_MS
from tests.engine.core_support import HOUR_MS, SETTINGS, claim, engine_for, event, hget, hset, registration

T = types_pb2
SLOT = (T0_MS + DAY_MS, T0_MS + DAY_MS + 2 * HOUR_MS)


@pytest.fixture
async def server(redis: Redis, clock: ManualClock) -> AsyncIterator[EngineServer]:
    settings = replace(SETTINGS, listen="127.0.0.1:0")
    engine = engine_for(redis, clock, settings)
    running = await start_server(settings, redis, register=engine.register)
    try:
        yield running
    finally:
        await running.stop(0)


@pytest.fixture
async def channel(server: EngineServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


async def test_stream_acks_every_batch_in_order_with_its_seq(channel: grpc.aio.Channel) -> None:
    stub = tracking_pb2_grpc.TrackingServiceStub(channel)
    seqs = [10, 3, 7, 42, 5, 6, 99, 1, 2, 8, 11, 12]

    async def batches() -> AsyncIterator[tracking_pb2.EventBatch]:
        for n, seq in enumerate(seqs):
            events = [event(f"s{n}-{i}", f"S{i}", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + n) for i in range(20)]
            if n == 4:
                events.append(tracking_pb2.TrackingEvent(event_id="bad", parcel_id="S1"))
            yield tracking_pb2.EventBatch(seq=seq, events=events)

    acks = [ack async for ack in stub.StreamEvents(batches())]
    assert [a.seq for a in acks] == seqs
    assert all(a.accepted == 20 for a in acks)
    assert [(r.index, r.field) for r in acks[4].rejected] == [(20, "status")]


async def test_record_events_and_oversized_batch(channel: grpc.aio.Channel) -> None:
    stub = tracking_pb2_grpc.TrackingServiceStub(channel)
    ack = await stub.RecordEvents(
        tracking_pb2.EventBatch(seq=5, events=[event("r1", "R1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)])
    )
    assert (ack.seq, ack.accepted) == (5, 1)
    huge = tracking_pb2.EventBatch(
        events=[event(f"h{i}", "R1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS) for i in range(5001)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordEvents(huge)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in (err.value.details() or "")


async def test_get_parcel_shows_everything(channel: grpc.aio.Channel, redis: Redis) -> None:
    parcels = parcel_pb2_grpc.ParcelServiceStub(channel)
    tracking = tracking_pb2_grpc.TrackingServiceStub(channel)
    reg = registration("G1")
    reg.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=12))
    assert (await parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=[reg]))).registered == 1
    await tracking.RecordEvents(
        tracking_pb2.EventBatch(
            events=[
                event("g1", "G1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - HOUR_MS),
                event("g2", "G1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS, slot=SLOT),
            ]
        )
    )
    # The scheduler claimed SHIPPED and the gateway recorded a successful send.
    await claim(redis, "G1", "SHIPPED")
    shard = keys.shard_of("G1", SETTINGS.shards)
    attempt = notice_pb2.DeliveryAttempt(
        channel=T.CHANNEL_EMAIL, provider="email", status=notice_pb2.NOTICE_STATUS_SENT, version=1
    )
    attempt.attempted_at.FromMilliseconds(T0_MS + 1000)
    recorded = notice_pb2.NoticeView(attempts=[attempt]).SerializeToString()
    await hset(redis, keys.parcel(shard, "G1"), attempts_field("SHIPPED"), recorded)
    alert = alerts_pb2.Alert(
        alert_id="G1:ADDRESS_PROBLEM:1", parcel_id="G1", kind=alerts_pb2.ALERT_KIND_ADDRESS_PROBLEM
    )
    alert.state = alerts_pb2.ALERT_STATE_OPEN
    await hset(redis, keys.alerts(shard, "G1"), alert.alert_id, alert.SerializeToString())

    view = await parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="G1"))
    assert (view.parcel_id, view.merchant_id, view.recipient_id, view.registered) == (
        "G1",
        "acme",
        "acme/r1",
        True,
    )
    assert view.status == T.TRACKING_STATUS_OUT_FOR_DELIVERY
    assert view.current_slot.version == 1
    assert view.current_slot.window.start.ToMilliseconds() == SLOT[0]
    assert [e.event.event_id for e in view.timeline] == ["g1", "g2"]
    # Stored without the parcel id and carrier the parcel already holds; shown as the carrier sent them.
    assert {(e.event.parcel_id, e.event.carrier) for e in view.timeline} == {("G1", view.carrier)}
    stored = state_pb2.ParcelState.FromString(await hget(redis, keys.parcel(shard, "G1"), "s") or b"")
    assert stored.parcel_id == ""
    assert (stored.status_event_id, stored.substatus, stored.status_occurred_ms) == ("", "", 0)
    assert load_state("G1", stored.SerializeToString()).status_event_id == "g2"
    assert {e.event.parcel_id for e in stored.timeline} == {""}
    assert view.order.promised_date.day == 12
    by_kind = {n.kind: n for n in view.notices}
    shipped = by_kind[T.NOTICE_KIND_SHIPPED]
    assert shipped.status == notice_pb2.NOTICE_STATUS_SENT
    assert shipped.channel == T.CHANNEL_EMAIL
    assert shipped.sent_at.ToMilliseconds() == T0_MS + 1000
    assert len(shipped.attempts) == 1
    announced = by_kind[T.NOTICE_KIND_SLOT_ANNOUNCED]
    assert announced.status == notice_pb2.NOTICE_STATUS_SCHEDULED
    assert announced.notice_id == "G1:SLOT_ANNOUNCED"
    assert by_kind[T.NOTICE_KIND_DELAYED].status == notice_pb2.NOTICE_STATUS_SCHEDULED
    assert [a.alert_id for a in view.open_alerts] == ["G1:ADDRESS_PROBLEM:1"]
    assert view.created_at.ToMilliseconds() == T0_MS
    assert not view.HasField("expires_at")

    await tracking.RecordEvents(
        tracking_pb2.EventBatch(events=[event("g3", "G1", T.TRACKING_STATUS_DELIVERED, T0_MS + 1)])
    )
    done = await parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="G1"))
    assert done.expires_at.ToMilliseconds() == T0_MS + SETTINGS.retention_days * DAY_MS
    cancelled = {n.kind: n for n in done.notices}[T.NOTICE_KIND_SLOT_ANNOUNCED]
    assert cancelled.status == notice_pb2.NOTICE_STATUS_CANCELLED
    assert cancelled.status_reason == "delivered"


async def test_get_parcel_errors(channel: grpc.aio.Channel) -> None:
    parcels = parcel_pb2_grpc.ParcelServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id="nobody-knows"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Ids no parcel can have (events and registrations refuse them): the caller's mistake, named.
    for impossible in ("", "A\x00B", "A B", "x" * 65):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=impossible))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("parcel_id ")
