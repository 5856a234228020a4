"""Notice planning: the rules recipients feel, as pure functions over a parcel's state.

``plan`` takes the state after new facts were folded in (events, a registration, new preferences), the
notice kinds still waiting in the due set, the recipient's planning preferences and the time, and
decides which notices to schedule, replace or withdraw. It does no IO, so every rule is tested here:

- SHIPPED once, on the first carrier scan;
- SLOT_ANNOUNCED when a window appears; replaced in place (same id, new version = slot version) while
  it has not gone out, so the recipient never sees the old slot;
- SLOT_CORRECTED once the recipient was told a slot: names the old and the new one, due a debounce
  after the change so rapid changes make one correction, before the earlier of the two slots' starts
  (the told one's only while it is ahead); none (and a pending one withdrawn) when the new slot lies
  inside the told one or both ends moved by the threshold or less;
- DELIVERED cancels every pending notice; RETURNED likewise; an expired parcel just cancels; neither
  is told when it happened more than a day before the engine learns of it (stale news);
- ATTEMPT_FAILED per failed attempt; AVAILABLE_FOR_PICKUP per pickup point and deadline, with a
  PICKUP_REMINDER a lead before the deadline, withdrawn when the parcel leaves the pickup point and
  planned again (a new version) if it comes back to the same one, unless it already went out;
- DELAYED scheduled up front for the moment the promised date has passed in the recipient's time
  zone: delivery (or arrival at a pickup point) withdraws it first, so the claim itself is the check;
  withdrawn while the parcel waited at a pickup point (or had no promised date), it is planned again,
  a new version, once the parcel is on its way again;
- EXCEPTION (check your address) for address problems of paid orders only, once per problem: the
  carrier's daily re-scans of a parcel held for its address ask nothing more;
- a pending notice planned again (a refresh) keeps what the gateway learnt failing to send it (its
  attempts, failed channels, backoff) while it is the same promise to the same person
  (``keep_retries``);
- muted kinds are not scheduled (SUPPRESSED); a refresh brings a muted notice back once its kind is
  unmuted, and an unpaid order's address check once the order is paid, if it still makes sense (see
  ``_Planner._revived_desired_ms``); unpaid orders' notices are not actionable.

Send times go through ``common.quiet_hours.allowed_send_ms``: outside quiet hours, never past a deadline.
Notice ids are ``<parcel_id>:<KIND>``; a notice is "gone out" (QUEUED) when the engine scheduled it and
the scheduler has since claimed it from the due set (``pending`` no longer lists it). What the
recipient knows of their slot is what the gateway SENT them (``told_slot``/``told_version``, read from
the parcel hash, see ``engine.state.parse_read``): a slot notice handed over but not sent yet is
replaced (a new version) or withdrawn when the slot moves, never taken as read. One handed over may
also be going out while the engine plans: the gateway resolves a correction against the slot it sent
last when it sends it (names that slot; drops it within the threshold of it), and the planner plans
a correction to be so resolved rather than withdraw one possibly going out.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeAlias

from relais.v1 import notice_pb2, preferences_pb2, state_pb2, types_pb2

from common.clock import stamp_ms
from common.keys import kind_name
from common.quiet_hours import allowed_send_ms, zone
from common.settings import EngineSettings
from common.slots import window_ms, within_threshold
from common.telemetry import inject_trace_context
from engine.validation import set_stamp_ms

Kind: TypeAlias = types_pb2.NoticeKind.ValueType
Status: TypeAlias = notice_pb2.NoticeStatus.ValueType


SHIPPED = types_pb2.NOTICE_KIND_SHIPPED
ANNOUNCED = types_pb2.NOTICE_KIND_SLOT_ANNOUNCED
CORRECTED = types_pb2.NOTICE_KIND_SLOT_CORRECTED
DELIVERED = types_pb2.NOTICE_KIND_DELIVERED
ATTEMPT_FAILED = types_pb2.NOTICE_KIND_ATTEMPT_FAILED
AT_PICKUP = types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP
REMINDER = types_pb2.NOTICE_KIND_PICKUP_REMINDER
DELAYED = types_pb2.NOTICE_KIND_DELAYED
EXCEPTION = types_pb2.NOTICE_KIND_EXCEPTION
RETURNED = types_pb2.NOTICE_KIND_RETURNED

SCHEDULED = notice_pb2.NOTICE_STATUS_SCHEDULED
QUEUED = notice_pb2.NOTICE_STATUS_QUEUED
CANCELLED = notice_pb2.NOTICE_STATUS_CANCELLED
SUPPRESSED = notice_pb2.NOTICE_STATUS_SUPPRESSED

REASON_MUTED = "muted by the recipient"
REASON_UNPAID = "unpaid order: no address check"
REASON_WITHIN = "slot moved within the threshold of the slot the recipient was told"
REASON_SLOT_OVER = "the slot is over"
REASON_AT_PICKUP = "waiting at a pickup point"
REASON_LEFT_PICKUP = "no longer waiting at the pickup point"
REASON_NO_PROMISE = "no promised date any more"
REASON_DELIVERED = "delivered"
REASON_RETURNED = "returned to the sender"
REASON_EXPIRED = "tracking expired"
REASON_ERASED = "the recipient's data was erased"
REASON_NOTHING_TOLD = "the recipient was told no slot to correct"
REASON_TOLD = "a slot announcement went out meanwhile: a correction follows it"

T = types_pb2

# How old a delivery or return may be and still be told: carriers' feeds run hours late at worst.
STALE_NEWS_MS = 24 * 3_600_000


@dataclass(frozen=True, slots=True)
class PlanRules:
    shift_threshold_ms: int = 15 * 60_000
    debounce_ms: int = 120_000
    reminder_lead_ms: int = 24 * 3_600_000
    unpaid_actionable_merchants: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> PlanRules:
        return cls(
            shift_threshold_ms=settings.slot_shift_threshold_s * 1000,
            debounce_ms=settings.correction_debounce_s * 1000,
            reminder_lead_ms=settings.pickup_reminder_lead_s * 1000,
            unpaid_actionable_merchants=settings.unpaid_actionable_merchants,
        )


@dataclass(frozen=True, slots=True)
class Audience:
    """What planning needs of a recipient's preferences (no contact data)."""

    time_zone: str = "UTC"
    quiet: tuple[int, int] | None = None
    muted: frozenset[Kind] = frozenset()

    @classmethod
    def from_preferences(cls, prefs: preferences_pb2.RecipientPreferences) -> Audience:
        quiet = None
        if prefs.HasField("quiet_hours"):
            quiet = (prefs.quiet_hours.start_minute, prefs.quiet_hours.end_minute)
        return cls(time_zone=prefs.time_zone or "UTC", quiet=quiet, muted=frozenset(prefs.muted_kinds))


