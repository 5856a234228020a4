"""Alerts inside the whole engine, over real gRPC on loopback: registration starts the timers, the
scheduler's CHECK_ALERTS timers open alerts when due, events resolve them, GetParcel shows the open
ones, and the daily counters match the events sent (a replayed batch counts nothing twice)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import (
    alerts_pb2,
    alerts_pb2_grpc,
    parcel_pb2,
    parcel_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
    types_pb2,
)

from common.clock import ManualClock
from common.settings import Settings
from engine.app import build_engine
from engine.scheduler import Dispatcher
from engine.server import start_server
from tests.conftest import T0_MS

S = types_pb2
A = alerts_pb2
HOUR_MS = 3_600_000
SETTINGS = Settings(listen="127.0.0.1:0", shards=4)


@dataclass
class Rig:
    clock: ManualClock
    dispatcher: Dispatcher
    parcels: parcel_pb2_grpc.ParcelServiceAsyncStub
    tracking: tracking_pb2_grpc.TrackingServiceAsyncStub
    alerts: alerts_pb2_grpc.AlertServiceAsyncStub

    async def events(self, *events: tracking_pb2.TrackingEvent) -> tracking_pb2.BatchAck:
        return await self.tracking.RecordEvents(tracking_pb2.EventBatch(seq=1, events=events))

    async def open_kinds(self, parcel_id: str) -> list[str]:
        view = await self.parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=parcel_id))
        return sorted(A.AlertKind.Name(a.kind).removeprefix("ALERT_KIND_") for a in view.open_alerts)

    async def tick(self, now_ms: int) -> None:
        self.clock.set_ms(now_ms)
        await self.dispatcher.claim_once()


@pytest.fixture
async def rig(redis: Redis, clock: ManualClock) -> AsyncIterator[Rig]:
    engine = build_engine(SETTINGS, redis, clock)
    dispatcher = Dispatcher(redis, clock, SETTINGS.shards)
    for name, handler in engine.timers.items():
        dispatcher.register_timer(name, handler)
    server = await start_server(SETTINGS, redis, register=engine.register)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Rig(
            clock,
            dispatcher,
            parcel_pb2_grpc.ParcelServiceStub(channel),
            tracking_pb2_grpc.TrackingServiceStub(channel),
            alerts_pb2_grpc.AlertServiceStub(channel),
        )
    await server.stop(0)


def event(
    event_id: str,
    status: S.TrackingStatus.ValueType,
    occurred_ms: int,
    reason: S.ExceptionReason.ValueType = S.EXCEPTION_REASON_UNSPECIFIED,
) -> tracking_pb2.TrackingEvent:
    e = tracking_pb2.TrackingEvent(
        event_id=event_id, parcel_id="P1", carrier="swisspost", status=status, exception_reason=reason
    )
    e.occurred_at.FromMilliseconds(occurred_ms)
    e.location.facility = "Zurich-Mülligen"
    return e


async def test_alert_lifecycle_and_counters_through_the_engine(rig: Rig) -> None:
    registration = parcel_pb2.ParcelRegistration(
        parcel_id="P1", merchant_id="acme", carrier="swisspost", recipient_id="acme/r1"
    )
    registration.order.paid = True
    registration.order.promised_date.CopyFrom(S.LocalDate(year=2026, month=3, day=11))
    reply = await rig.parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=[registration]))
    assert reply.registered == 1

    # The promised day ends at 2026-03-12 00:00 UTC (T0 + 39 h): late, not before.
    await rig.tick(T0_MS + 39 * HOUR_MS - 1)
    assert await rig.open_kinds("P1") == []
    await rig.tick(T0_MS + 39 * HOUR_MS)
    assert await rig.open_kinds("P1") == ["LATE"]
    # Registered 48 h ago and never scanned.
    await rig.tick(T0_MS + 48 * HOUR_MS - 1)
    assert await rig.open_kinds("P1") == ["LATE"]
    await rig.tick(T0_MS + 48 * HOUR_MS)
    assert await rig.open_kinds("P1") == ["LATE", "NEVER_SCANNED"]

    # The first scan resolves never-scanned; a failed attempt for the address opens its alert.
    rig.clock.set_ms(T0_MS + 49 * HOUR_MS)
    scan = event("e1", S.TRACKING_STATUS_IN_TRANSIT, T0_MS + 49 * HOUR_MS)
    assert (await rig.events(scan)).accepted == 1
    assert await rig.open_kinds("P1") == ["LATE"]
    rig.clock.set_ms(T0_MS + 50 * HOUR_MS)
    failed = event(
        "e2", S.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS + 50 * HOUR_MS, S.EXCEPTION_REASON_ADDRESS_PROBLEM
    )
    assert (await rig.events(failed)).accepted == 1
    assert await rig.open_kinds("P1") == ["ADDRESS_PROBLEM", "LATE"]

    listed = await rig.alerts.ListAlerts(A.ListAlertsRequest(merchant_id="acme"))
    assert [a.alert_id for a in listed.alerts] == ["P1:ADDRESS_PROBLEM:1", "P1:NEVER_SCANNED:1", "P1:LATE:1"]
    assert [a.state for a in listed.alerts] == [
        A.ALERT_STATE_OPEN,
        A.ALERT_STATE_RESOLVED,
        A.ALERT_STATE_OPEN,
    ]

    # Delivered: everything resolves. The same batch replayed changes and counts nothing.
    rig.clock.set_ms(T0_MS + 51 * HOUR_MS)
    delivered = event("e3", S.TRACKING_STATUS_DELIVERED, T0_MS + 51 * HOUR_MS)
    assert (await rig.events(delivered)).accepted == 1
    assert (await rig.events(scan, failed, delivered)).duplicates == 3
    assert await rig.open_kinds("P1") == []

    day = S.LocalDate(year=2026, month=3, day=12)
    stats = await rig.alerts.GetStats(A.GetStatsRequest(merchant_id="acme", from_date=day))
    (d,) = stats.days
    assert (d.parcels_shipped, d.parcels_delivered, d.delivered_on_time, d.delivered_late) == (1, 1, 0, 1)
    assert [(c.label, c.count) for c in d.exceptions_by_reason] == [("ADDRESS_PROBLEM", 1)]
    opened = [("ADDRESS_PROBLEM", 1), ("LATE", 1), ("NEVER_SCANNED", 1)]
    assert [(c.label, c.count) for c in d.alerts_opened] == opened
    assert [(c.label, c.count) for c in d.alerts_resolved] == opened
