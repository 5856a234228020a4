"""AlertService over real gRPC on loopback: ListAlerts filters and pages newest first, acknowledging,
GetStats, and clear statuses for bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, alerts_pb2_grpc, types_pb2

from common.clock import ManualClock
from common.settings import Settings
from engine import stats
from engine.alert_monitor import AlertMonitor
from engine.alert_rules import DAY_MS, AlertConfig
from engine.alert_service import AlertServicer, add_alert_service
from engine.alert_store import AlertStore
from engine.server import start_server
from engine.stats import StatsReader
from tests.alerts.support import parcel_facts as parcel
from tests.conftest import T0_MS

S = types_pb2
A = alerts_pb2
SHARDS = 4


@dataclass
class Rig:
    stub: alerts_pb2_grpc.AlertServiceAsyncStub
    monitor: AlertMonitor
    clock: ManualClock
    redis: Redis


@pytest.fixture
async def rig(redis: Redis, clock: ManualClock) -> AsyncIterator[Rig]:
    store = AlertStore(redis, shards=SHARDS, retention_ms=30 * DAY_MS)
    servicer = AlertServicer(store, StatsReader(redis, SHARDS), clock)
    server = await start_server(
        Settings(listen="127.0.0.1:0", shards=SHARDS), redis, register=[add_alert_service(servicer)]
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Rig(
            alerts_pb2_grpc.AlertServiceStub(channel), AlertMonitor(store, AlertConfig(), clock), clock, redis
        )
    await server.stop(0)


async def open_some(rig: Rig) -> list[str]:
    """Seven alerts of acme, one a minute (several parcels share a minute), one of another merchant.
    Returns acme's alert ids newest first."""
    returned = S.TRACKING_STATUS_RETURNING_TO_SENDER
    address = {"status": S.TRACKING_STATUS_EXCEPTION, "exception_reason": S.EXCEPTION_REASON_ADDRESS_PROBLEM}
    ids: list[str] = []
    for minute, batch in enumerate(
        [
            [parcel("R1", returned), parcel("R2", returned)],
            [parcel("X1", **address)],
            [parcel("R3", returned), parcel("X2", **address), parcel("R4", returned)],
            [parcel("X3", **address), parcel("OTHER", returned, merchant_id="globex")],
        ]
    ):
        rig.clock.set_ms(T0_MS + minute * 60_000)
        changes = await rig.monitor.check(batch)
        opened = [a for c in changes.values() for a in c.opened if a.merchant_id == "acme"]
        ids = sorted(a.alert_id for a in opened) + ids
    # Within one millisecond, newest first means alert id order; across, later first.
    return ids


async def list_all(rig: Rig, **filters: object) -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        page = await rig.stub.ListAlerts(A.ListAlertsRequest(page_size=2, page_token=token, **filters))  # type: ignore[arg-type]
        assert len(page.alerts) <= 2
        seen += [a.alert_id for a in page.alerts]
        token = page.next_page_token
        if not token:
            return seen


async def test_list_alerts_pages_newest_first(rig: Rig) -> None:
    expected = await open_some(rig)
    assert len(expected) == 7
    assert await list_all(rig, merchant_id="acme") == expected
    first = await rig.stub.ListAlerts(A.ListAlertsRequest(merchant_id="acme"))
    assert [a.alert_id for a in first.alerts] == expected
    assert first.next_page_token == ""
    opened = [a.opened_at.ToMilliseconds() for a in first.alerts]
    assert opened == sorted(opened, reverse=True)
    # Operators listing every merchant see globex's too.
    assert "OTHER:RETURNED:1" in await list_all(rig, merchant_id="")


