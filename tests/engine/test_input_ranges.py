"""Out-of-range timestamps and dates, and repeated parcels, over real gRPC on loopback and a real Redis.

Each request mixes good entries with one bad one: the bad one is rejected by index with its field
named, and the good ones are applied (a bad value used to fail the whole request with INTERNAL).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta

import grpc
import pytest
from google.protobuf import json_format
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc, preferences_pb2, tracking_pb2, tracking_pb2_grpc, types_pb2

from engine.state import DAY_MS
from engine.validation import MAX_DISTANCE_DAYS
from tests.conftest import T0_MS
from tests.engine import test_services
from tests.engine.core_support import HOUR_MS, due_members, event, put_preferences, registration

# The loopback server and its channel, the service tests' own fixtures: pytest finds a fixture bound
# anywhere in a test module's namespace.
server = test_services.server
channel = test_services.channel

T = types_pb2
Edit = Callable[[tracking_pb2.TrackingEvent], None]
FAR_SECONDS = 10**12  # year ~33,700: beyond what datetime can hold
TODAY = date(2026, 3, 10)  # T0's date
BOUND = timedelta(days=MAX_DISTANCE_DAYS)


async def record(channel: grpc.aio.Channel, *events: tracking_pb2.TrackingEvent) -> tracking_pb2.BatchAck:
    stub = tracking_pb2_grpc.TrackingServiceStub(channel)
    return await stub.RecordEvents(tracking_pb2.EventBatch(seq=1, events=list(events)))


async def register(
    channel: grpc.aio.Channel, *parcels: parcel_pb2.ParcelRegistration
) -> parcel_pb2.RegisterParcelsResponse:
    stub = parcel_pb2_grpc.ParcelServiceStub(channel)
    return await stub.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=list(parcels)))


async def view(channel: grpc.aio.Channel, parcel_id: str) -> parcel_pb2.ParcelView:
    stub = parcel_pb2_grpc.ParcelServiceStub(channel)
    reply = await stub.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=parcel_id))
    json_format.MessageToJson(reply)  # raises on a stored Timestamp out of range
    return reply


async def assert_unknown(channel: grpc.aio.Channel, parcel_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await view(channel, parcel_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def promised(
    reg: parcel_pb2.ParcelRegistration, year: int, month: int, day: int
) -> parcel_pb2.ParcelRegistration:
    reg.order.promised_date.CopyFrom(T.LocalDate(year=year, month=month, day=day))
    return reg


def _ymd(day: date) -> tuple[int, int, int]:
    return day.year, day.month, day.day


def _occurred_nanos(nanos: int) -> Edit:
    def edit(e: tracking_pb2.TrackingEvent) -> None:
        e.occurred_at.nanos = nanos

    return edit


def _window_start(seconds: int) -> Edit:
    def edit(e: tracking_pb2.TrackingEvent) -> None:
        e.delivery_window.start.seconds = seconds
        e.delivery_window.end.seconds = seconds + 3600

    return edit


def _window_end_nanos(e: tracking_pb2.TrackingEvent) -> None:
    e.delivery_window.start.FromMilliseconds(T0_MS + DAY_MS)
    e.delivery_window.end.FromMilliseconds(T0_MS + DAY_MS + HOUR_MS)
    e.delivery_window.end.nanos = 1_000_000_000


def _deadline_seconds(seconds: int) -> Edit:
    def edit(e: tracking_pb2.TrackingEvent) -> None:
        e.status = T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP
        e.pickup_point.id = "kiosk-1"
        e.pickup_point.deadline.seconds = seconds

    return edit


def _transit_deadline_nanos(e: tracking_pb2.TrackingEvent) -> None:
    # Not a pickup event, but the deadline is kept in the timeline all the same.
    e.pickup_point.id = "kiosk-1"
    e.pickup_point.deadline.FromMilliseconds(T0_MS + DAY_MS)
    e.pickup_point.deadline.nanos = -1


BAD_EVENTS = [
    pytest.param(_occurred_nanos(2_000_000_000), "occurred_at.nanos", id="occurred-nanos-too-big"),
    pytest.param(_occurred_nanos(-5), "occurred_at.nanos", id="occurred-nanos-negative"),
    pytest.param(_window_start(10**15), "delivery_window.start", id="window-far-future"),
    pytest.param(
        _window_start(T0_MS // 1000 - 2 * 366 * 86_400), "delivery_window.start", id="window-far-past"
    ),
    pytest.param(_window_end_nanos, "delivery_window.end.nanos", id="window-end-nanos"),
    pytest.param(_deadline_seconds(FAR_SECONDS), "pickup_point.deadline", id="deadline-far-future"),
    pytest.param(_deadline_seconds(-FAR_SECONDS), "pickup_point.deadline", id="deadline-far-past"),
    pytest.param(_transit_deadline_nanos, "pickup_point.deadline.nanos", id="transit-deadline-nanos"),
]


async def reject_one(channel: grpc.aio.Channel, edit: Edit) -> tracking_pb2.RejectedEvent:
    """Records an event spoilt by ``edit`` between two good ones: it alone is rejected, by index and
    as invalid, and the good ones are applied."""
    bad = event("bad", "BAD", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)
    edit(bad)
    ack = await record(
        channel,
        event("ok1", "OK1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS),
        bad,
        event(
            "ok2",
            "OK2",
            T.TRACKING_STATUS_OUT_FOR_DELIVERY,
            T0_MS,
            slot=(T0_MS + HOUR_MS, T0_MS + 3 * HOUR_MS),
        ),
    )

    assert ack.accepted == 2
    assert [(r.index, r.code, r.event_id) for r in ack.rejected] == [
        (1, tracking_pb2.REJECT_CODE_INVALID_ARGUMENT, "bad")
    ]
    assert [e.event.event_id for e in (await view(channel, "OK1")).timeline] == ["ok1"]
    assert (await view(channel, "OK2")).current_slot.window.start.ToMilliseconds() == T0_MS + HOUR_MS
    await assert_unknown(channel, "BAD")
    return ack.rejected[0]


@pytest.mark.parametrize(("edit", "field"), BAD_EVENTS)
async def test_a_bad_timestamp_rejects_only_its_event(
    channel: grpc.aio.Channel, edit: Edit, field: str
) -> None:
    assert (await reject_one(channel, edit)).field == field


async def test_a_far_pickup_deadline_for_a_recipient_with_quiet_hours(
    channel: grpc.aio.Channel, redis: Redis
) -> None:
    # Quiet hours make the planner read the deadline on the recipient's wall clock: this once crashed
    # the whole batch with INTERNAL.
    prefs = preferences_pb2.RecipientPreferences(recipient_id="acme/q1", time_zone="Europe/Paris")
    prefs.quiet_hours.start_minute, prefs.quiet_hours.end_minute = 22 * 60, 7 * 60
    await put_preferences(redis, prefs)
    assert (
        await register(channel, *(registration(p, recipient_id="acme/q1") for p in ("PK1", "PK2")))
    ).registered == 2
    far = event("far", "PK1", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("kiosk-1", T0_MS))
    far.pickup_point.deadline.seconds = FAR_SECONDS
    near = event(
        "near", "PK2", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("kiosk-1", T0_MS + 7 * DAY_MS)
    )

    ack = await record(channel, far, near)

    assert ack.accepted == 1
    assert [(r.index, r.field) for r in ack.rejected] == [(0, "pickup_point.deadline")]
    assert "PK2:AVAILABLE_FOR_PICKUP" in await due_members(redis, "PK2")
    assert await due_members(redis, "PK1") == {}
    assert (await view(channel, "PK2")).pickup_point.deadline.ToMilliseconds() == T0_MS + 7 * DAY_MS


@pytest.mark.parametrize(
    ("ymd", "reason"),
    [
        pytest.param((9999, 12, 31), "days from today", id="year-9999"),
        pytest.param((1900, 1, 1), "days from today", id="year-1900"),
        pytest.param(_ymd(TODAY + BOUND + timedelta(days=1)), "days from today", id="a-day-past-the-bound"),
        pytest.param((2026, 2, 30), "not a calendar date", id="february-30"),
    ],
)
async def test_a_bad_promised_date_rejects_only_its_registration(
    channel: grpc.aio.Channel, ymd: tuple[int, int, int], reason: str
) -> None:
    response = await register(
        channel,
        promised(registration("G1"), 2026, 3, 12),
        promised(registration("B1"), *ymd),
        registration("G2"),
    )

    assert response.registered == 2
    assert [(r.index, r.field) for r in response.rejected] == [(1, "order.promised_date")]
    assert reason in response.rejected[0].reason
    assert (await view(channel, "G1")).order.promised_date == T.LocalDate(year=2026, month=3, day=12)
    assert (await view(channel, "G2")).registered
    await assert_unknown(channel, "B1")


async def test_a_promised_date_at_the_bound_is_registered(channel: grpc.aio.Channel) -> None:
    response = await register(
        channel,
        promised(registration("E1"), *_ymd(TODAY + BOUND)),
        promised(registration("E2"), *_ymd(TODAY - BOUND)),
    )
    assert (response.registered, list(response.rejected)) == (2, [])


async def test_a_parcel_twice_in_one_request_rejects_the_later_entry(channel: grpc.aio.Channel) -> None:
    response = await register(
        channel,
        registration("D1", recipient_id="acme/r1"),
        registration("D2"),
        registration("D1", recipient_id="acme/r2"),
    )

    assert response.registered == 2
    assert [(r.index, r.field) for r in response.rejected] == [(2, "parcel_id")]
    assert "index 0" in response.rejected[0].reason
    assert (await view(channel, "D1")).recipient_id == "acme/r1"
    assert (await view(channel, "D2")).registered
