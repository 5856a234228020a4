"""Traces and metrics with OpenTelemetry, exported over OTLP only when an endpoint is configured.

``setup_telemetry(settings)`` returns a ``Telemetry``: a tracer and the ``Metrics`` instruments, passed to
the components that record (no global provider is installed, so tests run side by side with their own
in-memory exporters). Without ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and no test exporter) the tracer and
instruments are OpenTelemetry's no-op ones: a span or a counter then costs a function call.

Labels are low-cardinality enum names only (notice kind, channel, outcome, shard): never an id, never
personal data. The ``Metrics`` methods take enum values, not strings, so nothing else can slip in.
``inject_trace_context`` / ``extract_trace_context`` carry the W3C trace context in
``Notice.trace_context``, so one trace follows a carrier's event to the message a recipient receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    NoOpMeterProvider,
    ObservableGauge,
    Observation,
)
from opentelemetry.trace import NoOpTracerProvider, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from relais.v1 import notice_pb2, types_pb2

from common import keys
from common.redis_client import register

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from common.settings import Settings

SCOPE = "relais"
_PROPAGATOR = TraceContextTextMapPropagator()


class SendOutcome(enum.StrEnum):
    """What became of one send attempt (the ``outcome`` label)."""

    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    SUPPRESSED = "suppressed"


class LimitScope(enum.StrEnum):
    """Which limit held a notice back (the ``scope`` label)."""

    PROVIDER = "provider"
    RECIPIENT = "recipient"
    MERCHANT = "merchant"
    SMS_BUDGET = "sms_budget"
    QUOTA = "quota"
    # The gateway's send limits (provider, recipient, merchant) checked together in one call.
    SEND = "send"


def _kind(kind: types_pb2.NoticeKind.ValueType) -> str:
    return keys.kind_name(kind).lower()


def _channel(channel: types_pb2.Channel.ValueType) -> str:
    return keys.channel_name(channel)


@dataclass(frozen=True, slots=True)
class Metrics:
    """The instruments relais records. Use the methods: they turn enums into bounded label values."""

    events: Counter
    notices_planned: Counter
    notices_cancelled: Counter
    schedule_lag_ms: Histogram
    sends: Counter
    rate_limited: Counter
    retries: Counter
    dead_letters: Counter
    outbox_depth: ObservableGauge
    relayed: Counter
    # Last known unsettled outbox entries per shard, observed by the gauge's callback at export time
    # (the callback is synchronous, so whoever reads them from Redis stores them here).
    _outbox_depths: dict[int, int] = field(default_factory=dict)

    @classmethod
    def create(cls, meter: Meter) -> Metrics:
        depths: dict[int, int] = {}

        def observe_depths(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(depth, {"shard": shard}) for shard, depth in sorted(depths.items())]

        return cls(
            events=meter.create_counter(
                "relais.events", unit="{event}", description="Tracking events by outcome"
            ),
            notices_planned=meter.create_counter(
                "relais.notices.planned", unit="{notice}", description="Notices planned, by kind"
            ),
            notices_cancelled=meter.create_counter(
                "relais.notices.cancelled", unit="{notice}", description="Pending notices cancelled, by kind"
            ),
            schedule_lag_ms=meter.create_histogram(
                "relais.schedule.lag", unit="ms", description="Send time minus due time"
            ),
            sends=meter.create_counter(
                "relais.sends", unit="{message}", description="Send attempts by channel and outcome"
            ),
            rate_limited=meter.create_counter(
                "relais.rate_limited", unit="{notice}", description="Notices held back by a limit"
            ),
            retries=meter.create_counter("relais.retries", unit="{notice}", description="Sends retried"),
            dead_letters=meter.create_counter(
                "relais.dead_letters", unit="{notice}", description="Notices out of retries"
            ),
            outbox_depth=meter.create_observable_gauge(
                "relais.outbox.depth",
                callbacks=[observe_depths],
                unit="{notice}",
                description="Outbox entries not yet settled per shard (unread, or read and unacknowledged)",
            ),
            relayed=meter.create_counter(
                "relais.ingest.relayed",
                unit="{call}",
                description="Event streams and calls relayed to a less loaded engine worker, by kind",
            ),
            _outbox_depths=depths,
        )

    def events_applied(self, *, accepted: int = 0, duplicates: int = 0, rejected: int = 0) -> None:
        for outcome, count in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
            if count:
                self.events.add(count, {"outcome": outcome})

    def notice_planned(self, kind: types_pb2.NoticeKind.ValueType, count: int = 1) -> None:
        self.notices_planned.add(count, {"kind": _kind(kind)})

    def notice_cancelled(self, kind: types_pb2.NoticeKind.ValueType, count: int = 1) -> None:
        self.notices_cancelled.add(count, {"kind": _kind(kind)})

    def schedule_lag(self, lag_ms: float, kind: types_pb2.NoticeKind.ValueType) -> None:
        self.schedule_lag_ms.record(max(lag_ms, 0.0), {"kind": _kind(kind)})

    def send(self, channel: types_pb2.Channel.ValueType, outcome: SendOutcome, count: int = 1) -> None:
        self.sends.add(count, {"channel": _channel(channel), "outcome": outcome.value})

    def limited(self, scope: LimitScope, count: int = 1) -> None:
        self.rate_limited.add(count, {"scope": scope.value})

    def retried(self, channel: types_pb2.Channel.ValueType, count: int = 1) -> None:
        self.retries.add(count, {"channel": _channel(channel)})

    def dead_lettered(self, kind: types_pb2.NoticeKind.ValueType, count: int = 1) -> None:
        self.dead_letters.add(count, {"kind": _kind(kind)})

    def relayed_call(self, kind: str) -> None:
        """``kind``: ``stream`` or ``call`` (``engine.stream_balance``)."""
        self.relayed.add(1, {"kind": kind})

    def set_outbox_depth(self, shard: int, depth: int) -> None:
        self._outbox_depths[shard] = depth


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What recording components are given. ``shutdown`` flushes and stops the exporters."""

    tracer: Tracer
    metrics: Metrics
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None or self.meter_provider is not None

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def noop_telemetry() -> Telemetry:
    """Tracing and metrics off: OpenTelemetry's no-op tracer and meter."""
    return Telemetry(
        tracer=NoOpTracerProvider().get_tracer(SCOPE),
        metrics=Metrics.create(NoOpMeterProvider().get_meter(SCOPE)),
    )


