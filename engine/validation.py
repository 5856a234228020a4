"""Checks of what callers send: one tracking event, one parcel registration.

Each check returns a ``Problem`` naming the field (as a path, e.g. ``delivery_window.end``) and saying
what is wrong in a sentence for the integrator, or None. Values are never echoed back: a field may hold
personal data.

Every Timestamp and date is range-checked here, not where it is used: one out-of-range value would
otherwise make the planner raise mid-batch (failing the whole batch) or be stored and break every
later read of the parcel. Every free-text field is bounded in length and holds no control character.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from relais.v1 import parcel_pb2, tracking_pb2, types_pb2

from common.clock import stamp_ms

MAX_BATCH_EVENTS = 5000
MAX_BATCH_PARCELS = 5000
MAX_FUTURE_MS = 10 * 60_000
# Nothing a carrier scanned happened before this (2000-01-01): a zero or garbage timestamp.
MIN_OCCURRED_MS = 946_684_800_000
MAX_WINDOW_MS = 7 * 86_400_000
# How far from now a delivery window, a pickup deadline or a promised date may lie. Parcels are in
# flight for days to weeks and finished ones expire after 30 days, so no real feed comes near a year
# either way; the bound keeps every instant the planner computes with (end of day, quiet hours in the
# recipient's zone) far inside what ``datetime`` and protobuf's Timestamp can hold (years 1-9999).
MAX_DISTANCE_DAYS = 366
MAX_DISTANCE_MS = MAX_DISTANCE_DAYS * 86_400_000
_MAX_NANOS = 999_999_999

# Free text is shown in messages, email headers, logs and support terminals, where a line break or an
# escape sequence is an injection, never data: C0, DEL, C1, and Unicode's line and paragraph
# separators are refused in every text field (none is multi-line).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Far above what carriers send (a name or a street line fits a label's line; postal codes run to 10
# characters): a longer value is garbage or an attack, refused rather than cut so the sender finds out.
MAX_NAME = 128
MAX_CODE = 16
MAX_OPENING_HOURS = 256
MAX_ADDRESS_LINES = 8

_CURRENCY = re.compile(r"[A-Z]{3}")
# Computed once: ``Enum.values()`` builds a list on every call, and this runs per event.
_STATUSES = frozenset(types_pb2.TrackingStatus.values()) - {types_pb2.TRACKING_STATUS_UNSPECIFIED}
_REASONS = frozenset(types_pb2.ExceptionReason.values())


def set_stamp_ms(stamp: timestamp_pb2.Timestamp, ms: int) -> None:
    """``stamp.FromMilliseconds(ms)`` without its pure-Python detour: runs per notice planned."""
    stamp.seconds, stamp.nanos = ms // 1000, ms % 1000 * 1_000_000


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    reason: str


def _ident(value: str, name: str, max_len: int) -> Problem | None:
    if not value:
        return Problem(name, f"{name} is required")
    if len(value) > max_len:
        return Problem(name, f"{name} is longer than {max_len} characters")
    # Printable ASCII without spaces (0x21-0x7e): ids end up in Redis keys and notice ids. Three
    # string methods, not a regex: this runs three times per event.
    if not (value.isascii() and value.isprintable()) or " " in value:
        return Problem(name, f"{name} must be printable ASCII without spaces")
    return None


def _text(value: str, name: str, max_len: int) -> Problem | None:
    if len(value) > max_len:
        return Problem(name, f"{name} is longer than {max_len} characters")
    # Control characters are all unprintable, so printable text (nearly all of it) costs one string
    # method; the rest may still be fine (a no-break space, a zero-width joiner in an emoji).
    if not value.isprintable() and _CONTROL.search(value):
        return Problem(name, f"{name} must not hold control characters (line breaks, tabs, escapes)")
    return None


def _location(location: types_pb2.Location) -> Problem | None:
    return (
        _text(location.facility, "location.facility", MAX_NAME)
        or _text(location.city, "location.city", MAX_NAME)
        or _text(location.postal_code, "location.postal_code", MAX_CODE)
        or _text(location.country_code, "location.country_code", MAX_CODE)
    )


def _address(address: types_pb2.Address) -> Problem | None:
    lines = address.lines
    if len(lines) > MAX_ADDRESS_LINES:
        return Problem(
            "pickup_point.address.lines",
            f"pickup_point.address.lines holds more than {MAX_ADDRESS_LINES} lines",
        )
    # By index: a for loop over a protobuf repeated field builds an iterator that costs more than the
    # checks; and the path with its index is only spelled out for the line at fault.
    for i in range(len(lines)):
        if _text(lines[i], "", MAX_NAME) is not None:
            return _text(lines[i], f"pickup_point.address.lines[{i}]", MAX_NAME)
    return (
        _text(address.postal_code, "pickup_point.address.postal_code", MAX_CODE)
        or _text(address.city, "pickup_point.address.city", MAX_NAME)
        or _text(address.country_code, "pickup_point.address.country_code", MAX_CODE)
    )


def _nanos(stamp: timestamp_pb2.Timestamp, name: str) -> Problem | None:
    # Out of range, the stamp is stored as sent and every later reading of it fails (GetParcel's
    # reply, JSON), so it is refused at the door.
    if not 0 <= stamp.nanos <= _MAX_NANOS:
        return Problem(f"{name}.nanos", f"{name}.nanos must be 0 to 999,999,999")
    return None


def _near(stamp: timestamp_pb2.Timestamp, name: str, now_ms: int) -> Problem | None:
    """A valid Timestamp within ``MAX_DISTANCE_DAYS`` of now."""
    return _nanos(stamp, name) or _near_ms(stamp_ms(stamp), name, now_ms)


def _near_ms(at_ms: int, name: str, now_ms: int) -> Problem | None:
    if at_ms < now_ms - MAX_DISTANCE_MS:
        return Problem(name, f"{name} is more than {MAX_DISTANCE_DAYS} days in the past")
    if at_ms > now_ms + MAX_DISTANCE_MS:
        return Problem(name, f"{name} is more than {MAX_DISTANCE_DAYS} days in the future")
    return None


def _window(event: tracking_pb2.TrackingEvent, now_ms: int) -> Problem | None:
    if not event.HasField("delivery_window"):
        return None
    window = event.delivery_window
    if not window.HasField("start"):
        return Problem("delivery_window.start", "delivery_window.start is required")
    if not window.HasField("end"):
        return Problem("delivery_window.end", "delivery_window.end is required")
    start, end = window.start, window.end
    problem = _nanos(start, "delivery_window.start") or _nanos(end, "delivery_window.end")
    if problem is not None:
        return problem
    start_ms, end_ms = stamp_ms(start), stamp_ms(end)
    problem = _near_ms(start_ms, "delivery_window.start", now_ms) or _near_ms(
        end_ms, "delivery_window.end", now_ms
    )
    if problem is not None:
        return problem
    if end_ms <= start_ms:
        return Problem("delivery_window.end", "delivery_window.end must be after its start")
    if end_ms - start_ms > MAX_WINDOW_MS:
        return Problem("delivery_window.end", "delivery_window spans more than 7 days")
    return None


def _pickup(event: tracking_pb2.TrackingEvent, now_ms: int) -> Problem | None:
    point = event.pickup_point
    if event.status == types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
        if not event.HasField("pickup_point") or not point.id:
            return Problem("pickup_point.id", "pickup_point.id is required for AVAILABLE_FOR_PICKUP")
        if not point.HasField("deadline"):
            return Problem(
                "pickup_point.deadline", "pickup_point.deadline is required for AVAILABLE_FOR_PICKUP"
            )
    if not event.HasField("pickup_point"):
        return None
    # Checked whatever the status: the event is kept in the timeline, pickup point included.
    problem = (
        _text(point.id, "pickup_point.id", MAX_NAME)
        or _text(point.name, "pickup_point.name", MAX_NAME)
        or _text(point.opening_hours, "pickup_point.opening_hours", MAX_OPENING_HOURS)
        or _address(point.address)
    )
    if problem is None and point.HasField("deadline"):
        return _near(point.deadline, "pickup_point.deadline", now_ms)
    return problem


def _occurred(event: tracking_pb2.TrackingEvent, now_ms: int) -> Problem | None:
    if not event.HasField("occurred_at"):
        return Problem("occurred_at", "occurred_at is required")
    problem = _nanos(event.occurred_at, "occurred_at")
    if problem is not None:
        return problem
    occurred_ms = stamp_ms(event.occurred_at)
    if occurred_ms < MIN_OCCURRED_MS:
        return Problem("occurred_at", "occurred_at is before 2000-01-01")
    if occurred_ms > now_ms + MAX_FUTURE_MS:
        return Problem("occurred_at", "occurred_at is more than 10 minutes in the future")
    return None


def check_parcel_id(parcel_id: str) -> Problem | None:
    """A parcel id as events, registrations and GetParcel must give it: an id no parcel can have is
    INVALID_ARGUMENT everywhere, never NOT_FOUND."""
    return _ident(parcel_id, "parcel_id", 64)


def check_event(event: tracking_pb2.TrackingEvent, now_ms: int) -> Problem | None:
    """The first problem of ``event``, or None when it can be applied."""
    if event.status not in _STATUSES:
        return Problem("status", "status is required (a TRACKING_STATUS_* value)")
    if event.exception_reason not in _REASONS:
        return Problem("exception_reason", "exception_reason is not an EXCEPTION_REASON_* value")
    return (
        _ident(event.event_id, "event_id", 128)
        or check_parcel_id(event.parcel_id)
        or _ident(event.carrier, "carrier", 64)
        or _occurred(event, now_ms)
        or _text(event.substatus, "substatus", 64)
        or _text(event.description, "description", 256)
        or _location(event.location)
        or _window(event, now_ms)
        or _pickup(event, now_ms)
    )


def _promised(date: types_pb2.LocalDate, now_ms: int) -> Problem | None:
    try:
        day = dt.date(date.year, date.month, date.day)
    except ValueError:
        return Problem("order.promised_date", "order.promised_date is not a calendar date")
    today = dt.datetime.fromtimestamp(now_ms // 1000, dt.UTC).date()
    if abs((day - today).days) > MAX_DISTANCE_DAYS:
        return Problem(
            "order.promised_date", f"order.promised_date is more than {MAX_DISTANCE_DAYS} days from today"
        )
    return None


def _order(order: parcel_pb2.OrderFacts, now_ms: int) -> Problem | None:
    if order.HasField("declared_value"):
        value = order.declared_value
        if not _CURRENCY.fullmatch(value.currency_code):
            return Problem("order.declared_value.currency_code", "currency_code must be an ISO 4217 code")
        if value.amount_minor < 0:
            return Problem("order.declared_value.amount_minor", "amount_minor must not be negative")
    if order.HasField("promised_date"):
        problem = _promised(order.promised_date, now_ms)
        if problem is not None:
            return problem
    return _text(order.order_reference, "order.order_reference", 64)


def check_registration(parcel: parcel_pb2.ParcelRegistration, now_ms: int) -> Problem | None:
    """The first problem of ``parcel``, or None when it can be registered."""
    return (
        check_parcel_id(parcel.parcel_id)
        or _ident(parcel.merchant_id, "merchant_id", 128)
        or _ident(parcel.carrier, "carrier", 64)
        or _ident(parcel.recipient_id, "recipient_id", 128)
        or _order(parcel.order, now_ms)
    )
