"""A parcel's facts as the alert rules and the daily counters need them, read off the engine's state
in one pass over its timeline: the one adapter from ``ParcelState`` to ``ParcelFacts``. The engine
builds them once per parcel it writes (``engine.state.change_of`` counts with them) and hands the
same ones to the alert hook.
"""

from __future__ import annotations

import functools
from datetime import date

from relais.v1 import state_pb2, tracking_pb2, types_pb2

from common.clock import stamp_ms
from engine.alert_rules import TROUBLE, ParcelFacts, TroubleEvent

INFO_RECEIVED = types_pb2.TRACKING_STATUS_INFO_RECEIVED
AT_PICKUP = types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP
EXCEPTION = types_pb2.TRACKING_STATUS_EXCEPTION


def promised_date(state: state_pb2.ParcelState) -> date | None:
    """The order's promised day; None when unset or not a real date."""
    order = state.order
    if not order.HasField("promised_date"):
        return None
    d = order.promised_date
    return _day(d.year, d.month, d.day)


@functools.lru_cache(maxsize=1024)
def _day(year: int, month: int, day: int) -> date | None:
    # Cached: promised dates are a few days near today, read for every parcel written.
    try:
        return date(year, month, day)
    except ValueError:
        return None


def facts_from_state(state: state_pb2.ParcelState) -> ParcelFacts:
    """One pass over the timeline (oldest first by occurred_at), times read without
    ``ToMilliseconds``'s range checks: this runs for every parcel of every batch."""
    first_scan_ms: int | None = None
    pickup_since_ms: int | None = None
    trouble: list[TroubleEvent] = []
    last_ms: int | None = None
    last: tracking_pb2.TrackingEvent | None = None
    for entry in state.timeline:
        event = entry.event
        ms = stamp_ms(event.occurred_at)
        status = event.status
        if status != INFO_RECEIVED and first_scan_ms is None:
            first_scan_ms = ms  # the timeline is sorted: the first scan is the earliest
        # Each failed attempt is one; an exception once per run: a carrier scanning a parcel held
        # for its address again each day reports one problem (the planner asks the recipient once).
        if status in TROUBLE and not (
            status == EXCEPTION
            and last is not None
            and last.status == EXCEPTION
            and last.exception_reason == event.exception_reason
        ):
            trouble.append(TroubleEvent(event.event_id, event.exception_reason, ms))
        # The start of the latest run of AVAILABLE_FOR_PICKUP events: a carrier's daily reminder
        # scan does not restart the wait.
        if status == AT_PICKUP:
            if last is None or last.status != AT_PICKUP:
                pickup_since_ms = ms
        else:
            pickup_since_ms = None
        last, last_ms = event, ms
    deadline = state.pickup_point.deadline if state.pickup_point.HasField("deadline") else None
    return ParcelFacts(
        parcel_id=state.parcel_id,
        merchant_id=state.merchant_id,
        status=state.status,
        exception_reason=state.exception_reason,
        created_ms=state.created_ms,
        first_scan_ms=first_scan_ms,
        last_event_ms=last_ms,
        last_facility=(last.location.facility or last.location.city) if last is not None else "",
        pickup_since_ms=pickup_since_ms if state.status == AT_PICKUP else None,
        pickup_deadline_ms=stamp_ms(deadline) if deadline else None,
        promised_date=promised_date(state),
        shipped_ms=first_scan_ms,
        delivered_ms=state.status_occurred_ms
        if state.status == types_pb2.TRACKING_STATUS_DELIVERED
        else None,
        trouble_events=tuple(trouble) if trouble else (),
    )
