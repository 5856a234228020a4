"""The engine composition: builds the stores and servicers once and hands ``start_server`` its list.

Every servicer is added here, explicitly, in one short list (``Engine.register``); components that
other helpers write take what they need from ``Engine`` (the parcel store, the re-planning callables).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from common.clock import Clock
from common.settings import Settings
from common.telemetry import Metrics
from engine.alert_monitor import AlertMonitor
from engine.alert_rules import DAY_MS, ParcelFacts, load_alert_config
from engine.alert_service import AlertServicer, add_alert_service
from engine.alert_store import CHECK_TIMER, AlertStore
from engine.facts import facts_from_state
from engine.ingest import Ingestor
from engine.parcel_service import ParcelServicer, add_parcel_service
from engine.preference_service import PreferenceServicer, add_preference_service
from engine.replan import Replanner
from engine.scheduler import Dispatcher, TimerHandler
from engine.state import ParcelStore
from engine.stats import StatsReader
from engine.stream_balance import StreamRelay
from engine.tracking_service import TrackingServicer, add_tracking_service

# ``(recipient_id) -> count``: what the preference service calls after a change and on erasure.
RecipientHook = Callable[[str], Awaitable[int]]


@dataclass(frozen=True)
class Engine:
    store: ParcelStore
    ingestor: Ingestor
    replanner: Replanner
    # Opens and resolves alerts after every parcel update and on its check timers.
    alerts: AlertMonitor
    # Timer handlers ``(shard, parcel_id, name)`` by name, for ``Dispatcher.register_timer``.
    timers: Mapping[str, TimerHandler]
    # ``start_server(register=...)``: one callable per relais service.
    register: tuple[Callable[[grpc.aio.Server], None], ...]

    @property
    def replan_recipient(self) -> RecipientHook:
        return self.replanner.replan_recipient

    @property
    def cancel_recipient_notices(self) -> RecipientHook:
        return self.replanner.cancel_recipient_notices


def build_engine(
    settings: Settings,
    redis: Redis,
    clock: Clock,
    metrics: Metrics | None = None,
    tracer: Tracer | None = None,
    relay: StreamRelay | None = None,
) -> Engine:
    alert_store = AlertStore(redis, shards=settings.shards, retention_ms=settings.retention_days * DAY_MS)
    alert_config = load_alert_config(settings.alerts.config_path)

    async def load_facts(shard: int, parcel_ids: Sequence[str]) -> dict[str, ParcelFacts]:
        records = await store.read(parcel_ids)
        return {pid: facts_from_state(r.state) for pid, r in records.items() if r.exists}

    alerts = AlertMonitor(alert_store, alert_config, clock, load_facts)
    store = ParcelStore(redis, settings, clock, after_update=alerts.on_states)
    ingestor = Ingestor(store, clock, metrics, tracer)
    replanner = Replanner(store)
    register = (
        add_tracking_service(TrackingServicer(ingestor, window=settings.engine.stream_window, relay=relay)),
        add_parcel_service(ParcelServicer(store, clock)),
        add_alert_service(AlertServicer(alert_store, StatsReader(redis, settings.shards), clock)),
        add_preference_service(
            PreferenceServicer(
                redis,
                settings.shards,
                replan_recipient=replanner.replan_recipient,
                cancel_recipient_notices=replanner.cancel_recipient_notices,
            )
        ),
    )
    return Engine(
        store=store,
        ingestor=ingestor,
        replanner=replanner,
        alerts=alerts,
        timers={CHECK_TIMER: alerts.on_timer},
        register=register,
    )


def build_dispatcher(
    settings: Settings,
    redis: Redis,
    clock: Clock,
    timers: Mapping[str, TimerHandler],
    tracer: Tracer | None = None,
) -> Dispatcher:
    """The scheduler's dispatcher over every shard, as the ``RELAIS_SCHEDULER_*`` settings say, with
    ``timers`` (the engine's ``Engine.timers``) registered."""
    scheduler = settings.scheduler
    dispatcher = Dispatcher(
        redis,
        clock,
        settings.shards,
        max_idle_s=scheduler.max_idle_s,
        timer_retry_ms=scheduler.timer_retry_ms,
        timer_concurrency=scheduler.timer_concurrency,
        timer_timeout_s=scheduler.timer_timeout_s,
        tracer=tracer,
    )
    for name, handler in timers.items():
        dispatcher.register_timer(name, handler)
    return dispatcher
