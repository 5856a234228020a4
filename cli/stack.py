"""What runs beside the engine's gRPC server: the scheduler, the alert digests, the telemetry gauges
and, for ``relais run``, the gateway with local sinks.

``relais serve`` runs the scheduler and the digests (the engine's own loops); ``relais run`` adds a
gateway whose email goes to an SMTP sink on loopback and whose SMS and push go to files, all under
``RELAIS_SINK_DIR`` — unless channels are configured explicitly (``RELAIS_CHANNELS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import httpx
from redis.asyncio import Redis

from channels.smtp_sink import SmtpSink
from common.clock import Clock
from common.settings import Settings
from common.telemetry import Telemetry, watch_outbox_depth
from engine.alert_digest import DigestSender, default_sinks
from engine.alert_rules import load_alert_config
from engine.app import Engine, build_dispatcher
from engine.stats import StatsMetrics, StatsReader
from gateway.worker import run_configured_gateway

log = logging.getLogger(__name__)


def uses_default_channels(settings: Settings) -> bool:
    return settings.channels == Settings.channels and not settings.channel_options


@contextlib.asynccontextmanager
async def local_sinks(settings: Settings) -> AsyncIterator[Settings]:
    """An SMTP sink for email and files for SMS and push; yields the settings that point at them."""
    sink = SmtpSink(settings.sink_dir / "smtp")
    host, port = await sink.start()
    options: Mapping[str, Mapping[str, str]] = {
        "email": {"host": host, "port": str(port), "tls": "none", "from": "notices@relais.invalid"},
        "file": {"dir": str(settings.sink_dir)},
    }
    log.info("local sinks: email to SMTP %s:%d (files in %s), SMS and push as files", host, port, sink.outbox)
    try:
        yield replace(settings, channels=("email", "file"), channel_options=options)
    finally:
        await sink.stop()


async def _gateway(
    settings: Settings, redis: Redis, clock: Clock, telemetry: Telemetry, stop: asyncio.Event
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if uses_default_channels(settings):
            settings = await stack.enter_async_context(local_sinks(settings))
        await run_configured_gateway(settings, redis, clock, stop, telemetry=telemetry)


async def _export_counters(
    redis: Redis, settings: Settings, telemetry: Telemetry, stop: asyncio.Event, interval_s: float = 30.0
) -> None:
    """Keep the merchants' daily counters' OpenTelemetry snapshot current (callbacks cannot await)."""
    if telemetry.meter_provider is None:
        return
    metrics = StatsMetrics(StatsReader(redis, settings.shards), telemetry.meter_provider.get_meter("relais"))
    while not stop.is_set():
        await metrics.refresh()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


@contextlib.asynccontextmanager
async def engine_loops(
    settings: Settings,
    redis: Redis,
    clock: Clock,
    engine: Engine,
    telemetry: Telemetry,
    *,
    with_gateway: bool,
) -> AsyncIterator[None]:
    """Start the loops; on exit ask them to stop and wait for them."""
    stop = asyncio.Event()
    dispatcher = build_dispatcher(settings, redis, clock, engine.timers, telemetry.tracer)
    http = httpx.AsyncClient(timeout=settings.alerts.send_timeout_s)
    digests = DigestSender(
        redis,
        shards=settings.shards,
        config=load_alert_config(settings.alerts.config_path),
        sinks=default_sinks(settings.alerts, http),
    )
    tasks = [
        asyncio.create_task(dispatcher.run(stop), name="scheduler"),
        asyncio.create_task(digests.run(settings.alerts.digest_interval_s, stop), name="alert-digests"),
        asyncio.create_task(_export_counters(redis, settings, telemetry, stop), name="counters"),
    ]
    if telemetry.enabled:
        tasks.append(
            asyncio.create_task(
                watch_outbox_depth(redis, settings.shards, telemetry.metrics, stop), name="outbox-depth"
            )
        )
    if with_gateway:
        tasks.append(asyncio.create_task(_gateway(settings, redis, clock, telemetry, stop), name="gateway"))
    try:
        yield
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await http.aclose()
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("%s stopped with %s", task.get_name(), type(result).__name__, exc_info=result)
