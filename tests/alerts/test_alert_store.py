"""Alerts against a real Redis with a controlled clock: each rule opens at its threshold and not
before, resolves when the parcel moves on, is never opened twice; acknowledging; timers; counters."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date

import pytest
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from engine import stats
from engine.alert_monitor import AlertMonitor
from engine.alert_rules import DAY_MS, HOUR_MS, AlertConfig, AlertKind, ParcelFacts, day_end_ms
from engine.alert_store import AlertStore, check_member
from tests.alerts.support import parcel_facts as in_transit
from tests.conftest import T0_MS

S = types_pb2
A = alerts_pb2
SHARDS = 4
RETENTION_MS = 30 * DAY_MS


@pytest.fixture
def store(redis: Redis) -> AlertStore:
    return AlertStore(redis, shards=SHARDS, retention_ms=RETENTION_MS)


@pytest.fixture
def monitor(store: AlertStore, clock: ManualClock) -> AlertMonitor:
    return AlertMonitor(store, AlertConfig(), clock)


# (rule, facts while in trouble, when it fires, facts once the parcel moved on)
PROMISED = date(2026, 3, 11)
CASES = [
    (
        A.ALERT_KIND_NEVER_SCANNED,
        in_transit(status=S.TRACKING_STATUS_INFO_RECEIVED, first_scan_ms=None),
        T0_MS + 48 * HOUR_MS,
        in_transit(first_scan_ms=T0_MS + 49 * HOUR_MS, last_event_ms=T0_MS + 49 * HOUR_MS),
    ),
    (
        A.ALERT_KIND_NO_MOVEMENT,
        in_transit(),
        T0_MS + 3 * DAY_MS,
        in_transit(last_event_ms=T0_MS + 3 * DAY_MS + 1),
    ),
    (
        A.ALERT_KIND_ADDRESS_PROBLEM,
        in_transit(
            status=S.TRACKING_STATUS_ATTEMPT_FAIL, exception_reason=S.EXCEPTION_REASON_ADDRESS_PROBLEM
        ),
        T0_MS,
        in_transit(status=S.TRACKING_STATUS_OUT_FOR_DELIVERY, last_event_ms=T0_MS + HOUR_MS),
    ),
    (
        A.ALERT_KIND_WAITING_AT_PICKUP,
        in_transit(
            status=S.TRACKING_STATUS_AVAILABLE_FOR_PICKUP,
            pickup_since_ms=T0_MS,
            pickup_deadline_ms=T0_MS + 9 * DAY_MS,
        ),
        T0_MS + 5 * DAY_MS,
        in_transit(status=S.TRACKING_STATUS_DELIVERED, last_event_ms=T0_MS + 5 * DAY_MS),
    ),
    (
        A.ALERT_KIND_RETURNED,
        in_transit(status=S.TRACKING_STATUS_RETURNING_TO_SENDER),
        T0_MS,
        in_transit(status=S.TRACKING_STATUS_DELIVERED, last_event_ms=T0_MS + HOUR_MS),
    ),
    (
        A.ALERT_KIND_LATE,
        in_transit(promised_date=PROMISED, last_event_ms=T0_MS + 30 * HOUR_MS),
        day_end_ms(PROMISED),
        in_transit(
            status=S.TRACKING_STATUS_DELIVERED, promised_date=PROMISED, last_event_ms=day_end_ms(PROMISED)
        ),
    ),
]


async def counters(redis: Redis, parcel_id: str, merchant_id: str, at_ms: int) -> dict[str, int]:
    key = keys.stats(keys.shard_of(parcel_id, SHARDS), merchant_id, stats.day_of(at_ms))
    raw = await redis.hgetall(key)  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.parametrize(("kind", "trouble", "fires_ms", "moved"), CASES, ids=[str(c[0]) for c in CASES])
async def test_rule_opens_at_threshold_once_and_resolves_when_parcel_moves(
    redis: Redis,
    store: AlertStore,
    monitor: AlertMonitor,
    clock: ManualClock,
    kind: AlertKind,
    trouble: ParcelFacts,
    fires_ms: int,
    moved: ParcelFacts,
) -> None:
    name = A.AlertKind.Name(kind).removeprefix("ALERT_KIND_")
    if fires_ms > T0_MS:
        clock.set_ms(fires_ms - 1)
        changes = await monitor.check([trouble])
        assert changes["PX1"].opened == []
        assert (await store.open_alerts(["PX1"]))["PX1"] == []
        # The check timer waits for the threshold in the shard's due set.
        score = await redis.zscore(keys.due(keys.shard_of("PX1", SHARDS)), check_member("PX1"))
        assert score == fires_ms

    clock.set_ms(fires_ms)
    opened = (await monitor.check([trouble]))["PX1"].opened
    assert [(a.alert_id, a.kind, a.state, a.team) for a in opened] == [
        (f"PX1:{name}:1", kind, A.ALERT_STATE_OPEN, opened[0].team)
    ]
    assert opened[0].opened_at.ToMilliseconds() == fires_ms
    assert opened[0].merchant_id == "acme"
    assert opened[0].summary

    # Checked again, later: still exactly one alert.
    clock.advance_ms(HOUR_MS)
    again = await monitor.check([trouble])
    assert again.get("PX1") is None or again["PX1"].opened == []
    live = (await store.open_alerts(["PX1"]))["PX1"]
    assert [a.alert_id for a in live] == [f"PX1:{name}:1"]

    resolved = (await monitor.check([moved]))["PX1"].resolved
    assert [(a.alert_id, a.state) for a in resolved] == [(f"PX1:{name}:1", A.ALERT_STATE_RESOLVED)]
    assert resolved[0].resolved_at.ToMilliseconds() == fires_ms + HOUR_MS
    assert (await store.open_alerts(["PX1"]))["PX1"] == []

    day = await counters(redis, "PX1", "acme", fires_ms)
    assert day.get(f"al_open:{name}") == 1
    later = await counters(redis, "PX1", "acme", fires_ms + HOUR_MS)
    assert later.get(f"al_res:{name}") == 1
    assert await redis.xlen(keys.alert_feed(keys.shard_of("PX1", SHARDS))) == 1


async def test_trouble_after_resolution_opens_a_new_occurrence(
    monitor: AlertMonitor, clock: ManualClock
) -> None:
    clock.set_ms(T0_MS + 3 * DAY_MS)
    assert (await monitor.check([in_transit()]))["PX1"].opened[0].alert_id == "PX1:NO_MOVEMENT:1"
    moved = in_transit(last_event_ms=T0_MS + 3 * DAY_MS)
    assert len((await monitor.check([moved]))["PX1"].resolved) == 1
    clock.set_ms(T0_MS + 6 * DAY_MS)
    assert (await monitor.check([moved]))["PX1"].opened[0].alert_id == "PX1:NO_MOVEMENT:2"


async def test_concurrent_checks_open_one_alert(store: AlertStore, monitor: AlertMonitor) -> None:
    trouble = in_transit(status=S.TRACKING_STATUS_RETURNED_TO_SENDER)
    results = await asyncio.gather(*(monitor.check([trouble]) for _ in range(8)))
    assert sum(len(r["PX1"].opened) for r in results if "PX1" in r) == 1
    assert len((await store.open_alerts(["PX1"]))["PX1"]) == 1


async def test_a_batch_checks_many_parcels_across_shards(store: AlertStore, monitor: AlertMonitor) -> None:
    batch = [in_transit(f"P{i}", status=S.TRACKING_STATUS_RETURNING_TO_SENDER) for i in range(40)]
    batch += [in_transit(f"Q{i}") for i in range(10)]
    changes = await monitor.check(batch)
    assert sum(len(c.opened) for c in changes.values()) == 40
    live = await store.open_alerts([f.parcel_id for f in batch])
    assert {pid for pid, alerts in live.items() if alerts} == {f"P{i}" for i in range(40)}


async def test_parcels_without_merchant_are_not_alerted(monitor: AlertMonitor) -> None:
    orphan = in_transit(merchant_id="", status=S.TRACKING_STATUS_RETURNING_TO_SENDER)
    assert await monitor.check([orphan]) == {}


async def test_timer_rereads_the_parcel_and_opens(
    redis: Redis, store: AlertStore, clock: ManualClock
) -> None:
    current = {"PX1": in_transit()}

    async def load(shard: int, parcel_ids: Sequence[str]) -> Mapping[str, ParcelFacts]:
        assert shard == keys.shard_of("PX1", SHARDS)
        return {pid: current[pid] for pid in parcel_ids if pid in current}

    monitor = AlertMonitor(store, AlertConfig(), clock, load)
    await monitor.check([current["PX1"]])
    due_key = keys.due(keys.shard_of("PX1", SHARDS))
    assert await redis.zscore(due_key, check_member("PX1")) == T0_MS + 3 * DAY_MS
    # The scheduler claims the timer (removes it) and calls the handler.
    await redis.zrem(due_key, check_member("PX1"))
    clock.set_ms(T0_MS + 3 * DAY_MS)
    await monitor.on_timer(keys.shard_of("PX1", SHARDS), "PX1", "ALERTS")
    assert [a.kind for a in (await store.open_alerts(["PX1"]))["PX1"]] == [A.ALERT_KIND_NO_MOVEMENT]
    # Nothing left to wait for: no timer.
    assert await redis.zscore(due_key, check_member("PX1")) is None
    # A parcel that is gone is ignored.
    await monitor.on_timer(0, "UNKNOWN", "ALERTS")


async def test_acknowledge_then_resolve(
    redis: Redis, store: AlertStore, monitor: AlertMonitor, clock: ManualClock
) -> None:
    trouble = in_transit(
        status=S.TRACKING_STATUS_EXCEPTION, exception_reason=S.EXCEPTION_REASON_ADDRESS_PROBLEM
    )
    await monitor.check([trouble])
    clock.advance_ms(10 * 60_000)
    acked = await store.acknowledge("PX1:ADDRESS_PROBLEM:1", "agent-7", clock.now_ms())
    assert acked is not None
    assert acked.state == A.ALERT_STATE_ACKNOWLEDGED
    assert acked.acknowledged_by == "agent-7"
    assert acked.acknowledged_at.ToMilliseconds() == T0_MS + 10 * 60_000
    # Twice is harmless: the first acknowledgement stands.
    clock.advance_ms(60_000)
    again = await store.acknowledge("PX1:ADDRESS_PROBLEM:1", "agent-8", clock.now_ms())
    assert again == acked
    # Still shown by GetParcel, and not reopened by the rule that still fires.
    changes = await monitor.check([trouble])
    assert "PX1" not in changes or changes["PX1"].opened == []
    assert [a.state for a in (await store.open_alerts(["PX1"]))["PX1"]] == [A.ALERT_STATE_ACKNOWLEDGED]
    # The parcel moves on: the acknowledged alert resolves and leaves the acknowledged index.
    await monitor.check([in_transit(last_event_ms=T0_MS + HOUR_MS)])
    assert (await store.open_alerts(["PX1"]))["PX1"] == []
    shard = keys.shard_of("PX1", SHARDS)
    assert await redis.zcard(keys.alert_index(shard, "acme", "ADDRESS_PROBLEM", "ACKNOWLEDGED")) == 0
    assert await redis.zcard(keys.alert_index(shard, "acme", "ADDRESS_PROBLEM", "RESOLVED")) == 1
    assert await store.acknowledge("PX1:ADDRESS_PROBLEM:9", "agent-7", clock.now_ms()) is None
    assert await store.acknowledge("garbage", "agent-7", clock.now_ms()) is None


async def test_resolved_alerts_leave_the_index_after_retention(
    redis: Redis, store: AlertStore, monitor: AlertMonitor, clock: ManualClock
) -> None:
    returned = in_transit("OLD", status=S.TRACKING_STATUS_RETURNED_TO_SENDER)
    await monitor.check([returned])
    await monitor.check([replace(returned, status=S.TRACKING_STATUS_DELIVERED)])
    clock.advance_ms(RETENTION_MS + DAY_MS)
    # OLD4 shares OLD's shard: resolving it trims that shard's resolved index.
    assert keys.shard_of("OLD", SHARDS) == keys.shard_of("OLD4", SHARDS)
    newer = in_transit("OLD4", status=S.TRACKING_STATUS_RETURNED_TO_SENDER)
    await monitor.check([newer])
    await monitor.check([replace(newer, status=S.TRACKING_STATUS_DELIVERED)])
    alerts, _ = await store.page("acme", states=[A.ALERT_STATE_RESOLVED])
    assert [a.alert_id for a in alerts] == ["OLD4:RETURNED:1"]