@dataclass(slots=True)
class Plan:
    """The outcome: notices to write and put in the due set, kinds to take out of it, and the kinds that
    must still be pending when written (replaced or withdrawn: if the scheduler claimed one meanwhile,
    the write conflicts and the parcel is planned again)."""

    scheduled: dict[Kind, notice_pb2.Notice] = field(default_factory=dict)
    withdrawn: dict[Kind, Status] = field(default_factory=dict)
    checked: set[Kind] = field(default_factory=set)
    # Scheduled kinds that had been withdrawn: only theirs has a withdrawal field to clear.
    revived: set[Kind] = field(default_factory=set)
    # Every kind scheduled once planned, new or kept, by name (the parcel hash's field ``q``).
    pending_names: list[str] = field(default_factory=list)


def plan(
    state: state_pb2.ParcelState,
    pending: frozenset[str],
    audience: Audience | None,
    now_ms: int,
    rules: PlanRules,
    *,
    shard: int = 0,
    refresh: bool = False,
    erase: bool = False,
    trace_context: Mapping[str, str] | None = None,
    stored: Mapping[str, bytes] | None = None,
) -> Plan:
    """Plan the parcel's notices; updates ``state`` (its notice marks, told slot) in place.

    ``refresh`` plans every pending notice again with the current facts and preferences (new quiet
    hours or muted kinds, a changed registration) instead of only reacting to new facts. ``erase``
    withdraws every pending notice and plans nothing more until the recipient sets preferences again.
    ``trace_context``: what the notices carry to continue the trace (by default the current span's).
    ``stored``: the pending notices' bodies as stored, by kind name (see ``keep_retries``).
    """
    planner = _Planner(state, pending, audience, now_ms, rules, shard, trace_context)
    result = planner.erase() if erase else planner.run(refresh=refresh)
    if stored:
        keep_retries(result.scheduled, stored)
    result.pending_names = [
        kind_name(kind) for kind, mark in planner.marks.items() if mark.status == SCHEDULED
    ]
    return result


