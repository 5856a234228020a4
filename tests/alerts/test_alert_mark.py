"""The alert mark: an update whose verdict is settled costs the alert store nothing, a timer that fires
early only re-arms the next one, and a verdict that changes is written."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from relais.v1 import state_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.counters import day_of
from common.settings import Settings
from engine.alert_monitor import make_mark, settled
from engine.alert_rules import ParcelFacts
from engine.alert_store import F_ALERT_MARK, check_member
from engine.app import build_engine
from tests.alerts.support import engine_with_timers, register_p1, scan
from tests.conftest import T0_MS

S = types_pb2
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
SETTINGS = Settings(listen="127.0.0.1:0", shards=4)


def test_settled_needs_the_same_outcome_and_a_timer_no_later_than_needed() -> None:
    mark = make_mark(T0_MS + DAY_MS, "abcd0123")
    assert settled(mark, "abcd0123", T0_MS + DAY_MS, T0_MS)
    # Needed later: the recorded timer fires early, re-evaluates and arms the next one.
    assert settled(mark, "abcd0123", T0_MS + 2 * DAY_MS, T0_MS)
    assert settled(mark, "abcd0123", 0, T0_MS)
    # Needed earlier, already past, or another outcome: written.
    assert not settled(mark, "abcd0123", T0_MS + HOUR_MS, T0_MS)
    assert not settled(mark, "abcd0123", T0_MS + 2 * DAY_MS, T0_MS + DAY_MS)
    assert not settled(mark, "ffff0000", T0_MS + DAY_MS, T0_MS)
    assert not settled("", "abcd0123", 0, T0_MS)


async def test_unchanged_verdicts_skip_the_alert_store(redis: Redis, clock: ManualClock) -> None:
    engine, dispatcher = engine_with_timers(SETTINGS, redis, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    alerts_key, parcel_key, due_key = keys.alerts(shard, "P1"), keys.parcel(shard, "P1"), keys.due(shard)
    await register_p1(engine, clock)
    assert (await redis.hget(parcel_key, F_ALERT_MARK) or b"").startswith(b"%d:" % (T0_MS + 48 * HOUR_MS))  # type: ignore[misc]

    # The first scan changes no verdict (counting it as shipped is the parcel's own write) and needs
    # the check later: the alert store is not touched, the never-scanned timer fires early.
    version = await redis.hget(alerts_key, "v")  # type: ignore[misc]
    registered_check_ms = T0_MS + 48 * HOUR_MS
    clock.set_ms(T0_MS + HOUR_MS)
    await engine.ingestor.apply(scan("e1", S.TRACKING_STATUS_IN_TRANSIT, T0_MS + HOUR_MS))
    assert await redis.hget(alerts_key, "v") == version  # type: ignore[misc]
    assert await redis.zscore(due_key, check_member("P1")) == registered_check_ms
    assert await redis.hget(parcel_key, "ct") == b"ship"  # type: ignore[misc]

    # A later scan: the same.
    clock.set_ms(T0_MS + 5 * HOUR_MS)
    await engine.ingestor.apply(scan("e2", S.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + 5 * HOUR_MS))
    assert await redis.hget(alerts_key, "v") == version  # type: ignore[misc]
    assert await redis.zscore(due_key, check_member("P1")) == registered_check_ms

    # The early check opens nothing and arms the one needed now.
    clock.set_ms(registered_check_ms)
    await dispatcher.claim_once()
    assert await redis.hget(alerts_key, "v") != version  # type: ignore[misc]
    assert await redis.zscore(due_key, check_member("P1")) == T0_MS + 5 * HOUR_MS + 3 * DAY_MS
    assert [f for f in await redis.hkeys(alerts_key) if f.startswith(b"P1:")] == []  # type: ignore[misc]

    # Delivered: counted by the parcel's own write, once.
    clock.set_ms(registered_check_ms + HOUR_MS)
    delivered = scan("e3", S.TRACKING_STATUS_DELIVERED, registered_check_ms + HOUR_MS)
    await engine.ingestor.apply(delivered)
    await engine.ingestor.apply(delivered)
    assert await redis.hget(parcel_key, "ct") == b"dlv ship"  # type: ignore[misc]
    day = keys.stats(shard, "acme", day_of(registered_check_ms + HOUR_MS))
    assert await redis.hget(day, "delivered") == b"1"  # type: ignore[misc]


@dataclass
class Read:
    """A parcel as an update read it (``engine.state.ParcelRecord``'s fields the hook uses)."""

    state: state_pb2.ParcelState
    alert_mark: str
    facts: ParcelFacts | None = None  # the hook reads them off the state then

    @property
    def parcel_id(self) -> str:
        return self.state.parcel_id


async def test_a_mark_read_before_the_previous_hook_wrote_is_taken_as_written(
    redis: Redis, clock: ManualClock
) -> None:
    engine = build_engine(SETTINGS, redis, clock)
    shard = keys.shard_of("P1", SETTINGS.shards)
    alerts_key, parcel_key = keys.alerts(shard, "P1"), keys.parcel(shard, "P1")
    await register_p1(engine, clock)
    before_scan = ((await redis.hget(parcel_key, F_ALERT_MARK)) or b"").decode()  # type: ignore[misc]
    clock.set_ms(T0_MS + HOUR_MS)
    await engine.ingestor.apply(scan("e1", S.TRACKING_STATUS_IN_TRANSIT, T0_MS + HOUR_MS))
    version = await redis.hget(alerts_key, "v")  # type: ignore[misc]

    # The next update of P1 read its mark while the scan's hook was still writing: it holds the old
    # mark, yet its verdict is the one the scan's hook wrote, so nothing is written again.
    (record,) = (await engine.store.read(["P1"])).values()
    later = tracking_pb2.TrackingEvent(event_id="e2", carrier="swisspost")
    later.status = S.TRACKING_STATUS_OUT_FOR_DELIVERY
    later.occurred_at.FromMilliseconds(T0_MS + 2 * HOUR_MS)
    record.state.timeline.add(event=later)
    record.state.status = later.status
    clock.set_ms(T0_MS + 2 * HOUR_MS)
    await engine.alerts.on_states([Read(record.state, before_scan)])
    assert await redis.hget(alerts_key, "v") == version  # type: ignore[misc]
