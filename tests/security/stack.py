"""The real relais services, composed for the cross-cutting tests (fuzz, privacy) the way the engine
composition does it."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from redis.asyncio import Redis

from common.clock import Clock
from common.settings import Settings
from common.telemetry import Metrics
from engine.alert_service import AlertServicer, add_alert_service
from engine.alert_store import AlertStore
from engine.app import Engine, build_engine
from engine.stats import StatsReader

DAY_MS = 86_400_000


def relais_services(
    settings: Settings, redis: Redis, clock: Clock, metrics: Metrics | None = None
) -> tuple[Engine, list[Callable[[grpc.aio.Server], None]]]:
    engine = build_engine(settings, redis, clock, metrics)
    alerts = AlertStore(redis, shards=settings.shards, retention_ms=settings.retention_days * DAY_MS)
    register = [
        *engine.register,
        add_alert_service(AlertServicer(alerts, StatsReader(redis, settings.shards), clock)),
    ]
    return engine, register
