"""Personal data never reaches a log line, a span or a metric, and erasure leaves none in Redis.

Canary values (an email address, a phone number, push tokens) are planted in a recipient's
preferences; a whole journey then runs with tracing, metrics and DEBUG logging on: registration and
events over gRPC with API keys, the scheduler's claim, the gateway's send through the file channel.
The message the recipient would get must carry the canary (so the data really went through), and
nothing exported may.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from relais.v1 import (
    parcel_pb2,
    parcel_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
    types_pb2,
)

from channels.file_sink import FileChannel
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
# A well-formed subscription (65-byte P-256 point, 16-byte secret) whose encodings are recognisable.
CANARY_P256DH = base64.urlsafe_b64encode(b"\x04" + b"canary-7731-p256dh".ljust(64, b"k")).decode().rstrip("=")
CANARY_AUTH = base64.urlsafe_b64encode(b"canary-7731-auth").decode().rstrip("=")
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


async def set_preferences(channel: grpc.aio.Channel) -> None:
    """The merchant stores the recipient's preferences through PreferenceService."""
    stored = await preferences_pb2_grpc.PreferenceServiceStub(channel).UpdatePreferences(
        preferences_pb2.UpdatePreferencesRequest(preferences=canary_preferences()),
        metadata=bearer("merchant:acme"),
        timeout=5,
    )
    assert stored.email == CANARY_EMAIL
    assert stored.phone == CANARY_PHONE


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
    telemetry = exported.telemetry
    register = build_engine(settings, redis, clock, telemetry.metrics, telemetry.tracer).register
    async with serving(settings, redis, clock, register, telemetry=telemetry) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await set_preferences(channel)
            await journey(channel, redis, clock, settings, tmp_path / "sink", telemetry)
            view = await parcel_pb2_grpc.ParcelServiceStub(channel).GetParcel(
                parcel_pb2.GetParcelRequest(parcel_id=PARCEL), metadata=bearer("merchant:acme"), timeout=5
            )
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
    # An operator finds a send's span by its notice id, or from GetParcel's attempt (its trace id).
    sent_ids = {
        (span.attributes or {}).get("relais.notice_id")
        for span in exported.spans.get_finished_spans()
        if span.name == "gateway.send"
    }
    assert sent_ids == {f"{PARCEL}:SHIPPED", f"{PARCEL}:SLOT_ANNOUNCED"}
    sent_traces = {attempt.trace_id for notice in view.notices for attempt in notice.attempts}
    assert sent_traces == {format(batch_trace, "032x")}
    metrics = json.loads(next(text for kind, text in texts if kind == "metrics"))
    names = {
        m["name"] for rm in metrics["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]
    }
    assert {"relais.events", "relais.sends", "relais.schedule.lag"} <= names


async def one(redis: Redis, command: str, *args: object) -> Any:
    """One command through a pipeline: redis-py types hash, list and set commands for its sync and
    async clients at once, which strict mypy cannot await."""
    pipe = redis.pipeline(transaction=False)
    getattr(pipe, command)(*args)
    (reply,) = await pipe.execute()
    return reply


async def everything_in(redis: Redis) -> list[bytes]:
    """Every key name and every value in the database, each read according to its type."""
    found: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        found.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            found.append(await redis.get(key) or b"")
        elif kind == "hash":
            found.extend(b for pair in (await one(redis, "hgetall", key)).items() for b in pair)
        elif kind == "list":
            found.extend(await one(redis, "lrange", key, 0, -1))
        elif kind == "set":
            found.extend(await one(redis, "smembers", key))
        elif kind == "zset":
            found.extend(member for member, _score in await redis.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for _id, fields in await redis.xrange(key):
                found.extend(b for pair in fields.items() for b in pair)
        else:
            raise AssertionError(f"{key!r} has a type this scan does not read: {kind}")
    return found


def canaries_in(values: list[bytes]) -> set[str]:
    return {canary for canary in CANARY_SHAPES for value in values if canary.encode() in value}


async def test_erasure_leaves_no_personal_data_in_redis(
    redis: Redis, clock: ManualClock, keys_file: Path, tmp_path: Path
) -> None:
    settings = settings_with(SecuritySettings(keys_file=keys_file))
    telemetry = setup_telemetry(Settings())
    register = build_engine(settings, redis, clock).register
    async with serving(settings, redis, clock, register) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await set_preferences(channel)
            await journey(channel, redis, clock, settings, tmp_path / "sink", telemetry)
            # The slot moves: a correction waits (debounced) in the due set when erasure comes.
            moved = event("ev-3", types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY, clock.now_ms() - 1000)
            moved.delivery_window.start.FromMilliseconds(T0_MS + 6 * HOUR_MS)
            moved.delivery_window.end.FromMilliseconds(T0_MS + 8 * HOUR_MS)
            ack = await tracking_pb2_grpc.TrackingServiceStub(channel).RecordEvents(
                tracking_pb2.EventBatch(seq=2, events=[moved]),
                metadata=bearer("carrier:swisspost"),
                timeout=5,
            )
            assert ack.accepted == 1, ack
            # The scan does see personal data while there is some.
            assert CANARY_EMAIL in canaries_in(await everything_in(redis))

            preferences = preferences_pb2_grpc.PreferenceServiceStub(channel)
            erased = await preferences.EraseRecipient(
                preferences_pb2.EraseRecipientRequest(recipient_id=RECIPIENT),
                metadata=bearer("merchant:acme"),
                timeout=5,
            )
            assert erased.preferences_erased
            assert erased.notices_cancelled >= 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await preferences.GetPreferences(
                    preferences_pb2.GetPreferencesRequest(recipient_id=RECIPIENT),
                    metadata=bearer("merchant:acme"),
                    timeout=5,
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # Another merchant may not erase (or read) this merchant's recipients.
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await preferences.EraseRecipient(
                    preferences_pb2.EraseRecipientRequest(recipient_id=RECIPIENT),
                    metadata=bearer("merchant:globex"),
                    timeout=5,
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert canaries_in(await everything_in(redis)) == set()
