"""The counters exported as OpenTelemetry observable counters, read by a real SDK reader."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, types_pb2

from engine import stats
from engine.stats import StatsMetrics, StatsReader
from tests.conftest import T0_MS


def points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))
                    out[(metric.name, attrs)] = int(point.value)  # type: ignore[union-attr]
    return out


async def test_totals_are_exported_as_observable_counters(redis: Redis) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = StatsMetrics(StatsReader(redis, 4), provider.get_meter("relais-test"))
    async with redis.pipeline(transaction=True) as pipe:
        stats.add_to_pipeline(pipe, stats.shipped(0, "acme", T0_MS))
        stats.add_to_pipeline(pipe, stats.shipped(3, "globex", T0_MS + 86_400_000))
        stats.add_to_pipeline(pipe, stats.alert(1, "acme", T0_MS, alerts_pb2.ALERT_KIND_LATE))
        cost = types_pb2.Money(currency_code="CHF", amount_minor=9)
        sent = stats.notice_sent(
            2,
            "acme",
            T0_MS,
            types_pb2.NOTICE_KIND_DELIVERED,
            types_pb2.CHANNEL_SMS,
            sms_segments=1,
            sms_cost=cost,
        )
        stats.add_to_pipeline(pipe, sent)
        await pipe.execute()
    await metrics.refresh()
    seen = points(reader)
    assert seen[("relais.parcels.shipped", ())] == 2
    assert seen[("relais.alerts.opened", (("kind", "LATE"),))] == 1
    assert seen[("relais.notices.sent", (("kind_channel", "DELIVERED/sms"),))] == 1
    assert seen[("relais.sms.segments", ())] == 1
    assert seen[("relais.sms.cost", (("currency", "CHF"),))] == 9
    provider.shutdown()
