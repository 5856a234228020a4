"""Builders shared by the engine-core tests: events, registrations, preferences, due-set helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.settings import Settings
from engine.ingest import Ingestor
from engine.parcel_service import ParcelServicer, add_parcel_service
from engine.replan import Replanner
from engine.state import ParcelStore
from engine.tracking_service import TrackingServicer, add_tracking_service
from gateway.scripts import LuaScript
from gateway.settle import Settlement

MIN_MS = 60_000
HOUR_MS = 3_600_000
SETTINGS = Settings(shards=4)


def window(start_ms: int, end_ms: int) -> types_pb2.TimeWindow:
    w = types_pb2.TimeWindow()
    w.start.FromMilliseconds(start_ms)
    w.end.FromMilliseconds(end_ms)
    return w


def event(
    event_id: str,
    parcel_id: str,
    status: types_pb2.TrackingStatus.ValueType,
    occurred_ms: int,
    *,
    slot: tuple[int, int] | None = None,
    pickup: tuple[str, int] | None = None,
    reason: types_pb2.ExceptionReason.ValueType = types_pb2.EXCEPTION_REASON_UNSPECIFIED,
) -> tracking_pb2.TrackingEvent:
    e = tracking_pb2.TrackingEvent(
        event_id=event_id, parcel_id=parcel_id, carrier="swisspost", status=status, exception_reason=reason
    )
    e.occurred_at.FromMilliseconds(occurred_ms)
    if slot is not None:
        e.delivery_window.CopyFrom(window(*slot))
    if pickup is not None:
        e.pickup_point.id, deadline_ms = pickup
        e.pickup_point.name = "Kiosk Bahnhof"
        e.pickup_point.deadline.FromMilliseconds(deadline_ms)
    return e


def registration(
    parcel_id: str, *, recipient_id: str = "acme/r1", paid: bool = True, merchant_id: str = "acme"
) -> parcel_pb2.ParcelRegistration:
    reg = parcel_pb2.ParcelRegistration(
        parcel_id=parcel_id, merchant_id=merchant_id, carrier="swisspost", recipient_id=recipient_id
    )
    reg.order.paid = paid
    reg.order.order_reference = "A-1"
    reg.order.declared_value.currency_code = "CHF"
    reg.order.declared_value.amount_minor = 12_500
    return reg


@dataclass(frozen=True)
class Core:
    """The engine core alone (no alert hook): what these tests exercise and count round trips of."""

    store: ParcelStore
    ingestor: Ingestor
    replanner: Replanner
    parcels: ParcelServicer
    register: tuple[Callable[[grpc.aio.Server], None], ...]


def engine_for(redis: Redis, clock: ManualClock, settings: Settings = SETTINGS) -> Core:
    store = ParcelStore(redis, settings, clock)
    ingestor = Ingestor(store, clock)
    parcels = ParcelServicer(store, clock)
    register = (
        add_tracking_service(TrackingServicer(ingestor, window=settings.engine.stream_window)),
        add_parcel_service(parcels),
    )
    return Core(store, ingestor, Replanner(store), parcels, register)


async def hget(redis: Redis, key: str, name: str) -> bytes | None:
    value: bytes | None = await redis.hget(key, name)  # type: ignore[misc]
    return value


async def hset(redis: Redis, key: str, name: str, value: bytes) -> None:
    await redis.hset(key, name, value)  # type: ignore[misc, arg-type]


async def hkeys(redis: Redis, key: str) -> list[bytes]:
    members: list[bytes] = await redis.hkeys(key)  # type: ignore[misc]
    return members


async def put_preferences(redis: Redis, prefs: preferences_pb2.RecipientPreferences) -> None:
    """As the preferences helper stores them."""
    rid = prefs.recipient_id
    await redis.set(keys.preferences(keys.shard_of(rid, SETTINGS.shards), rid), prefs.SerializeToString())


async def due_members(redis: Redis, parcel_id: str) -> dict[str, int]:
    """The parcel's notices in its due set, with their due times (internal timers such as the alert
    check ``<parcel>:CHECK_ALERTS`` left out)."""
    shard = keys.shard_of(parcel_id, SETTINGS.shards)
    entries = await redis.zrange(keys.due(shard), 0, -1, withscores=True)
    members = {m.decode(): int(s) for m, s in entries}
    return {m: s for m, s in members.items() if m.startswith(parcel_id + ":") and ":CHECK_" not in m}


async def claim(redis: Redis, parcel_id: str, kind: str) -> None:
    """What the scheduler's claim does to the due set: the notice leaves it (handed to the gateway)."""
    shard = keys.shard_of(parcel_id, SETTINGS.shards)
    assert await redis.zrem(keys.due(shard), f"{parcel_id}:{kind}") == 1


async def claim_and_send(redis: Redis, parcel_id: str, kind: str, clock: ManualClock) -> None:
    """``claim``, then what the gateway records once it sent a slot notice (its settle script's
    ``told``): the slot the recipient read."""
    await claim(redis, parcel_id, kind)
    shard = keys.shard_of(parcel_id, SETTINGS.shards)
    raw = await redis.hget(keys.parcel(shard, parcel_id), f"n:{kind}")  # type: ignore[misc]
    assert raw is not None
    settlement = Settlement(
        LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=0, now_ms=clock.now_ms()
    )
    settlement.told(shard, notice_pb2.Notice.FromString(raw))
    await settlement.execute(redis, load_scripts=True)