def keep_retries(scheduled: Mapping[Kind, notice_pb2.Notice], stored: Mapping[str, bytes]) -> None:
    """What the gateway wrote back into a pending notice it could not send (``stored``, bodies by kind
    name) stays when planning the same promise (kind and version) to the same recipient again: its
    attempts, or a failing provider would get unlimited ones; the channels that rejected the recipient
    for good, or they would be tried again; and after a failed attempt its backoff, as the later of
    that and the new due time. A deferral without an attempt spent (a rate limit) is not kept: the
    gateway's limiter defers it again. A new version (a new slot) or another recipient starts afresh.
    Only the notice changes, not its mark: GetParcel shows the due set's time, RETRYING."""
    for kind, notice in scheduled.items():
        raw = stored.get(kind_name(kind))
        if raw is None:
            continue
        before = notice_pb2.Notice.FromString(raw)
        if before.version != notice.version or before.recipient_id != notice.recipient_id:
            continue
        notice.attempt = before.attempt
        notice.failed_channels.extend(before.failed_channels)
        if before.attempt and stamp_ms(before.due_at) > stamp_ms(notice.due_at):
            notice.due_at.CopyFrom(before.due_at)


_WITHDRAWN = frozenset({CANCELLED, SUPPRESSED})

# Notices about a situation that may still hold, which a new recipient needs to act on.
_TOLD_AGAIN = frozenset({AT_PICKUP, REMINDER, ATTEMPT_FAILED, EXCEPTION, DELAYED})


def recipient_changed(state: state_pb2.ParcelState, pending: frozenset[str]) -> None:
    """The merchant corrected the parcel's recipient (before ``plan``): what went out went to the old
    one. The notices claimed since the last plan are marked gone out without their slot taken as
    told, the told slot is forgotten, and the slot gets a new version: the new recipient is announced
    the current slot, never sent a correction naming one another person was told, and the old
    recipient's announcement spent the idempotency key of the version it had. What went out about a
    situation that may still hold (``_TOLD_AGAIN``) is planned again, under its next version."""
    for mark in state.notices:
        if mark.status == SCHEDULED and kind_name(mark.kind) not in pending:
            mark.status = QUEUED
        if mark.kind in _TOLD_AGAIN and mark.status == QUEUED:
            # What the old recipient was told about the situation now: planned again (next version)
            # while it still holds, since the new one must collect the parcel or check the address.
            mark.subject = ""
    _tell_again_what_erasure_cancelled(state)
    state.ClearField("told_slot")
    state.ClearField("told_version")
    if state.HasField("slot"):
        state.slot.version += 1
    # Another person: the old recipient's erasure does not silence the new one.
    state.recipient_erased = False


def _tell_again_what_erasure_cancelled(state: state_pb2.ParcelState) -> None:
    """The notices about a situation that may still hold (``_TOLD_AGAIN``) that an erasure cancelled
    are planned again (next version) while it holds: for a corrected recipient, or for the same one
    setting preferences again. News that came during the erasure was never planned, and is told then
    too: when it came must not decide whether a missed delivery is told."""
    for mark in state.notices:
        if mark.kind in _TOLD_AGAIN and mark.status == CANCELLED and mark.status_reason == REASON_ERASED:
            mark.subject = ""


