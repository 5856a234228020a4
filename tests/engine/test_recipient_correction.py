"""A corrected recipient is planned for with their own preferences: what the first recipient muted comes
back for them while it still makes sense (as when a recipient unmutes a kind), and what they muted is
not scheduled for them. Registration and ingest against the real Redis fixture."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, tracking_pb2, types_pb2

from common.clock import ManualClock
from engine.planner import end_of_day_ms
from engine.state import DAY_MS
from tests.conftest import T0_MS
from tests.engine.core_support import (
    HOUR_MS,
    MIN_MS,
    claim,
    due_members,
    engine_for,
    event,
    put_preferences,
    registration,
)
from tests.engine.test_ingest import batch, register, state_of

T = types_pb2
ALL_KINDS = [kind for kind in T.NoticeKind.values() if kind]
PROMISED = T.LocalDate(year=2026, month=3, day=12)
SLOT = (T0_MS + DAY_MS, T0_MS + DAY_MS + 2 * HOUR_MS)
DEADLINE_MS = T0_MS + 5 * DAY_MS
# The corrected recipient's quiet hours, 00:00-11:00 in Zurich: until 10:00 UTC, an hour after T0.
ZURICH_QUIET = preferences_pb2.QuietHours(start_minute=0, end_minute=11 * 60)
AFTER_QUIET_MS = T0_MS + HOUR_MS
LATE_MS = end_of_day_ms(PROMISED, "Europe/Zurich") + 11 * HOUR_MS  # midnight there, then quiet

SITUATIONS: dict[str, tuple[tracking_pb2.TrackingEvent, dict[str, int]]] = {
    "in transit": (event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS), {"DELAYED": LATE_MS}),
    "slot": (
        event("e1", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS, slot=SLOT),
        {"SLOT_ANNOUNCED": AFTER_QUIET_MS, "DELAYED": LATE_MS},
    ),
    "failed attempt": (
        event("e1", "P1", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS, reason=T.EXCEPTION_REASON_RECIPIENT_ABSENT),
        {"ATTEMPT_FAILED": AFTER_QUIET_MS, "DELAYED": LATE_MS},
    ),
    "address problem": (
        event("e1", "P1", T.TRACKING_STATUS_EXCEPTION, T0_MS, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM),
        {"EXCEPTION": AFTER_QUIET_MS, "DELAYED": LATE_MS},
    ),
    "at a pickup point": (
        event("e1", "P1", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("PP1", DEADLINE_MS)),
        # The reminder, a day before the deadline (09:00 UTC), waits for the end of the quiet hours.
        {"AVAILABLE_FOR_PICKUP": AFTER_QUIET_MS, "PICKUP_REMINDER": DEADLINE_MS - DAY_MS + HOUR_MS},
    ),
}


def promised(recipient_id: str) -> parcel_pb2.ParcelRegistration:
    reg = registration("P1", recipient_id=recipient_id)
    reg.order.promised_date.CopyFrom(PROMISED)
    return reg


@pytest.mark.parametrize("situation", list(SITUATIONS))
async def test_what_the_first_recipient_muted_comes_back_for_the_corrected_one(
    redis: Redis, clock: ManualClock, situation: str
) -> None:
    """SHIPPED does not: news of a moment, as when a recipient unmutes it."""
    scan, expected = SITUATIONS[situation]
    engine = engine_for(redis, clock)
    await put_preferences(
        redis, preferences_pb2.RecipientPreferences(recipient_id="acme/r1", muted_kinds=ALL_KINDS)
    )
    await put_preferences(
        redis,
        preferences_pb2.RecipientPreferences(
            recipient_id="acme/r2", time_zone="Europe/Zurich", quiet_hours=ZURICH_QUIET
        ),
    )
    await register(engine, promised("acme/r1"))
    await engine.ingestor.apply(batch(1, scan))
    assert await due_members(redis, "P1") == {}
    clock.advance_ms(MIN_MS)

    await register(engine, promised("acme/r2"))

    assert await due_members(redis, "P1") == {f"P1:{kind}": due_ms for kind, due_ms in expected.items()}


@pytest.mark.parametrize("situation", list(SITUATIONS))
async def test_what_the_corrected_recipient_muted_is_not_scheduled_for_them(
    redis: Redis, clock: ManualClock, situation: str
) -> None:
    """Neither what was pending for the first recipient nor what is told again (what they were told
    of a situation that still holds): both suppressed as muted."""
    scan, _expected = SITUATIONS[situation]
    engine = engine_for(redis, clock)
    await put_preferences(
        redis, preferences_pb2.RecipientPreferences(recipient_id="acme/r2", muted_kinds=ALL_KINDS)
    )
    await register(engine, promised("acme/r1"))
    await engine.ingestor.apply(batch(1, scan))
    due = await due_members(redis, "P1")
    assert due
    # The ones due now went out to acme/r1; the others are still pending.
    for member, due_ms in due.items():
        if due_ms <= clock.now_ms():
            await claim(redis, "P1", member.split(":", 1)[1])
    clock.advance_ms(MIN_MS)

    await register(engine, promised("acme/r2"))

    assert await due_members(redis, "P1") == {}
    state = await state_of(redis, "P1")
    for member in due:
        kind = T.NoticeKind.Value("NOTICE_KIND_" + member.split(":", 1)[1])
        (mark,) = [m for m in state.notices if m.kind == kind]
        if kind != T.NOTICE_KIND_SHIPPED:  # went out to acme/r1, and is not told again
            assert mark.status == notice_pb2.NOTICE_STATUS_SUPPRESSED, member