async def test_list_alerts_filters_by_rule_team_and_state(rig: Rig) -> None:
    expected = await open_some(rig)
    returned = [i for i in expected if ":RETURNED:" in i]
    address = [i for i in expected if ":ADDRESS_PROBLEM:" in i]
    assert await list_all(rig, merchant_id="acme", kinds=[A.ALERT_KIND_RETURNED]) == returned
    assert await list_all(rig, merchant_id="acme", team=A.TEAM_ECOMMERCE) == returned
    assert await list_all(rig, merchant_id="acme", team=A.TEAM_CUSTOMER_SERVICE) == address
    assert await list_all(rig, merchant_id="acme", team=A.TEAM_LOGISTICS) == []
    both = await list_all(
        rig, merchant_id="acme", kinds=[A.ALERT_KIND_RETURNED, A.ALERT_KIND_ADDRESS_PROBLEM]
    )
    assert both == expected

    ack = await rig.stub.AcknowledgeAlert(
        A.AcknowledgeAlertRequest(alert_id=address[0], acknowledged_by="agent-7")
    )
    assert ack.alert.state == A.ALERT_STATE_ACKNOWLEDGED
    assert ack.alert.acknowledged_by == "agent-7"
    again = await rig.stub.AcknowledgeAlert(
        A.AcknowledgeAlertRequest(alert_id=address[0], acknowledged_by="agent-8")
    )
    assert again.alert == ack.alert
    assert await list_all(rig, merchant_id="acme", state=A.ALERT_STATE_ACKNOWLEDGED) == [address[0]]
    assert await list_all(rig, merchant_id="acme", state=A.ALERT_STATE_OPEN) == [
        i for i in expected if i != address[0]
    ]

    # R1 comes back: its alert resolves and moves to the resolved list.
    rig.clock.advance_ms(60_000)
    await rig.monitor.check([parcel("R1", S.TRACKING_STATUS_DELIVERED)])
    assert await list_all(rig, merchant_id="acme", state=A.ALERT_STATE_RESOLVED) == ["R1:RETURNED:1"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (A.ListAlertsRequest(merchant_id="acme", page_size=501), "page_size"),
        (A.ListAlertsRequest(merchant_id="acme", page_token="not-a-token"), "page_token"),
        (A.ListAlertsRequest(merchant_id="acme", kinds=[A.ALERT_KIND_UNSPECIFIED]), "kinds"),
        (A.ListAlertsRequest(merchant_id="acme", kinds=[42]), "kinds"),  # type: ignore[list-item]
        (A.ListAlertsRequest(merchant_id="acme", state=9), "state"),  # type: ignore[arg-type]
    ],
)
async def test_list_alerts_rejects_bad_input(rig: Rig, request_: A.ListAlertsRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.stub.ListAlerts(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field + ":")


async def test_acknowledge_rejects_bad_input_and_unknown_alerts(rig: Rig) -> None:
    await open_some(rig)
    cases = [
        (A.AcknowledgeAlertRequest(acknowledged_by="a"), grpc.StatusCode.INVALID_ARGUMENT, "alert_id"),
        (
            A.AcknowledgeAlertRequest(alert_id="R1:RETURNED:1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "acknowledged_by",
        ),
        (
            A.AcknowledgeAlertRequest(alert_id="R1:RETURNED:1", acknowledged_by="x" * 129),
            grpc.StatusCode.INVALID_ARGUMENT,
            "acknowledged_by",
        ),
        (
            A.AcknowledgeAlertRequest(alert_id="R1:RETURNED:2", acknowledged_by="a"),
            grpc.StatusCode.NOT_FOUND,
            "alert_id",
        ),
        (
            A.AcknowledgeAlertRequest(alert_id="nonsense", acknowledged_by="a"),
            grpc.StatusCode.NOT_FOUND,
            "alert_id",
        ),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.stub.AcknowledgeAlert(request)
        assert (err.value.code(), (err.value.details() or "").split(":")[0]) == (code, field)


async def test_get_stats_adds_up_the_days(rig: Rig) -> None:
    await open_some(rig)
    # Drive the counter hooks the engine and gateway call, as they would in their pipelines.
    async with rig.redis.pipeline(transaction=True) as pipe:
        stats.add_to_pipeline(pipe, stats.shipped(1, "acme", T0_MS))
        stats.add_to_pipeline(pipe, stats.shipped(2, "acme", T0_MS))
        stats.add_to_pipeline(pipe, stats.delivered(1, "acme", T0_MS + DAY_MS, None))
        stats.add_to_pipeline(pipe, stats.exception(3, "acme", T0_MS, S.EXCEPTION_REASON_DAMAGED))
        cost = S.Money(currency_code="EUR", amount_minor=16)
        sent = stats.notice_sent(
            0, "acme", T0_MS, S.NOTICE_KIND_SHIPPED, S.CHANNEL_SMS, sms_segments=2, sms_cost=cost
        )
        stats.add_to_pipeline(pipe, sent)
        stats.add_to_pipeline(pipe, stats.shipped(0, "globex", T0_MS))
        await pipe.execute()
    first = S.LocalDate(year=2026, month=3, day=10)
    reply = await rig.stub.GetStats(
        A.GetStatsRequest(
            merchant_id="acme", from_date=first, to_date=S.LocalDate(year=2026, month=3, day=11)
        )
    )
    day1, day2 = reply.days
    assert (day1.date, day1.merchant_id, day1.parcels_shipped, day1.parcels_delivered) == (
        first,
        "acme",
        2,
        0,
    )
    assert [(c.label, c.count) for c in day1.alerts_opened] == [("ADDRESS_PROBLEM", 3), ("RETURNED", 4)]
    assert [(c.label, c.count) for c in day1.exceptions_by_reason] == [("DAMAGED", 1)]
    assert [(c.label, c.count) for c in day1.notices_sent] == [("SHIPPED/sms", 1)]
    assert (day1.sms_segments, day1.sms_cost.currency_code, day1.sms_cost.amount_minor) == (2, "EUR", 16)
    assert (day2.parcels_delivered, day2.parcels_shipped) == (1, 0)
    everyone = await rig.stub.GetStats(A.GetStatsRequest(from_date=first))
    assert [(d.merchant_id, d.parcels_shipped) for d in everyone.days] == [("", 3)]
    assert sum(c.count for c in everyone.days[0].alerts_opened) == 8


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (A.GetStatsRequest(merchant_id="acme"), "from_date"),
        (A.GetStatsRequest(from_date=S.LocalDate(year=2026, month=2, day=30)), "from_date"),
        (
            A.GetStatsRequest(
                from_date=S.LocalDate(year=2026, month=3, day=2),
                to_date=S.LocalDate(year=2026, month=3, day=1),
            ),
            "to_date",
        ),
        (
            A.GetStatsRequest(
                from_date=S.LocalDate(year=2026, month=1, day=1),
                to_date=S.LocalDate(year=2026, month=6, day=1),
            ),
            "to_date",
        ),
    ],
)
async def test_get_stats_rejects_bad_dates(rig: Rig, request_: A.GetStatsRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.stub.GetStats(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field + ":")
