"""The daily counters a parcel's own change adds: shipped, delivered (on time or late) and exceptions by
reason, each once per parcel. Built here and written by the same apply-script entry that writes the
parcel (``engine.state``), so they never depend on the alert hook running, and a replayed batch (the
parcel's ``ct`` field lists what was counted) counts nothing twice.

Markers: ``ship``, ``dlv`` and ``x:<event id>``. A parcel without a merchant (scanned before it was
registered) is not counted yet: its counts land under the merchant once registration writes it.
"""

from __future__ import annotations

from common import counters
from common.counters import Increment
from engine.alert_rules import ParcelFacts

SHIP, DLV, EXC_PREFIX = "ship", "dlv", "x:"
# Event ids are printable ASCII without spaces (engine.validation): a space never occurs in a marker.
SEP = " "


def parse_counted(raw: bytes | None) -> frozenset[str]:
    """Field ``ct`` as ``count_change`` wrote it."""
    return frozenset(raw.decode().split(SEP)) if raw else frozenset()


def count_change(
    shard: int, facts: ParcelFacts, counted: frozenset[str]
) -> tuple[list[Increment], str | None]:
    """The increments the parcel's facts add beyond ``counted``, on the day each thing happened, and
    the new ``ct`` value (None: nothing new to count)."""
    merchant = facts.merchant_id
    if not merchant or facts.shipped_ms is None:
        return [], None
    incs: list[Increment] = []
    new: list[str] = []
    if SHIP not in counted:
        incs += counters.shipped(shard, merchant, facts.shipped_ms)
        new.append(SHIP)
    if facts.delivered_ms is not None and DLV not in counted:
        incs += counters.delivered(shard, merchant, facts.delivered_ms, facts.promised_date)
        new.append(DLV)
    for trouble in facts.trouble_events:
        if EXC_PREFIX + trouble.event_id not in counted:
            incs += counters.exception(shard, merchant, trouble.occurred_ms, trouble.reason)
            new.append(EXC_PREFIX + trouble.event_id)
    if not new:
        return [], None
    return incs, SEP.join(sorted(counted.union(new)))
