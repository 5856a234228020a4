"""The notice rules as pure functions: no Redis, a simulated due set and a simulated scheduler."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from relais.v1 import notice_pb2, preferences_pb2, state_pb2, tracking_pb2, types_pb2

from common.keys import kind_name
from common.slots import window_ms, within_threshold
from engine.planner import (
    REASON_AT_PICKUP,
    REASON_MUTED,
    REASON_NO_PROMISE,
    REASON_UNPAID,
    REASON_WITHIN,
    Audience,
    Plan,
    PlanRules,
    end_of_day_ms,
    plan,
)
from engine.state import apply_event
from tests.conftest import T0_MS
from tests.engine.core_support import HOUR_MS, MIN_MS, event, window

T = types_pb2
N = notice_pb2
DAY_MS = 24 * HOUR_MS
SLOT = (T0_MS + DAY_MS, T0_MS + DAY_MS + 2 * HOUR_MS)  # tomorrow 09:00-11:00 UTC


DEFAULT_RULES = PlanRules()


SLOT_KINDS = (T.NOTICE_KIND_SLOT_ANNOUNCED, T.NOTICE_KIND_SLOT_CORRECTED)


class Sim:
    """A parcel, its due set and a scheduler that sends when told to."""

    def __init__(
        self, *, paid: bool = True, audience: Audience | None = None, rules: PlanRules = DEFAULT_RULES
    ):
        self.state = state_pb2.ParcelState(parcel_id="P1", merchant_id="acme", recipient_id="acme/r1")
        self.state.registered = True
        self.state.order.paid = paid
        self.audience = audience
        self.rules = rules
        self.now_ms = T0_MS
        self.pending: dict[str, notice_pb2.Notice] = {}
        self.sent: list[notice_pb2.Notice] = []
        self.seen: set[str] = set()
        self.n = 0

    def apply(self, *events: tracking_pb2.TrackingEvent, refresh: bool = False) -> Plan:
        for e in events:
            apply_event(self.state, e, self.now_ms, self.seen)
        result = plan(
            self.state, frozenset(self.pending), self.audience, self.now_ms, self.rules, refresh=refresh
        )
        for kind in result.withdrawn:
            self.pending.pop(kind_name(kind), None)
        for kind, notice in result.scheduled.items():
            self.pending[kind_name(kind)] = notice
        return result

    def scan(self, status: T.TrackingStatus.ValueType = T.TRACKING_STATUS_IN_TRANSIT, **kw: object) -> Plan:
        self.n += 1
        return self.apply(event(f"e{self.n}", "P1", status, self.now_ms, **kw))  # type: ignore[arg-type]

    def send_all(self) -> None:
        for notice in sorted(self.pending.values(), key=lambda n: n.due_at.ToMilliseconds()):
            self.sent.append(notice)
            if notice.kind in SLOT_KINDS and notice.version > self.state.told_version:
                # What the gateway records sending it, and the engine reads before planning.
                self.state.told_slot.CopyFrom(notice.slot)
                self.state.told_version = notice.version
        self.pending.clear()

    def hand_over(self) -> None:
        """The scheduler claims what is pending; the gateway has not sent it (yet)."""
        self.pending.clear()

    def mark(self, kind: T.NoticeKind.ValueType) -> state_pb2.NoticeMark:
        return next(m for m in self.state.notices if m.kind == kind)


def test_first_scan_plans_shipped_once() -> None:
    sim = Sim()
    first = sim.scan()
    assert list(first.scheduled) == [T.NOTICE_KIND_SHIPPED]
    notice = first.scheduled[T.NOTICE_KIND_SHIPPED]
    assert notice.notice_id == "P1:SHIPPED"
    assert notice.version == 1
    assert notice.due_at.ToMilliseconds() == T0_MS
    assert notice.actionable
    assert notice.recipient_id == "acme/r1"
    assert not sim.scan().scheduled


def test_nothing_is_planned_before_the_recipient_is_known() -> None:
    sim = Sim()
    sim.state.recipient_id = ""
    assert not sim.scan(slot=SLOT).scheduled
    assert not sim.state.notices


def test_slot_moved_before_send_replaces_the_pending_notice() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    moved = (SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS)
    result = sim.scan(slot=moved)
    notice = result.scheduled[T.NOTICE_KIND_SLOT_ANNOUNCED]
    assert notice.notice_id == "P1:SLOT_ANNOUNCED"
    assert notice.version == 2
    assert window_ms(notice.slot) == moved
    assert notice.deadline.ToMilliseconds() == moved[0]
    assert T.NOTICE_KIND_SLOT_ANNOUNCED in result.checked  # replaced only if still pending
    assert T.NOTICE_KIND_SLOT_CORRECTED not in result.scheduled


def test_slot_moved_after_send_plans_one_debounced_correction() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    sim.send_all()
    moved = (SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS)
    correction = sim.scan(slot=moved).scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    assert window_ms(correction.slot) == moved
    assert window_ms(correction.previous_slot) == SLOT
    assert correction.version == 2
    assert correction.due_at.ToMilliseconds() == T0_MS + PlanRules().debounce_ms
    # A further change within the debounce replaces it: one correction, the latest slot, due later.
    sim.now_ms += MIN_MS
    again = (SLOT[0] + 5 * HOUR_MS, SLOT[1] + 5 * HOUR_MS)
    replaced = sim.scan(slot=again).scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    assert replaced.notice_id == correction.notice_id
    assert replaced.version == 3
    assert window_ms(replaced.previous_slot) == SLOT
    assert window_ms(replaced.slot) == again
    assert replaced.due_at.ToMilliseconds() == sim.now_ms + PlanRules().debounce_ms


def test_small_shift_or_slot_inside_sends_nothing() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    sim.send_all()
    assert not sim.scan(slot=(SLOT[0] + 15 * MIN_MS, SLOT[1] + 15 * MIN_MS)).scheduled
    assert not sim.scan(slot=(SLOT[0] + 30 * MIN_MS, SLOT[1] - 30 * MIN_MS)).scheduled
    assert sim.scan(slot=(SLOT[0] + 16 * MIN_MS, SLOT[1] + 16 * MIN_MS)).scheduled


def test_pending_correction_withdrawn_when_slot_moves_back() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    sim.send_all()
    sim.scan(slot=(SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS))
    back = sim.scan(slot=(SLOT[0] + 5 * MIN_MS, SLOT[1] + 5 * MIN_MS))
    assert back.withdrawn == {T.NOTICE_KIND_SLOT_CORRECTED: N.NOTICE_STATUS_SUPPRESSED}
    assert sim.mark(T.NOTICE_KIND_SLOT_CORRECTED).status_reason == REASON_WITHIN


def test_slot_back_within_the_threshold_while_a_correction_is_handed_over_plans_one_to_resolve() -> None:
    """The correction handed over may be going out as the slot moves back: withdrawing it would not stop
    it, and the recipient would be left on its slot. Another correction follows, naming the slot sent;
    the gateway resolves it against the slot it sent last (``gateway.worker._resolve_correction``)."""
    sim = Sim()
    sim.scan(slot=SLOT)
    sim.send_all()
    sim.scan(slot=(SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS))
    sim.now_ms += DEFAULT_RULES.debounce_ms
    sim.hand_over()
    back = (SLOT[0] + 5 * MIN_MS, SLOT[1] + 5 * MIN_MS)
    again = sim.scan(slot=back).scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    assert (again.version, window_ms(again.slot), window_ms(again.previous_slot)) == (3, back, SLOT)
    # Nothing in hand (it went out, and was sent): the usual rule, nothing within the threshold.
    sim.send_all()
    assert not sim.scan(slot=(SLOT[0] + 15 * MIN_MS, SLOT[1] + 15 * MIN_MS)).scheduled


def test_announcement_handed_over_is_recalled_once_an_older_one_was_sent() -> None:
    """An announcement replaced while the older one was being sent: once that one is recorded sent, a
    correction of it is what follows, not the replacement (recalled: the gateway drops it)."""
    sim = Sim()
    sim.scan(slot=SLOT)
    sim.hand_over()
    first = T.TimeWindow()
    first.CopyFrom(sim.mark(T.NOTICE_KIND_SLOT_ANNOUNCED).slot)
    moved = (SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS)
    sim.scan(slot=moved)
    sim.hand_over()
    # The first announcement went out meanwhile: what the gateway records, and the engine reads.
    sim.state.told_slot.CopyFrom(first)
    sim.state.told_version = 1
    result = sim.scan(slot=moved)
    assert result.withdrawn == {T.NOTICE_KIND_SLOT_ANNOUNCED: N.NOTICE_STATUS_CANCELLED}
    correction = result.scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    assert (window_ms(correction.slot), window_ms(correction.previous_slot)) == (moved, SLOT)


def test_delivered_cancels_every_pending_notice() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    assert set(sim.pending) == {"SHIPPED", "SLOT_ANNOUNCED"}
    result = sim.scan(T.TRACKING_STATUS_DELIVERED)
    assert result.withdrawn == {
        T.NOTICE_KIND_SHIPPED: N.NOTICE_STATUS_CANCELLED,
        T.NOTICE_KIND_SLOT_ANNOUNCED: N.NOTICE_STATUS_CANCELLED,
    }
    assert set(sim.pending) == {"DELIVERED"}
    # A window arriving late (it happened before the delivery) plans nothing about a slot.
    moved = (SLOT[0] + 5 * HOUR_MS, SLOT[1] + 5 * HOUR_MS)
    late = event("late", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS - HOUR_MS, slot=moved)
    assert not sim.apply(late).scheduled


def test_out_of_order_events_follow_occurred_at() -> None:
    sim = Sim()
    sim.apply(event("late", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS, slot=SLOT))
    older = (SLOT[0] - 5 * HOUR_MS, SLOT[0] - 3 * HOUR_MS)
    sim.apply(event("early", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - HOUR_MS, slot=older))
    assert sim.state.status == T.TRACKING_STATUS_OUT_FOR_DELIVERY
    assert window_ms(sim.state.slot.window) == SLOT
    assert sim.state.slot.version == 1
    assert [e.event.event_id for e in sim.state.timeline] == ["early", "late"]


def test_pickup_reminder_before_deadline_cancelled_by_pickup() -> None:
    sim = Sim()
    deadline_ms = T0_MS + 5 * DAY_MS
    result = sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    reminder = result.scheduled[T.NOTICE_KIND_PICKUP_REMINDER]
    assert reminder.due_at.ToMilliseconds() == deadline_ms - PlanRules().reminder_lead_ms
    assert reminder.deadline.ToMilliseconds() == deadline_ms
    assert reminder.pickup_point.id == "PP1"
    assert result.scheduled[T.NOTICE_KIND_AVAILABLE_FOR_PICKUP].pickup_point.id == "PP1"
    sim.send_all()  # the pickup notice went out; the reminder is pending again below
    sim.pending["PICKUP_REMINDER"] = reminder
    picked = sim.scan(T.TRACKING_STATUS_DELIVERED)
    assert picked.withdrawn == {T.NOTICE_KIND_PICKUP_REMINDER: N.NOTICE_STATUS_CANCELLED}


def test_no_reminder_when_deadline_is_near() -> None:
    sim = Sim()
    result = sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", T0_MS + 3 * HOUR_MS))
    assert T.NOTICE_KIND_PICKUP_REMINDER not in result.scheduled
    assert T.NOTICE_KIND_AVAILABLE_FOR_PICKUP in result.scheduled


def test_unpaid_order_gets_informational_notices_only() -> None:
    sim = Sim(paid=False)
    sim.scan()
    assert not sim.pending["SHIPPED"].actionable
    result = sim.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    assert T.NOTICE_KIND_EXCEPTION not in result.scheduled
    assert sim.mark(T.NOTICE_KIND_EXCEPTION).status == N.NOTICE_STATUS_SUPPRESSED
    assert sim.mark(T.NOTICE_KIND_EXCEPTION).status_reason == REASON_UNPAID


def test_a_merchant_may_allow_links_for_its_unpaid_orders() -> None:
    allowing = PlanRules(unpaid_actionable_merchants=frozenset({"acme"}))
    sim = Sim(paid=False, rules=allowing)
    sim.scan()
    assert sim.pending["SHIPPED"].actionable
    other = Sim(paid=False, rules=PlanRules(unpaid_actionable_merchants=frozenset({"globex"})))
    other.scan()
    assert not other.pending["SHIPPED"].actionable


def test_paid_order_is_asked_to_check_the_address() -> None:
    sim = Sim()
    result = sim.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    notice = result.scheduled[T.NOTICE_KIND_EXCEPTION]
    assert notice.actionable
    assert notice.exception_reason == T.EXCEPTION_REASON_ADDRESS_PROBLEM


def test_the_address_is_asked_once_per_problem_not_per_rescan() -> None:
    """Carriers scan a parcel held for its address again each day: one ask per problem, a new one
    only once the parcel moved on and had the problem again."""
    sim = Sim()
    address = {"reason": T.EXCEPTION_REASON_ADDRESS_PROBLEM}
    assert sim.scan(T.TRACKING_STATUS_EXCEPTION, **address).scheduled[T.NOTICE_KIND_EXCEPTION].version == 1
    sim.send_all()
    for _day in range(3):
        sim.now_ms += DAY_MS
        assert T.NOTICE_KIND_EXCEPTION not in sim.scan(T.TRACKING_STATUS_EXCEPTION, **address).scheduled
    sim.now_ms += DAY_MS
    sim.scan()  # address fixed: on its way again
    sim.now_ms += DAY_MS
    again = sim.scan(T.TRACKING_STATUS_EXCEPTION, **address).scheduled[T.NOTICE_KIND_EXCEPTION]
    assert again.version == 2
    assert [n.kind for n in sim.sent].count(T.NOTICE_KIND_EXCEPTION) == 1


def test_a_delivery_learned_of_days_later_is_not_told() -> None:
    """A parcel registered (or reported) long after it was delivered or returned: stale news, not
    sent; one a few hours late still is."""
    for status, kind in (
        (T.TRACKING_STATUS_DELIVERED, T.NOTICE_KIND_DELIVERED),
        (T.TRACKING_STATUS_RETURNED_TO_SENDER, T.NOTICE_KIND_RETURNED),
    ):
        late = Sim()
        late.apply(event("old", "P1", status, late.now_ms - 3 * DAY_MS))
        assert kind_name(kind) not in late.pending
        recent = Sim()
        recent.apply(event("new", "P1", status, recent.now_ms - 5 * HOUR_MS))
        assert kind_name(kind) in recent.pending


def test_each_failed_attempt_is_a_new_version() -> None:
    sim = Sim()
    assert sim.scan(T.TRACKING_STATUS_ATTEMPT_FAIL).scheduled[T.NOTICE_KIND_ATTEMPT_FAILED].version == 1
    sim.send_all()
    sim.now_ms += HOUR_MS
    assert sim.scan(T.TRACKING_STATUS_ATTEMPT_FAIL).scheduled[T.NOTICE_KIND_ATTEMPT_FAILED].version == 2


def test_muted_kind_is_not_scheduled() -> None:
    sim = Sim(audience=Audience(muted=frozenset({T.NOTICE_KIND_SHIPPED})))
    result = sim.scan(slot=SLOT)
    assert set(result.scheduled) == {T.NOTICE_KIND_SLOT_ANNOUNCED}
    assert sim.mark(T.NOTICE_KIND_SHIPPED).status_reason == REASON_MUTED


def test_refresh_with_new_preferences_withdraws_newly_muted_and_moves_quiet() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    # 22:00-10:00 UTC quiet: T0 is 09:00, so what was due now waits to 10:00, still before the slot.
    sim.audience = Audience(quiet=(22 * 60, 10 * 60), muted=frozenset({T.NOTICE_KIND_SHIPPED}))
    result = sim.apply(refresh=True)
    assert result.withdrawn == {T.NOTICE_KIND_SHIPPED: N.NOTICE_STATUS_SUPPRESSED}
    assert result.scheduled[T.NOTICE_KIND_SLOT_ANNOUNCED].due_at.ToMilliseconds() == T0_MS + HOUR_MS
    assert result.checked == {T.NOTICE_KIND_SHIPPED, T.NOTICE_KIND_SLOT_ANNOUNCED}


def test_quiet_hours_never_hold_a_slot_notice_past_the_slot_start() -> None:
    sim = Sim(audience=Audience(quiet=(8 * 60, 12 * 60)))  # 08:00-12:00 UTC; T0 is 09:00
    slot = (T0_MS + 2 * HOUR_MS, T0_MS + 4 * HOUR_MS)  # 11:00-13:00: quiet ends after it starts
    due_ms = sim.scan(slot=slot).scheduled[T.NOTICE_KIND_SLOT_ANNOUNCED].due_at.ToMilliseconds()
    assert due_ms < slot[0]


def test_delayed_is_due_when_the_promised_date_has_passed() -> None:
    sim = Sim(audience=Audience(time_zone="Europe/Zurich"))
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=11))
    notice = sim.scan().scheduled[T.NOTICE_KIND_DELAYED]
    # Midnight after 11 March in Zurich (UTC+1) is 23:00 UTC on the 11th.
    assert notice.due_at.ToMilliseconds() == end_of_day_ms(notice.promised_date, "Europe/Zurich")
    assert notice.due_at.ToMilliseconds() == T0_MS + DAY_MS + 14 * HOUR_MS
    assert sim.scan(T.TRACKING_STATUS_DELIVERED).withdrawn[T.NOTICE_KIND_DELAYED] == N.NOTICE_STATUS_CANCELLED


def test_removing_the_promised_date_withdraws_delayed_for_that_reason() -> None:
    sim = Sim()
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=11))
    sim.scan()
    sim.state.order.ClearField("promised_date")
    assert sim.apply(refresh=True).withdrawn == {T.NOTICE_KIND_DELAYED: N.NOTICE_STATUS_CANCELLED}
    assert sim.mark(T.NOTICE_KIND_DELAYED).status_reason == REASON_NO_PROMISE

    at_pickup = Sim()
    at_pickup.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=11))
    at_pickup.scan()
    at_pickup.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", T0_MS + 5 * DAY_MS))
    assert at_pickup.mark(T.NOTICE_KIND_DELAYED).status_reason == REASON_AT_PICKUP


def test_refresh_moves_delayed_to_the_end_of_the_promised_day_in_the_new_zone() -> None:
    sim = Sim()  # no preferences yet: UTC
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=12))
    date = sim.state.order.promised_date
    assert sim.scan().scheduled[T.NOTICE_KIND_DELAYED].due_at.ToMilliseconds() == end_of_day_ms(date, "UTC")
    sim.audience = Audience(time_zone="Pacific/Auckland")
    notice = sim.apply(refresh=True).scheduled[T.NOTICE_KIND_DELAYED]
    assert notice.due_at.ToMilliseconds() == end_of_day_ms(date, "Pacific/Auckland")
    assert notice.version == 1  # the same promise, planned again
    # Without a refresh (a carrier event), the moment stays.
    sim.audience = Audience(time_zone="UTC")
    assert T.NOTICE_KIND_DELAYED not in sim.scan().scheduled


def test_unmuted_delayed_comes_back_while_the_parcel_is_late() -> None:
    sim = Sim(audience=Audience(muted=frozenset({T.NOTICE_KIND_DELAYED})))
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=9))  # already passed
    sim.scan()
    assert sim.mark(T.NOTICE_KIND_DELAYED).status == N.NOTICE_STATUS_SUPPRESSED
    sim.audience = Audience(time_zone="Europe/Zurich")
    result = sim.apply(refresh=True)
    notice = result.scheduled[T.NOTICE_KIND_DELAYED]
    assert notice.version == 1
    assert notice.due_at.ToMilliseconds() == sim.now_ms  # it is late now: no reason to wait
    assert result.revived == {T.NOTICE_KIND_DELAYED}
    assert sim.mark(T.NOTICE_KIND_DELAYED).status_reason == ""


def test_unmuted_delayed_stays_suppressed_once_delivered() -> None:
    sim = Sim(audience=Audience(muted=frozenset({T.NOTICE_KIND_DELAYED})))
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=9))
    sim.scan()
    sim.scan(T.TRACKING_STATUS_DELIVERED)
    sim.audience = Audience()
    assert T.NOTICE_KIND_DELAYED not in sim.apply(refresh=True).scheduled
    assert sim.mark(T.NOTICE_KIND_DELAYED).status_reason == REASON_MUTED


def test_news_of_a_moment_is_not_sent_late_when_unmuted() -> None:
    sim = Sim(audience=Audience(muted=frozenset({T.NOTICE_KIND_SHIPPED})))
    sim.scan()
    sim.now_ms += 7 * DAY_MS
    sim.audience = Audience()
    result = sim.apply(refresh=True)
    assert not result.scheduled
    assert sim.mark(T.NOTICE_KIND_SHIPPED).status == N.NOTICE_STATUS_SUPPRESSED


def test_unmuted_pickup_notices_come_back_while_the_deadline_is_ahead() -> None:
    pickup_kinds = frozenset({T.NOTICE_KIND_AVAILABLE_FOR_PICKUP, T.NOTICE_KIND_PICKUP_REMINDER})
    deadline_ms = T0_MS + 5 * DAY_MS
    sim = Sim(audience=Audience(muted=pickup_kinds))
    sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    assert set(sim.pending) == {"SHIPPED"}
    sim.send_all()
    sim.now_ms += DAY_MS
    sim.audience = Audience()
    result = sim.apply(refresh=True)
    assert set(result.scheduled) == pickup_kinds
    assert result.scheduled[T.NOTICE_KIND_AVAILABLE_FOR_PICKUP].due_at.ToMilliseconds() == sim.now_ms
    reminder = result.scheduled[T.NOTICE_KIND_PICKUP_REMINDER]
    assert reminder.due_at.ToMilliseconds() == deadline_ms - PlanRules().reminder_lead_ms
    assert reminder.deadline.ToMilliseconds() == deadline_ms

    late = Sim(audience=Audience(muted=pickup_kinds))
    late.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    late.send_all()
    late.now_ms = deadline_ms
    late.audience = Audience()
    assert not late.apply(refresh=True).scheduled  # the deadline passed: nothing to fetch any more


def test_unmuted_attempt_failed_comes_back_only_while_it_is_the_latest_news() -> None:
    muted = Audience(muted=frozenset({T.NOTICE_KIND_ATTEMPT_FAILED}))
    sim = Sim(audience=muted)
    sim.scan(T.TRACKING_STATUS_ATTEMPT_FAIL)
    sim.audience = Audience()
    assert sim.apply(refresh=True).scheduled[T.NOTICE_KIND_ATTEMPT_FAILED].version == 1

    moved_on = Sim(audience=muted)
    moved_on.scan(T.TRACKING_STATUS_ATTEMPT_FAIL)
    moved_on.scan(T.TRACKING_STATUS_OUT_FOR_DELIVERY)
    moved_on.audience = Audience()
    assert T.NOTICE_KIND_ATTEMPT_FAILED not in moved_on.apply(refresh=True).scheduled


def test_unmuted_address_check_comes_back_for_paid_orders_only() -> None:
    muted = Audience(muted=frozenset({T.NOTICE_KIND_EXCEPTION}))
    for paid in (True, False):
        sim = Sim(paid=paid, audience=muted)
        sim.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
        sim.audience = Audience()
        result = sim.apply(refresh=True)
        assert (T.NOTICE_KIND_EXCEPTION in result.scheduled) is paid
        assert sim.mark(T.NOTICE_KIND_EXCEPTION).status_reason == ("" if paid else REASON_UNPAID)


def test_erase_withdraws_and_plans_nothing_until_preferences_return() -> None:
    sim = Sim()
    sim.scan(slot=SLOT)
    erased = plan(sim.state, frozenset(sim.pending), None, sim.now_ms, sim.rules, erase=True)
    assert set(erased.withdrawn) == {T.NOTICE_KIND_SHIPPED, T.NOTICE_KIND_SLOT_ANNOUNCED}
    sim.pending.clear()
    assert not sim.scan(T.TRACKING_STATUS_ATTEMPT_FAIL).scheduled
    sim.audience = Audience.from_preferences(preferences_pb2.RecipientPreferences(recipient_id="acme/r1"))
    assert T.NOTICE_KIND_SLOT_ANNOUNCED in sim.scan().scheduled


def test_what_the_erasure_cancelled_is_told_once_on_return_while_it_holds() -> None:
    """Erased, then preferences again: a failed attempt or address check the erasure cancelled is
    planned again (next version) while it still holds, once; nothing while still erased; what went
    out before the erasure is not sent twice; what no longer holds stays withdrawn."""
    prefs = Audience.from_preferences(preferences_pb2.RecipientPreferences(recipient_id="acme/r1"))
    address = {"reason": T.EXCEPTION_REASON_ADDRESS_PROBLEM}

    def erase(sim: Sim) -> None:
        plan(sim.state, frozenset(sim.pending), None, sim.now_ms, sim.rules, erase=True)
        sim.pending.clear()
        sim.audience = None

    held = Sim(audience=prefs)
    held.scan(T.TRACKING_STATUS_EXCEPTION, **address)
    assert held.mark(T.NOTICE_KIND_EXCEPTION).status == N.NOTICE_STATUS_SCHEDULED
    erase(held)
    held.now_ms += DAY_MS
    assert not held.scan(T.TRACKING_STATUS_EXCEPTION, **address).scheduled  # still erased
    held.audience = prefs
    back = held.apply(refresh=True).scheduled[T.NOTICE_KIND_EXCEPTION]
    assert back.version == 2
    held.send_all()
    held.now_ms += DAY_MS
    assert not held.scan(T.TRACKING_STATUS_EXCEPTION, **address).scheduled  # once per problem

    told = Sim(audience=prefs)
    told.scan(T.TRACKING_STATUS_ATTEMPT_FAIL, reason=T.EXCEPTION_REASON_RECIPIENT_ABSENT)
    told.send_all()
    told.scan(T.TRACKING_STATUS_ATTEMPT_FAIL, reason=T.EXCEPTION_REASON_RECIPIENT_ABSENT)  # a new attempt
    told.now_ms += HOUR_MS
    erase(told)
    told.audience = prefs
    assert T.NOTICE_KIND_ATTEMPT_FAILED in told.apply(refresh=True).scheduled  # the cancelled one
    told.send_all()
    told.audience = None
    erase(told)
    told.audience = prefs
    assert not told.apply(refresh=True).scheduled  # the one that went out is not sent twice

    moved_on = Sim(audience=prefs)
    moved_on.scan(T.TRACKING_STATUS_ATTEMPT_FAIL, reason=T.EXCEPTION_REASON_RECIPIENT_ABSENT)
    erase(moved_on)
    moved_on.scan(T.TRACKING_STATUS_OUT_FOR_DELIVERY)
    moved_on.audience = prefs
    assert T.NOTICE_KIND_ATTEMPT_FAILED not in moved_on.apply(refresh=True).scheduled


# --- the slot promise, for any sequence of windows and sends ---------------------------------------

_starts = st.lists(st.integers(min_value=0, max_value=48 * 12), min_size=1, max_size=12, unique=True)


@settings(max_examples=150, deadline=None)
@given(starts=_starts, lengths=st.lists(st.integers(1, 16), min_size=12, max_size=12), sends=st.data())
def test_recipient_sees_each_slot_at_most_once_and_ends_on_the_final_one(
    starts: list[int], lengths: list[int], sends: st.DataObject
) -> None:
    rules = PlanRules()
    sim = Sim(rules=rules)
    windows = [
        (SLOT[0] + start * 5 * MIN_MS, SLOT[0] + start * 5 * MIN_MS + length * 15 * MIN_MS)
        for start, length in zip(starts, lengths, strict=False)
    ]
    for w in windows:
        sim.now_ms += MIN_MS
        sim.scan(slot=w)
        if sends.draw(st.booleans()):
            sim.send_all()
    sim.now_ms += MIN_MS
    sim.scan()  # the engine notices what went out, as on any later event
    sim.send_all()
    seen = [n for n in sim.sent if n.kind in (T.NOTICE_KIND_SLOT_ANNOUNCED, T.NOTICE_KIND_SLOT_CORRECTED)]
    seen_windows = [window_ms(n.slot) for n in seen]
    assert len(seen_windows) == len(set(seen_windows)), "a slot was told twice"
    assert seen
    assert seen[0].kind == T.NOTICE_KIND_SLOT_ANNOUNCED
    for before, correction in itertools.pairwise(seen):
        assert correction.kind == T.NOTICE_KIND_SLOT_CORRECTED
        assert window_ms(correction.previous_slot) == window_ms(before.slot), (
            "a correction names the told slot"
        )
    final = window(*windows[-1])
    assert seen_windows[-1] == windows[-1] or within_threshold(seen[-1].slot, final, rules.shift_threshold_ms)


# --- muting and unmuting, for any parcel story and any muted kinds --------------------------------

_MOMENT_KINDS = frozenset({T.NOTICE_KIND_SHIPPED, T.NOTICE_KIND_DELIVERED, T.NOTICE_KIND_RETURNED})
_ALL_KINDS = sorted(k for k in T.NoticeKind.values() if k != T.NOTICE_KIND_UNSPECIFIED)


def _story(sim: Sim, name: str) -> None:
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=12))
    if name == "slot moved after it went out":
        sim.scan(slot=SLOT)
        sim.send_all()
        sim.scan(slot=(SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS))
    elif name == "at a pickup point":
        sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", T0_MS + 5 * DAY_MS))
    elif name == "failed attempt":
        sim.scan(T.TRACKING_STATUS_ATTEMPT_FAIL)
    elif name == "address problem":
        sim.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    else:
        sim.scan(slot=SLOT)


@settings(max_examples=100, deadline=None)
@given(
    story=st.sampled_from(
        [
            "slot announced",
            "slot moved after it went out",
            "at a pickup point",
            "failed attempt",
            "address problem",
        ]
    ),
    muted=st.frozensets(st.sampled_from(_ALL_KINDS)),
)
def test_unmuting_brings_back_what_muting_took_except_news_of_a_moment(
    story: str, muted: frozenset[T.NoticeKind.ValueType]
) -> None:
    sim = Sim(audience=Audience())
    _story(sim, story)
    before = {kind: (n.version, n.due_at.ToMilliseconds()) for kind, n in sim.pending.items()}

    sim.audience = Audience(muted=muted)
    sim.apply(refresh=True)
    assert not {kind_name(k) for k in muted} & set(sim.pending)

    sim.audience = Audience()
    sim.apply(refresh=True)
    after = {kind: (n.version, n.due_at.ToMilliseconds()) for kind, n in sim.pending.items()}
    gone = {kind_name(k) for k in muted & _MOMENT_KINDS}
    assert after == {kind: v for kind, v in before.items() if kind not in gone}


def test_delayed_comes_back_once_the_parcel_leaves_the_pickup_point_undelivered() -> None:
    sim = Sim()
    sim.state.order.promised_date.CopyFrom(T.LocalDate(year=2026, month=3, day=12))
    sim.scan()
    sim.now_ms += HOUR_MS
    sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", T0_MS + 5 * DAY_MS))
    assert "DELAYED" not in sim.pending
    sim.now_ms += HOUR_MS
    # Redirected to home delivery: still not delivered, so still late once the promised day is over.
    notice = sim.scan(T.TRACKING_STATUS_OUT_FOR_DELIVERY).scheduled[T.NOTICE_KIND_DELAYED]
    assert notice.version == 2
    assert notice.due_at.ToMilliseconds() == end_of_day_ms(notice.promised_date, "UTC")
    assert sim.mark(T.NOTICE_KIND_DELAYED).status_reason == ""


def test_withdrawn_pickup_notices_come_back_when_the_parcel_is_back_at_the_same_point() -> None:
    deadline_ms = T0_MS + 5 * DAY_MS
    sim = Sim()
    sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    sim.now_ms += HOUR_MS
    sim.scan(T.TRACKING_STATUS_IN_TRANSIT)  # a re-sort at the point: both withdrawn before going out
    assert not {"AVAILABLE_FOR_PICKUP", "PICKUP_REMINDER"} & set(sim.pending)
    sim.now_ms += HOUR_MS
    back = sim.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    assert back.scheduled[T.NOTICE_KIND_AVAILABLE_FOR_PICKUP].version == 2
    reminder = back.scheduled[T.NOTICE_KIND_PICKUP_REMINDER]
    assert reminder.version == 2
    assert reminder.due_at.ToMilliseconds() == deadline_ms - PlanRules().reminder_lead_ms
    assert back.revived == {T.NOTICE_KIND_AVAILABLE_FOR_PICKUP, T.NOTICE_KIND_PICKUP_REMINDER}

    # What already went out is not sent twice; the reminder, still ahead, comes back.
    told = Sim()
    told.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    del told.pending["AVAILABLE_FOR_PICKUP"]  # went out; the reminder is not due yet
    told.now_ms += HOUR_MS
    told.scan(T.TRACKING_STATUS_IN_TRANSIT)
    told.now_ms += HOUR_MS
    again = told.scan(T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup=("PP1", deadline_ms))
    assert set(again.scheduled) == {T.NOTICE_KIND_PICKUP_REMINDER}


def test_address_check_is_asked_once_the_order_is_registered_as_paid() -> None:
    sim = Sim(paid=False)
    sim.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    assert sim.mark(T.NOTICE_KIND_EXCEPTION).status_reason == REASON_UNPAID
    sim.now_ms += 10 * MIN_MS
    assert T.NOTICE_KIND_EXCEPTION not in sim.apply(refresh=True).scheduled  # still unpaid
    sim.state.order.paid = True
    result = sim.apply(refresh=True)
    notice = result.scheduled[T.NOTICE_KIND_EXCEPTION]
    assert notice.version == 1  # it never went out
    assert notice.actionable
    assert notice.due_at.ToMilliseconds() == sim.now_ms
    assert result.revived == {T.NOTICE_KIND_EXCEPTION}

    # Paid once the parcel has moved on: the address problem is no longer its news.
    moved_on = Sim(paid=False)
    moved_on.scan(T.TRACKING_STATUS_EXCEPTION, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    moved_on.scan(T.TRACKING_STATUS_OUT_FOR_DELIVERY)
    moved_on.state.order.paid = True
    assert T.NOTICE_KIND_EXCEPTION not in moved_on.apply(refresh=True).scheduled


def test_quiet_hours_never_hold_a_correction_past_the_start_of_the_told_slot() -> None:
    sim = Sim(audience=Audience(quiet=(22 * 60, 11 * 60)))  # 22:00-11:00 UTC
    sim.now_ms = T0_MS + 11 * HOUR_MS  # 20:00 UTC on 10 March
    told = (T0_MS + DAY_MS + HOUR_MS, T0_MS + DAY_MS + 3 * HOUR_MS)  # 11 March 10:00-12:00
    sim.scan(slot=told)
    sim.send_all()
    sim.now_ms = T0_MS + 13 * HOUR_MS + 30 * MIN_MS  # 22:30: quiet until 11:00, after 10:00
    moved = (T0_MS + DAY_MS + 5 * HOUR_MS, T0_MS + DAY_MS + 7 * HOUR_MS)  # 14:00-16:00
    correction = sim.scan(slot=moved).scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    # The recipient acts on the slot they were told: the correction must reach them before it.
    assert correction.deadline.ToMilliseconds() == told[0]
    assert correction.due_at.ToMilliseconds() < told[0]

    # Moved earlier: the new slot starts first, so it is the deadline.
    sim.send_all()
    sim.scan()  # the engine notices the correction went out: ``moved`` is now the told slot
    sim.now_ms += MIN_MS
    earlier = (T0_MS + DAY_MS - HOUR_MS, T0_MS + DAY_MS + HOUR_MS)  # 08:00-10:00
    again = sim.scan(slot=earlier).scheduled[T.NOTICE_KIND_SLOT_CORRECTED]
    assert window_ms(again.previous_slot) == moved
    assert again.deadline.ToMilliseconds() == earlier[0]
