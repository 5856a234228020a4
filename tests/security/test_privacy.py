"""Personal data never reaches a log line, a span or a metric, and erasure leaves none in Redis.

Canary values (an email address, a phone number, push tokens) are planted in a recipient's
preferences; a whole journey then runs with tracing, metrics and DEBUG logging on: registration and
events over gRPC with API keys, the scheduler's claim, the gateway's send through the file channel.
The message the recipient would get must carry the canary (so the data really went through), and
nothing exported may.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc, preferences_pb2, tracking_pb2, tracking_pb2_grpc, types_pb2

from channels.file_sink import FileChannel
from common import keys
from common.clock import ManualClock
from common.logs import JsonFormatter, TraceContextFilter
from common.settings import SecuritySettings, Settings
from common.telemetry import Telemetry, setup_telemetry
from engine.app import build_engine
from engine.scheduler import Dispatcher
from gateway.worker import Gateway
from tests.conftest import T0_MS
from tests.security.conftest import bearer, serving, settings_with

HOUR_MS = 3_600_000
RECIPIENT = "acme/r-canary"
PARCEL = "CANARY-P1"
CANARY_EMAIL = "canary.7731@mailbox.example"
CANARY_PHONE = "+41795557731"
CANARY_FCM = "fcm-canary-token-7731-abcdef"
CANARY_PUSH_ENDPOINT = "https://push.example/canary-endpoint-7731"
CANARY_P256DH = "BCanaryP256dhKey7731xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
CANARY_AUTH = "canaryAuth7731"
CANARIES = (CANARY_EMAIL, CANARY_PHONE, CANARY_FCM, CANARY_PUSH_ENDPOINT, CANARY_P256DH, CANARY_AUTH)
# The phone number as it might be logged in other shapes.
CANARY_SHAPES = (*CANARIES, "795557731", "canary.7731", "7731@mailbox")


def canary_preferences() -> preferences_pb2.RecipientPreferences:
    prefs = preferences_pb2.RecipientPreferences(
        recipient_id=RECIPIENT,
        locale="de-CH",
        time_zone="Europe/Zurich",
        email=CANARY_EMAIL,
        phone=CANARY_PHONE,
        sms_opt_in=True,
        region="CH",
        channel_order=[types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_PUSH, types_pb2.CHANNEL_SMS],
    )
    prefs.push_targets.add().fcm.token = CANARY_FCM
    web = prefs.push_targets.add().web_push
    web.endpoint, web.p256dh, web.auth = CANARY_PUSH_ENDPOINT, CANARY_P256DH, CANARY_AUTH
    return prefs


class Capture(logging.Handler):
    """Every record as the production formatter writes it, trace ids included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(TraceContextFilter())
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Exported:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    logs: Capture
    telemetry: Telemetry

    def texts(self) -> Iterator[tuple[str, str]]:
        for span in self.spans.get_finished_spans():
            yield "span", span.to_json()
        data = self.metrics.get_metrics_data()
        if data is not None:
            yield "metrics", data.to_json()
        for line in self.logs.lines:
            yield "log", line


@pytest.fixture
def exported() -> Iterator[Exported]:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = setup_telemetry(Settings(), span_exporter=spans, metric_reader=metrics)
    capture = Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield Exported(spans, metrics, capture, telemetry)
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        telemetry.shutdown()


def event(
    event_id: str, status: types_pb2.TrackingStatus.ValueType, occurred_ms: int
) -> tracking_pb2.TrackingEvent:
    e = tracking_pb2.TrackingEvent(event_id=event_id, parcel_id=PARCEL, carrier="swisspost", status=status)
    e.occurred_at.FromMilliseconds(occurred_ms)
    return e