def end_of_day_ms(date: types_pb2.LocalDate, time_zone: str) -> int:
    """The first instant after ``date`` in ``time_zone`` (UTC when the zone is unknown)."""
    try:
        tz = zone(time_zone)
    except ValueError:
        tz = zone("UTC")
    day = datetime(date.year, date.month, date.day, tzinfo=tz) + timedelta(days=1)
    return int(day.timestamp() * 1000)


class _Planner:
    def __init__(
        self,
        state: state_pb2.ParcelState,
        pending: frozenset[str],
        audience: Audience | None,
        now_ms: int,
        rules: PlanRules,
        shard: int,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.state = state
        self.trace_context = trace_context
        self.pending = pending
        self.audience = audience
        self.now_ms = now_ms
        self.rules = rules
        self.shard = shard
        self.marks = {mark.kind: mark for mark in state.notices}
        self.touched: set[Kind] = set()
        self.result = Plan()

    def erase(self) -> Plan:
        self._observe_claims()
        for kind in list(self.marks):
            self._withdraw(kind, CANCELLED, REASON_ERASED)
        self.state.recipient_erased = True
        return self.result

    def run(self, *, refresh: bool) -> Plan:
        self._observe_claims()
        state = self.state
        if not state.recipient_id:
            return self.result
        if state.recipient_erased:
            if self.audience is None:
                return self.result
            state.recipient_erased = False  # they set preferences again
            _tell_again_what_erasure_cancelled(state)
        status = state.status
        if status == T.TRACKING_STATUS_DELIVERED:
            self._finish(DELIVERED, REASON_DELIVERED)
        elif status in (T.TRACKING_STATUS_RETURNING_TO_SENDER, T.TRACKING_STATUS_RETURNED_TO_SENDER):
            self._finish(RETURNED, REASON_RETURNED)
        elif status == T.TRACKING_STATUS_EXPIRED:
            self._finish(None, REASON_EXPIRED)
        else:
            self._active()
        if refresh:
            self._refresh()
        return self.result

    # --- what went out -------------------------------------------------------------------------------

    def _observe_claims(self) -> None:
        """Scheduled notices no longer in the due set were handed to the gateway. What the recipient
        knows of their slot is not set here but from what the gateway sent (``state.told_slot``, see
        ``engine.state.parse_read``): a notice handed over may fail, wait or be retried."""
        pending = self.pending
        for kind in sorted(self.marks):
            mark = self.marks[kind]
            if mark.status == SCHEDULED and kind_name(kind) not in pending:
                mark.status = QUEUED

    # --- the rules -----------------------------------------------------------------------------------

    def _finish(self, final: Kind | None, reason: str) -> None:
        for kind in list(self.marks):
            if kind != final:
                self._withdraw(kind, CANCELLED, reason)
        # News of a moment: a parcel registered (or reported) days after it was delivered or
        # returned tells the recipient nothing they do not know; GetParcel shows it.
        fresh = self.now_ms - self.state.status_occurred_ms <= STALE_NEWS_MS
        if final is not None and final not in self.marks and fresh:
            self._schedule(final, 1, self.now_ms, None)

    def _active(self) -> None:
        if self.state.scanned and SHIPPED not in self.marks:
            self._schedule(SHIPPED, 1, self.now_ms, None)
        self._slot()
        self._pickup()
        if self.state.status == T.TRACKING_STATUS_ATTEMPT_FAIL:
            self._once_per(ATTEMPT_FAILED, self.state.status_event_id)
        if _address_problem(self.state.status, self.state.exception_reason):
            self._once_per(EXCEPTION, self._address_problem_since())
        self._delayed()

    def _slot(self) -> None:
        state = self.state
        if state.status == T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP or not state.HasField("slot"):
            for kind in (ANNOUNCED, CORRECTED):
                self._withdraw(kind, CANCELLED, REASON_AT_PICKUP)
            return
        window, version = state.slot.window, state.slot.version
        start_ms, end_ms = window_ms(window)
        if end_ms <= self.now_ms:
            for kind in (ANNOUNCED, CORRECTED):
                self._withdraw(kind, CANCELLED, REASON_SLOT_OVER)
            return
        if not state.told_version and state.HasField("told_slot"):
            # Told before the gateway recorded what it sent (a state from an earlier release): every
            # slot notice handed over counted as read then.
            handed = [
                m.version
                for m in self.marks.values()
                if m.kind in (ANNOUNCED, CORRECTED) and m.status == QUEUED
            ]
            state.told_version = max(handed, default=1)
        if not state.HasField("told_slot"):
            # Nothing told (or told someone else, see ``recipient_changed``): no correction to make.
            # An announcement of another slot is replaced, whether it still waits or was handed over
            # and not sent yet (a retry of the old one is then dropped as superseded); the same one
            # handed over is the gateway's to send.
            self._withdraw(CORRECTED, CANCELLED, REASON_NOTHING_TOLD)
            announced = self.marks.get(ANNOUNCED)
            if announced is None or announced.version != version or announced.status in _WITHDRAWN:
                self._schedule(ANNOUNCED, version, self.now_ms, start_ms, slot=window)
            return
        # Told a slot: what is to be said now is a correction of it, if anything. A slot notice handed
        # over and not known sent may be going out at this very moment, whatever is withdrawn here.
        in_hand = any(
            m.kind in (ANNOUNCED, CORRECTED) and m.status == QUEUED and m.version > state.told_version
            for m in self.marks.values()
        )
        # An announcement handed over and not sent yet (replaced while an older one was being sent).
        self._withdraw(ANNOUNCED, CANCELLED, REASON_TOLD, recall=True)
        told = state.told_slot
        if within_threshold(told, window, self.rules.shift_threshold_ms) and not in_hand:
            self._withdraw(CORRECTED, SUPPRESSED, REASON_WITHIN)
            return
        # Within the threshold with one in hand: a correction all the same, which the gateway resolves
        # against the slot it sent last when it sends it (``gateway.worker._resolve_correction``): it
        # names that slot, and is dropped when the slot lies within the threshold of it - unless the
        # one in hand went out meanwhile, which this plan could not see.
        corrected = self.marks.get(CORRECTED)
        if corrected is None or corrected.version != version or corrected.status in _WITHDRAWN:
            desired_ms = self.now_ms + self.rules.debounce_ms
            # The recipient acts on the slot they were told: a correction arriving after it began
            # comes too late, even if the new slot starts later.
            told_start_ms = stamp_ms(told.start)
            deadline_ms = told_start_ms if self.now_ms < told_start_ms < start_ms else start_ms
            self._schedule(CORRECTED, version, desired_ms, deadline_ms, slot=window, previous=told)

    def _pickup(self) -> None:
        state = self.state
        if state.status != T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP or not state.HasField("pickup_point"):
            for kind in (AT_PICKUP, REMINDER):
                self._withdraw(kind, CANCELLED, REASON_LEFT_PICKUP)
            return
        point = state.pickup_point
        deadline_ms = stamp_ms(point.deadline)
        subject = _pickup_subject(point)
        # Withdrawn ones (the parcel left the point, and is back at it) never went out: planned again.
        notice = self.marks.get(AT_PICKUP)
        if notice is None or notice.subject != subject or notice.status == CANCELLED:
            self._schedule(AT_PICKUP, _next(notice), self.now_ms, deadline_ms, subject=subject)
        reminder = self.marks.get(REMINDER)
        remind_ms = deadline_ms - self.rules.reminder_lead_ms
        if reminder is not None and reminder.subject == subject and reminder.status != CANCELLED:
            return
        if remind_ms > self.now_ms:
            self._schedule(REMINDER, _next(reminder), remind_ms, deadline_ms, subject=subject)
        else:
            self._withdraw(REMINDER, CANCELLED, REASON_LEFT_PICKUP)

    def _once_per(self, kind: Kind, subject: str) -> None:
        """One notice of ``kind`` per ``subject`` (the event it is about)."""
        mark = self.marks.get(kind)
        if mark is None or mark.subject != subject:
            self._schedule(kind, _next(mark), self.now_ms, None, subject=subject)

    def _address_problem_since(self) -> str:
        """The event that opened the parcel's current address problem: the first of the latest run of
        address-problem events. Carriers scan a parcel held for its address again each day; the
        recipient is asked to check it once per problem, not once per scan. Each failed attempt, by
        contrast, is news of its own (ATTEMPT_FAILED per event)."""
        timeline = self.state.timeline
        since = self.state.status_event_id
        for at in range(len(timeline) - 1, -1, -1):
            event = timeline[at].event
            if not _address_problem(event.status, event.exception_reason):
                break
            since = event.event_id
        return since

    def _delayed(self) -> None:
        order = self.state.order
        if self.state.status == T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
            self._withdraw(DELAYED, CANCELLED, REASON_AT_PICKUP)
            return
        if not order.HasField("promised_date"):
            self._withdraw(DELAYED, CANCELLED, REASON_NO_PROMISE)
            return
        subject = _date_subject(order.promised_date)
        mark = self.marks.get(DELAYED)
        # A withdrawn one comes back: whatever withdrew it (a pickup point, a removed promise) no
        # longer holds, and a parcel still late on that date must get its notice.
        if mark is not None and mark.subject == subject and mark.status != CANCELLED:
            return
        self._schedule(DELAYED, _next(mark), self._delayed_ms(), None, subject=subject)

    def _delayed_ms(self) -> int:
        """The end of the promised day in the recipient's current time zone."""
        time_zone = self.audience.time_zone if self.audience else "UTC"
        return end_of_day_ms(self.state.order.promised_date, time_zone)

    def _refresh(self) -> None:
        """Plan pending notices again, same version: new preferences or facts, same promise. Notices
        muted until now come back when their kind no longer is, and an unpaid order's address check
        once the order is paid (a re-registration), when they still make sense."""
        muted = self.audience.muted if self.audience is not None else frozenset()
        paid = self.state.order.paid
        for kind, mark in list(self.marks.items()):
            if kind in self.touched:
                continue
            if mark.status == SCHEDULED:
                # DELAYED's moment depends on the time zone, which may be new (merchants often
                # register parcels before their recipients set one): computed again, not kept.
                desired_ms = self._delayed_ms() if kind == DELAYED else desired_of(mark)
            elif (
                mark.status == SUPPRESSED
                and kind not in muted
                and (mark.status_reason == REASON_MUTED or (paid and mark.status_reason == REASON_UNPAID))
            ):
                revived_ms = self._revived_desired_ms(kind, mark)
                if revived_ms is None:
                    continue
                desired_ms = revived_ms
            else:
                continue
            slot = types_pb2.TimeWindow()
            slot.CopyFrom(mark.slot)
            previous = types_pb2.TimeWindow()
            previous.CopyFrom(mark.previous_slot)
            self._schedule(
                kind,
                mark.version,
                desired_ms,
                mark.deadline_ms or None,
                slot=slot if mark.HasField("slot") else None,
                previous=previous if mark.HasField("previous_slot") else None,
                subject=mark.subject,
                cause=mark.cause_event_id,
            )

    def _revived_desired_ms(self, kind: Kind, mark: state_pb2.NoticeMark) -> int | None:
        """When a notice suppressed because its kind was muted (or, for EXCEPTION, its order unpaid)
        is wanted now that it is not, or None when it no longer makes sense (it then stays
        suppressed). It keeps its version: it never went out. Quiet hours and its deadline still
        apply (``_schedule``).

        - SHIPPED, DELIVERED, RETURNED: never. They are news of a moment; a recipient who unmutes
          them days later expects the next news, not a stale "your parcel has shipped" (``GetParcel``
          shows the status anyway).
        - DELAYED: while the parcel is still late on the same promised date (not delivered, returned,
          expired or waiting at a pickup point), at the end of that day in the current zone, so at
          once if it has passed: the parcel is late and the recipient wants to know.
        - AVAILABLE_FOR_PICKUP, PICKUP_REMINDER: while the parcel still waits at the same point with
          the same deadline, and that deadline is ahead: the recipient can still fetch it. A reminder
          whose lead time passed goes out at once; it still helps them not miss the deadline.
        - ATTEMPT_FAILED, EXCEPTION: while that event is still the parcel's latest news: the
          recipient can still act on it (arrange a new delivery, check the address).
        - SLOT_ANNOUNCED, SLOT_CORRECTED: not here; ``_slot`` plans again any slot notice that is not
          scheduled, so they come back while their slot is ahead.
        """
        state = self.state
        status = state.status
        if kind == DELAYED:
            still_late = (
                status not in _NOT_LATE
                and state.order.HasField("promised_date")
                and mark.subject == _date_subject(state.order.promised_date)
            )
            return self._delayed_ms() if still_late else None
        if kind in (AT_PICKUP, REMINDER):
            still_waiting = (
                status == T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP
                and state.HasField("pickup_point")
                and mark.subject == _pickup_subject(state.pickup_point)
                and (not mark.deadline_ms or mark.deadline_ms > self.now_ms)
            )
            return desired_of(mark) if still_waiting else None
        if kind in (ATTEMPT_FAILED, EXCEPTION):
            if kind == ATTEMPT_FAILED:
                latest = status == T.TRACKING_STATUS_ATTEMPT_FAIL and mark.subject == state.status_event_id
            else:
                latest = _address_problem(status, state.exception_reason) and (
                    mark.subject == self._address_problem_since()
                )
            return desired_of(mark) if latest else None
        return None

    # --- scheduling ----------------------------------------------------------------------------------

    def _suppression(self, kind: Kind) -> str | None:
        if self.audience is not None and kind in self.audience.muted:
            return REASON_MUTED
        if kind == EXCEPTION and not self.state.order.paid:
            return REASON_UNPAID
        return None

    def _schedule(
        self,
        kind: Kind,
        version: int,
        desired_ms: int,
        deadline_ms: int | None,
        *,
        slot: types_pb2.TimeWindow | None = None,
        previous: types_pb2.TimeWindow | None = None,
        subject: str = "",
        cause: str | None = None,
    ) -> None:
        self.touched.add(kind)
        mark = self.marks.get(kind)
        if mark is None:
            mark = self.state.notices.add(kind=kind)
            self.marks[kind] = mark
        if mark.status == SCHEDULED:
            self.result.checked.add(kind)
        elif mark.status in (CANCELLED, SUPPRESSED):
            self.result.revived.add(kind)
        mark.version = version
        mark.deadline_ms = deadline_ms or 0
        mark.subject = subject
        # Not kept: ``planned_ms`` (nothing reads it), and ``desired_ms`` when it equals ``due_ms``
        # (see ``desired_of``): every byte of a state is paid once per parcel tracked.
        mark.ClearField("planned_ms")
        mark.cause_event_id = self.state.status_event_id if cause is None else cause
        _set_window(mark, "slot", slot)
        _set_window(mark, "previous_slot", previous)
        reason = self._suppression(kind)
        if reason is not None:
            mark.status, mark.status_reason, mark.due_ms = SUPPRESSED, reason, 0
            mark.desired_ms = desired_ms
            self.result.scheduled.pop(kind, None)
            self.result.withdrawn[kind] = SUPPRESSED
            return
        audience = self.audience or Audience()
        mark.due_ms = allowed_send_ms(
            desired_ms, self.now_ms, audience.quiet, audience.time_zone, deadline_ms
        )
        mark.desired_ms = 0 if desired_ms == mark.due_ms else desired_ms
        mark.status, mark.status_reason = SCHEDULED, ""
        self.result.withdrawn.pop(kind, None)
        self.result.scheduled[kind] = self._notice(mark)

    def _withdraw(self, kind: Kind, status: Status, reason: str, *, recall: bool = False) -> None:
        mark = self.marks.get(kind)
        if mark is None:
            return
        if recall and mark.status == QUEUED and mark.version > self.state.told_version:
            # Handed over and not sent yet (waiting, or retried): its body goes, so the gateway drops
            # it (a retry finds no body; one in hand sees its mark withdrawn). One being sent at this
            # very moment still goes out. No due-set check: it is not pending.
            self.touched.add(kind)
            mark.status, mark.status_reason = status, reason
            self.result.withdrawn[kind] = status
            return
        if mark.status != SCHEDULED:
            return
        self.touched.add(kind)
        self.result.checked.add(kind)
        mark.status, mark.status_reason = status, reason
        self.result.scheduled.pop(kind, None)
        self.result.withdrawn[kind] = status

    def _notice(self, mark: state_pb2.NoticeMark) -> notice_pb2.Notice:
        state = self.state
        order = state.order
        notice = notice_pb2.Notice(
            notice_id=f"{state.parcel_id}:{kind_name(mark.kind)}",
            version=mark.version,
            kind=mark.kind,
            parcel_id=state.parcel_id,
            merchant_id=state.merchant_id,
            recipient_id=state.recipient_id,
            carrier=state.carrier,
            parcel_status=state.status,
            paid=order.paid,
            # Unpaid orders get informational notices only: no link that changes the delivery,
            # unless their merchant allows it.
            actionable=order.paid or state.merchant_id in self.rules.unpaid_actionable_merchants,
            cause_event_id=mark.cause_event_id,
            shard=self.shard,
        )
        if order.HasField("declared_value"):
            notice.declared_value.CopyFrom(order.declared_value)
        if order.HasField("promised_date"):
            notice.promised_date.CopyFrom(order.promised_date)
        if mark.HasField("slot"):
            notice.slot.CopyFrom(mark.slot)
        if mark.HasField("previous_slot"):
            notice.previous_slot.CopyFrom(mark.previous_slot)
        if mark.kind in (AT_PICKUP, REMINDER) and state.HasField("pickup_point"):
            notice.pickup_point.CopyFrom(state.pickup_point)
        if mark.kind in (ATTEMPT_FAILED, EXCEPTION):
            notice.exception_reason = state.exception_reason
        set_stamp_ms(notice.due_at, mark.due_ms)
        if mark.deadline_ms:
            set_stamp_ms(notice.deadline, mark.deadline_ms)
        set_stamp_ms(notice.planned_at, self.now_ms)
        # The current span (the carrier's batch) goes with the notice: one trace to the message.
        if self.trace_context is None:
            inject_trace_context(notice.trace_context)
        elif self.trace_context:
            notice.trace_context.update(self.trace_context)
        return notice


def desired_of(mark: state_pb2.NoticeMark) -> int:
    """When the notice was wanted before quiet hours: ``desired_ms``, kept only when it differs."""
    return mark.desired_ms or mark.due_ms


# A parcel in one of these is not (or no longer) late for its promised date.
_NOT_LATE = frozenset(
    {
        T.TRACKING_STATUS_DELIVERED,
        T.TRACKING_STATUS_RETURNING_TO_SENDER,
        T.TRACKING_STATUS_RETURNED_TO_SENDER,
        T.TRACKING_STATUS_EXPIRED,
        T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP,
    }
)


def _address_problem(status: types_pb2.TrackingStatus.ValueType, reason: int) -> bool:
    return status == T.TRACKING_STATUS_EXCEPTION and reason == T.EXCEPTION_REASON_ADDRESS_PROBLEM


def _date_subject(date: types_pb2.LocalDate) -> str:
    return _day_subject(date.year, date.month, date.day)


@functools.lru_cache(maxsize=1024)
def _day_subject(year: int, month: int, day: int) -> str:
    # Cached: read for every parcel planned, and promised dates are a few days near today.
    return f"{year:04d}-{month:02d}-{day:02d}"


def _pickup_subject(point: types_pb2.PickupPoint) -> str:
    return f"{point.id}@{stamp_ms(point.deadline)}"


def _next(mark: state_pb2.NoticeMark | None) -> int:
    return 1 if mark is None else mark.version + 1


def _set_window(mark: state_pb2.NoticeMark, name: str, window: types_pb2.TimeWindow | None) -> None:
    if window is None:
        mark.ClearField(name)  # type: ignore[arg-type]
    else:
        getattr(mark, name).CopyFrom(window)
