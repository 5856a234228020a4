"""OpenTelemetry: off by default, OTLP export to a real collector endpoint, a server span per RPC that
continues the caller's trace, the trace context carried in notices, bounded metric labels, trace ids
in the JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, parcel_pb2_grpc, types_pb2

from common import keys, logs
from common.clock import ManualClock
from common.logs import JsonFormatter, TraceContextFilter
from common.settings import SecuritySettings, Settings
from common.telemetry import (
    Metrics,
    SendOutcome,
    extract_trace_context,
    inject_trace_context,
    setup_telemetry,
    watch_outbox_depth,
)
from tests.security.conftest import bearer, serving, settings_with
from tests.security.probe import add_probes


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    points: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = getattr(point, "count", None)
                    points.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return points


def test_telemetry_is_off_without_an_endpoint() -> None:
    telemetry = setup_telemetry(Settings())
    assert not telemetry.enabled
    with telemetry.tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
        carrier: dict[str, str] = {}
        inject_trace_context(carrier)
        assert carrier == {}
    telemetry.metrics.events_applied(accepted=3)
    telemetry.shutdown()


def test_otel_variables_are_read_in_settings() -> None:
    config = Settings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,Tenant=relais",
            "OTEL_SERVICE_NAME": "relais-eu",
        }
    ).telemetry
    assert config.otlp_endpoint == "http://127.0.0.1:4317"
    assert dict(config.otlp_headers) == {"api-key": "s=cret", "tenant": "relais"}
    assert config.otlp_insecure
    assert config.service_name == "relais-eu"


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """The two OTLP/gRPC collector services, keeping what they are sent."""

    def __init__(self) -> None:
        self.spans: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        self.headers.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_spans_and_metrics_are_exported_over_otlp_when_an_endpoint_is_set() -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        settings = Settings.from_env(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-key=abc",
                "OTEL_SERVICE_NAME": "relais-test",
            }
        )
        telemetry = setup_telemetry(settings)
        assert telemetry.enabled
        with telemetry.tracer.start_as_current_span("ingest.batch"):
            telemetry.metrics.events_applied(accepted=5, rejected=1)
        # The exporters are synchronous: flush them off the loop that serves the collector.
        await asyncio.to_thread(telemetry.shutdown)
    finally:
        await server.stop(0)
    spans = [
        span
        for request in collector.spans
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert [span.name for span in spans] == ["ingest.batch"]
    resource = {a.key: a.value.string_value for a in collector.spans[0].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "relais-test"
    # Each process its own instance: engine workers and gateways report the same series.
    assert resource["service.instance.id"].endswith(f"-{os.getpid()}")
    names = {
        m.name
        for r in collector.metrics
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "relais.events" in names
    assert all(h.get("x-collector-key") == "abc" for h in collector.headers)


async def test_each_rpc_gets_a_server_span_that_continues_the_callers_trace(
    redis: Redis, clock: ManualClock, keys_file: Any
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(Settings(), span_exporter=exporter, metric_reader=InMemoryMetricReader())
    # The caller's own tracing, as a carrier's SDK would send it.
    caller = TracerProvider().get_tracer("carrier")
    settings = settings_with(SecuritySettings(keys_file=keys_file))
    async with serving(settings, redis, clock, [add_probes], telemetry=telemetry) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = parcel_pb2_grpc.ParcelServiceStub(channel)
            with caller.start_as_current_span("carrier.push") as parent:
                headers: dict[str, str] = {}
                inject_trace_context(headers)
                metadata = (*bearer("merchant:acme"), *headers.items())
                await stub.GetParcel(
                    parcel_pb2.GetParcelRequest(parcel_id="p1"), metadata=metadata, timeout=5
                )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetParcel(
                    parcel_pb2.GetParcelRequest(parcel_id="boom"), metadata=metadata, timeout=5
                )
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert str(info.value.details()).startswith("internal error (trace ")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["relais.v1.ParcelService/GetParcel"] * 2
    ok, failed = spans
    assert ok.kind == trace.SpanKind.SERVER
    assert ok.context.trace_id == parent.get_span_context().trace_id
    assert ok.parent is not None
    assert ok.parent.span_id == parent.get_span_context().span_id
    assert ok.attributes is not None
    assert ok.attributes["rpc.method"] == "GetParcel"
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.events == ()  # no exception event: its message could carry personal data
    for span in spans:
        assert all("Bearer" not in str(v) for v in (span.attributes or {}).values())


def test_the_trace_context_travels_in_a_notice() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(Settings(), span_exporter=exporter)
    notice = notice_pb2.Notice(notice_id="p1:SHIPPED")
    with telemetry.tracer.start_as_current_span("ingest.batch") as ingest:
        inject_trace_context(notice.trace_context)
    assert notice.trace_context["traceparent"].startswith("00-")
    stored = notice_pb2.Notice.FromString(notice.SerializeToString())
    with telemetry.tracer.start_as_current_span(
        "gateway.send", context=extract_trace_context(stored.trace_context)
    ):
        pass
    send = exporter.get_finished_spans()[-1]
    assert send.context.trace_id == ingest.get_span_context().trace_id
    assert send.parent is not None
    assert send.parent.span_id == ingest.get_span_context().span_id


def test_metric_labels_are_bounded_enum_names() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(Settings(), metric_reader=reader)
    metrics: Metrics = telemetry.metrics
    metrics.events_applied(accepted=10, duplicates=2, rejected=1)
    metrics.notice_planned(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, 3)
    metrics.notice_cancelled(types_pb2.NOTICE_KIND_PICKUP_REMINDER)
    metrics.schedule_lag(250.0, types_pb2.NOTICE_KIND_SHIPPED)
    metrics.send(types_pb2.CHANNEL_EMAIL, SendOutcome.SENT, 4)
    metrics.retried(types_pb2.CHANNEL_SMS)
    metrics.dead_lettered(types_pb2.NOTICE_KIND_DELIVERED)
    metrics.set_outbox_depth(3, 17)
    points = metric_points(reader)
    assert sorted((a["outcome"], v) for a, v in points["relais.events"]) == [
        ("accepted", 10),
        ("duplicate", 2),
        ("rejected", 1),
    ]
    assert points["relais.notices.planned"] == [({"kind": "slot_announced"}, 3)]
    assert points["relais.notices.cancelled"] == [({"kind": "pickup_reminder"}, 1)]
    assert points["relais.schedule.lag"] == [({"kind": "shipped"}, 1)]
    assert points["relais.sends"] == [({"channel": "email", "outcome": "sent"}, 4)]
    assert points["relais.retries"] == [({"channel": "sms"}, 1)]
    assert points["relais.dead_letters"] == [({"kind": "delivered"}, 1)]
    assert points["relais.outbox.depth"] == [({"shard": 3}, 17)]


def test_json_logs_carry_the_trace_id_of_the_current_span() -> None:
    telemetry = setup_telemetry(Settings(), span_exporter=InMemorySpanExporter())
    record_filter, formatter = TraceContextFilter(), JsonFormatter()
    outside = logging.LogRecord("relais", logging.INFO, __file__, 1, "no span", None, None)
    record_filter.filter(outside)
    assert "trace_id" not in json.loads(formatter.format(outside))
    with telemetry.tracer.start_as_current_span("claim") as span:
        inside = logging.LogRecord("relais", logging.INFO, __file__, 1, "claimed %d", (5,), None)
        record_filter.filter(inside)
    entry = json.loads(formatter.format(inside))
    assert entry["msg"] == "claimed 5"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")


async def test_the_outbox_depth_gauge_follows_the_streams(redis: Redis) -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(Settings(), metric_reader=reader)
    for _ in range(3):
        await redis.xadd(keys.outbox(2), {"n": b"x"})
    await redis.xadd(keys.outbox(5), {"n": b"x"})
    stop = asyncio.Event()
    stop.set()  # one sample, then stop
    await watch_outbox_depth(redis, 8, telemetry.metrics, stop)
    depths = {attrs["shard"]: value for attrs, value in metric_points(reader)["relais.outbox.depth"]}
    assert depths == {0: 0, 1: 0, 2: 3, 3: 0, 4: 0, 5: 1, 6: 0, 7: 0}


async def test_http_clients_do_not_log_the_urls_they_call(capsys: pytest.CaptureFixture[str]) -> None:
    """A Web Push URL is a device's address: httpx's INFO line per request must not reach the log."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    quieted = {name: logging.getLogger(name).level for name in logs.QUIETED}
    try:
        logs.configure("INFO")
        logging.getLogger("relais").info("a line that does reach the log")
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"http://127.0.0.1:{port}/push/DEVICE-TOKEN-SECRET", content=b"x")
        assert reply.status_code == 201
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
        server.close()
        await server.wait_closed()
    err = capsys.readouterr().err
    assert "a line that does reach the log" in err
    assert "DEVICE-TOKEN-SECRET" not in err