async def journey(
    channel: grpc.aio.Channel,
    redis: Redis,
    clock: ManualClock,
    settings: Settings,
    sink: Path,
    telemetry: Telemetry,
) -> None:
    """Register, events with a slot, the scheduler's claim, the gateway's send to files."""
    parcels = parcel_pb2_grpc.ParcelServiceStub(channel)
    registration = parcel_pb2.ParcelRegistration(
        parcel_id=PARCEL, merchant_id="acme", carrier="swisspost", recipient_id=RECIPIENT
    )
    registration.order.paid = True
    registration.order.declared_value.currency_code = "CHF"
    registration.order.declared_value.amount_minor = 50_000
    reply = await parcels.RegisterParcels(
        parcel_pb2.RegisterParcelsRequest(parcels=[registration]), metadata=bearer("merchant:acme"), timeout=5
    )
    assert reply.registered == 1, reply
    scanned = event("ev-1", types_pb2.TRACKING_STATUS_IN_TRANSIT, T0_MS - HOUR_MS)
    out = event("ev-2", types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS - 60_000)
    out.delivery_window.start.FromMilliseconds(T0_MS + 3 * HOUR_MS)
    out.delivery_window.end.FromMilliseconds(T0_MS + 5 * HOUR_MS)
    ack = await tracking_pb2_grpc.TrackingServiceStub(channel).RecordEvents(
        tracking_pb2.EventBatch(seq=1, events=[scanned, out]), metadata=bearer("carrier:swisspost"), timeout=5
    )
    assert ack.accepted == 2, ack
    clock.advance_ms(10 * 60_000)
    dispatcher = Dispatcher(redis, clock, settings.shards, tracer=telemetry.tracer)
    claimed = await dispatcher.claim_once()
    assert claimed.claimed >= 1, claimed
    files = {"file": FileChannel.from_options({"dir": str(sink)})}
    gateway = Gateway(settings, redis, clock, files, consumer="privacy", telemetry=telemetry)
    await gateway.start()
    stats = await gateway.run_once()
    assert stats.sent >= 1, stats


async def test_personal_data_reaches_no_log_span_or_metric(
    redis: Redis, clock: ManualClock, keys_file: Path, tmp_path: Path, exported: Exported
) -> None:
    settings = settings_with(SecuritySettings(keys_file=keys_file))
    shard = keys.shard_of(RECIPIENT, settings.shards)
    await redis.set(keys.preferences(shard, RECIPIENT), canary_preferences().SerializeToString())
    telemetry = exported.telemetry
    register = build_engine(settings, redis, clock, telemetry.metrics, telemetry.tracer).register
    async with serving(settings, redis, clock, register, telemetry=telemetry) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await journey(channel, redis, clock, settings, tmp_path / "sink", telemetry)
            # A failing call too: errors are where data leaks most easily.
            with pytest.raises(grpc.aio.AioRpcError):
                await parcel_pb2_grpc.ParcelServiceStub(channel).GetParcel(
                    parcel_pb2.GetParcelRequest(parcel_id=CANARY_EMAIL),
                    metadata=bearer("merchant:acme"),
                    timeout=5,
                )
    # The recipient's message carries the canary: the data went all the way through.
    delivered = [p.read_text(errors="replace") for p in (tmp_path / "sink").rglob("*") if p.is_file()]
    assert any(CANARY_EMAIL in text for text in delivered), delivered
    texts = list(exported.texts())
    kinds = {kind for kind, _ in texts}
    assert kinds == {"span", "metrics", "log"}, kinds
    leaks = [(kind, canary) for kind, text in texts for canary in CANARY_SHAPES if canary in text]
    assert leaks == []
    # What is exported is about the journey: a span per call, batch, claim and send; one trace from
    # the carrier's batch to the message.
    spans = {span.name: span for span in exported.spans.get_finished_spans()}
    assert {
        "relais.v1.ParcelService/RegisterParcels",
        "relais.v1.TrackingService/RecordEvents",
        "ingest.batch",
        "scheduler.claim",
        "gateway.send",
    } <= set(spans)
    batch_trace = spans["relais.v1.TrackingService/RecordEvents"].context.trace_id
    assert spans["ingest.batch"].context.trace_id == batch_trace
    assert spans["gateway.send"].context.trace_id == batch_trace
    metrics = json.loads(next(text for kind, text in texts if kind == "metrics"))
    names = {
        m["name"] for rm in metrics["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]
    }
    assert {"relais.events", "relais.sends", "relais.schedule.lag"} <= names
