"""The engine composition: builds the stores and servicers once and hands ``start_server`` its list.

Every servicer is added here, explicitly, in one short list (``Engine.register``); components that
other helpers write take what they need from ``Engine`` (the parcel store, the re-planning callables).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from redis.asyncio import Redis

from common.clock import Clock
from common.settings import Settings
from common.telemetry import Metrics
from engine.ingest import Ingestor
from engine.parcel_service import ParcelServicer, add_parcel_service
from engine.replan import Replanner
from engine.state import ParcelStore
from engine.tracking_service import TrackingServicer, add_tracking_service

# ``(recipient_id) -> count``: what the preference service calls after a change and on erasure.
RecipientHook = Callable[[str], Awaitable[int]]


@dataclass(frozen=True)
class Engine:
    store: ParcelStore
    ingestor: Ingestor
    replanner: Replanner
    # ``start_server(register=...)``: one callable per relais service.
    register: tuple[Callable[[grpc.aio.Server], None], ...]

    @property
    def replan_recipient(self) -> RecipientHook:
        return self.replanner.replan_recipient

    @property
    def cancel_recipient_notices(self) -> RecipientHook:
        return self.replanner.cancel_recipient_notices


def build_engine(settings: Settings, redis: Redis, clock: Clock, metrics: Metrics | None = None) -> Engine:
    store = ParcelStore(redis, settings, clock)
    ingestor = Ingestor(store, clock, metrics)
    replanner = Replanner(store)
    register = (
        add_tracking_service(TrackingServicer(ingestor, window=settings.engine.stream_window)),
        add_parcel_service(ParcelServicer(store, clock)),
    )
    return Engine(store=store, ingestor=ingestor, replanner=replanner, register=register)
