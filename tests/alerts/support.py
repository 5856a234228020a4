"""Builders shared by the alert tests."""

from __future__ import annotations

from redis.asyncio import Redis
from relais.v1 import parcel_pb2, tracking_pb2, types_pb2

from common.clock import ManualClock
from common.settings import Settings
from engine.alert_rules import ParcelFacts
from engine.app import Engine, build_engine
from engine.parcel_service import ParcelServicer
from engine.scheduler import Dispatcher
from tests.conftest import T0_MS


def parcel_facts(
    parcel_id: str = "PX1", status: int = types_pb2.TRACKING_STATUS_IN_TRANSIT, **kw: object
) -> ParcelFacts:
    """An acme parcel created, first scanned and last scanned at T0; ``kw`` sets any other field."""
    base: dict[str, object] = {
        "parcel_id": parcel_id,
        "merchant_id": "acme",
        "status": status,
        "created_ms": T0_MS,
        "first_scan_ms": T0_MS,
        "last_event_ms": T0_MS,
    }
    base.update(kw)
    return ParcelFacts(**base)  # type: ignore[arg-type]


def scan(
    event_id: str, status: types_pb2.TrackingStatus.ValueType, occurred_ms: int
) -> tracking_pb2.EventBatch:
    """A swisspost scan of P1."""
    event = tracking_pb2.TrackingEvent(event_id=event_id, parcel_id="P1", carrier="swisspost", status=status)
    event.occurred_at.FromMilliseconds(occurred_ms)
    return tracking_pb2.EventBatch(seq=1, events=[event])


def engine_with_timers(settings: Settings, redis: Redis, clock: ManualClock) -> tuple[Engine, Dispatcher]:
    """The engine, and a dispatcher that runs its alert check timers."""
    engine = build_engine(settings, redis, clock)
    dispatcher = Dispatcher(redis, clock, settings.shards)
    for name, handler in engine.timers.items():
        dispatcher.register_timer(name, handler)
    return engine, dispatcher


async def register_p1(engine: Engine, clock: ManualClock) -> None:
    """Register acme's parcel P1."""
    registration = parcel_pb2.ParcelRegistration(
        parcel_id="P1", merchant_id="acme", carrier="swisspost", recipient_id="acme/r1"
    )
    await ParcelServicer(engine.store, clock).RegisterParcels(
        parcel_pb2.RegisterParcelsRequest(parcels=[registration]),
        None,  # type: ignore[arg-type]
    )
