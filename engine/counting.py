"""The daily counters a parcel's own change adds: shipped, delivered (on time or late) and exceptions by
reason, each once per parcel. Built here and written by the same apply-script entry that writes the
parcel (``engine.state``), so they never depend on the alert hook running, and a replayed batch (the
parcel's ``ct`` field lists what was counted) counts nothing twice.

Markers: ``ship``, ``dlv`` and ``x:<event id>``. A parcel without a merchant (scanned before it was
registered) is not counted yet: its counts land under the merchant once registration writes it.
"""

from __future__ import annotations

from datetime import date

from relais.v1 import state_pb2, types_pb2

from common import counters
from common.counters import Increment
from engine.validation import stamp_ms

TROUBLE = (types_pb2.TRACKING_STATUS_EXCEPTION, types_pb2.TRACKING_STATUS_ATTEMPT_FAIL)
DELIVERED = types_pb2.TRACKING_STATUS_DELIVERED
SHIP, DLV, EXC_PREFIX = "ship", "dlv", "x:"
# Event ids are printable ASCII without spaces (engine.validation): a space never occurs in a marker.
SEP = " "


def parse_counted(raw: bytes | None) -> frozenset[str]:
    """Field ``ct`` as ``count_change`` wrote it."""
    return frozenset(raw.decode().split(SEP)) if raw else frozenset()


def promised_date(state: state_pb2.ParcelState) -> date | None:
    """The order's promised day; None when unset or not a real date."""
    if not state.order.HasField("promised_date"):
        return None
    d = state.order.promised_date
    try:
        return date(d.year, d.month, d.day)
    except ValueError:
        return None


def count_change(
    shard: int, state: state_pb2.ParcelState, counted: frozenset[str]
) -> tuple[list[Increment], str | None]:
    """The increments this state adds beyond ``counted``, on the day each thing happened, and the new
    ``ct`` value (None: nothing new to count)."""
    if not state.merchant_id or not state.timeline:
        return [], None
    merchant = state.merchant_id
    incs: list[Increment] = []
    new: list[str] = []
    if SHIP not in counted:
        incs += counters.shipped(shard, merchant, stamp_ms(state.timeline[0].event.occurred_at))
        new.append(SHIP)
    if state.status == DELIVERED and DLV not in counted:
        incs += counters.delivered(shard, merchant, state.status_occurred_ms, promised_date(state))
        new.append(DLV)
    for entry in state.timeline:
        event = entry.event
        if event.status in TROUBLE and EXC_PREFIX + event.event_id not in counted:
            incs += counters.exception(shard, merchant, stamp_ms(event.occurred_at), event.exception_reason)
            new.append(EXC_PREFIX + event.event_id)
    if not new:
        return [], None
    return incs, SEP.join(sorted(counted.union(new)))