def setup_telemetry(
    settings: Settings,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """Export over OTLP when ``settings.telemetry.otlp_endpoint`` is set; tests pass in-memory
    exporters instead. With neither, everything is a no-op and nothing of the SDK is imported.
    """
    config = settings.telemetry
    otlp = config.otlp_endpoint
    if span_exporter is None and metric_reader is None and otlp is None:
        return noop_telemetry()
    # The SDK is imported only when something records: the no-op path stays light.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # One instance per process: engine workers and gateways export the same series names, and a
    # backend adds up (not overwrites) what several instances report.
    instance = f"{socket.gethostname()}-{os.getpid()}"
    resource = Resource.create({"service.name": config.service_name, "service.instance.id": instance})
    tracer_provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        # Tests read spans right after the call: export synchronously.
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif otlp is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(
                    endpoint=otlp, headers=dict(config.otlp_headers), insecure=config.otlp_insecure
                )
            )
        )
    readers: list[MetricReader] = []
    if metric_reader is not None:
        readers.append(metric_reader)
    elif otlp is not None:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(
            endpoint=otlp, headers=dict(config.otlp_headers), insecure=config.otlp_insecure
        )
        readers.append(
            PeriodicExportingMetricReader(exporter, export_interval_millis=config.metric_interval_ms)
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(
        tracer=tracer_provider.get_tracer(SCOPE),
        metrics=Metrics.create(meter_provider.get_meter(SCOPE)),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )


def inject_trace_context(carrier: MutableMapping[str, str]) -> None:
    """Write the current span's W3C ``traceparent`` (and ``tracestate``) into ``carrier``, e.g.
    ``notice.trace_context``. Nothing is written when no span is recording."""
    _PROPAGATOR.inject(carrier)


def extract_trace_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context to start a child span in, from a carrier filled by ``inject_trace_context``
    (an empty context, hence a new trace, when the carrier holds none)."""
    return _PROPAGATOR.extract(carrier)


def trace_id_of(notice: notice_pb2.Notice) -> str:
    """The trace a notice continues (its ``traceparent``'s trace id, hex), or "" when it carries none."""
    span_context = trace.get_current_span(extract_trace_context(notice.trace_context)).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as hex, for logs and error messages; None outside one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


# --- the gateway's sends --------------------------------------------------------------------------------

_OUTCOMES: dict[int, SendOutcome] = {
    notice_pb2.NOTICE_STATUS_SENT: SendOutcome.SENT,
    notice_pb2.NOTICE_STATUS_RETRYING: SendOutcome.RETRYING,
    notice_pb2.NOTICE_STATUS_FAILED: SendOutcome.FAILED,
    notice_pb2.NOTICE_STATUS_DEAD_LETTER: SendOutcome.DEAD_LETTER,
    notice_pb2.NOTICE_STATUS_SUPPRESSED: SendOutcome.SUPPRESSED,
}


def send_spans(
    telemetry: Telemetry,
    provider: str,
    notices: Sequence[tuple[notice_pb2.Notice, types_pb2.Channel.ValueType]],
) -> list[Span]:
    """One span per message handed to a provider, each a child of the trace its notice carries (the
    carrier's batch that caused it). Nothing when tracing is off: not even the context parsing."""
    if telemetry.tracer_provider is None:
        return []
    return [
        telemetry.tracer.start_span(
            "gateway.send",
            context=extract_trace_context(notice.trace_context),
            kind=SpanKind.CLIENT,
            attributes={
                # Ids, not personal data: what an operator searches a parcel's sends by.
                "relais.notice_id": notice.notice_id,
                "relais.notice.kind": _kind(notice.kind),
                "relais.channel": _channel(channel),
                "relais.provider": provider,
                "relais.attempt": notice.attempt,
            },
        )
        for notice, channel in notices
    ]


def end_send_spans(spans: Sequence[Span], results: Sequence[object]) -> None:
    """End the spans with the result's type (Accepted, TransientFailure...), never its text."""
    for span, result in zip(spans, results, strict=False):
        span.set_attribute("relais.result", type(result).__name__ if result is not None else "none")
        span.end()


def record_send(
    metrics: Metrics,
    notice: notice_pb2.Notice,
    channel: types_pb2.Channel.ValueType,
    status: notice_pb2.NoticeStatus.ValueType,
    now_ms: int,
) -> None:
    """Count one recorded attempt; the first sent attempt also measures the lag behind its due time."""
    outcome = _OUTCOMES.get(status)
    if outcome is None:
        return
    metrics.send(channel, outcome)
    if outcome is SendOutcome.SENT and notice.HasField("due_at"):
        metrics.schedule_lag(now_ms - notice.due_at.ToMilliseconds(), notice.kind)
    elif outcome is SendOutcome.RETRYING:
        metrics.retried(channel)
    elif outcome is SendOutcome.DEAD_LETTER:
        metrics.dead_lettered(notice.kind)


async def watch_outbox_depth(
    redis: Redis, shards: int, metrics: Metrics, stop: asyncio.Event, *, interval_s: float = 10.0
) -> None:
    """Keep the outbox-depth gauge current: every shard's unsettled entries in one pipelined round
    trip per interval (the gauge's callback runs at export time and cannot await Redis)."""
    depth_script = register(redis, "outbox_depth")
    while True:
        await sample_outbox_depth(redis, shards, metrics, depth_script)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
            return


async def sample_outbox_depth(
    redis: Redis, shards: int, metrics: Metrics, depth_script: AsyncScript | None = None
) -> None:
    """Each shard's entries not yet settled (``outbox_depth.lua``), not its XLEN: the gateways trim
    settled entries lazily, in bulk, so the stream holds some for a while (``settle.lua``)."""
    script = depth_script or register(redis, "outbox_depth")
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        await script(keys=[keys.outbox(shard)], args=[keys.OUTBOX_GROUP], client=pipe)
    try:
        depths = await pipe.execute()
    except RedisError:
        return  # a gauge may lag; the next round tries again
    for shard, depth in enumerate(depths):
        metrics.set_outbox_depth(shard, int(depth))
