"""What engine and gateway both know of a delivery slot: its bounds, when a move is worth a
correction, and the parcel hash's record of the slot notice last sent (settle.lua's ``told``, read by
the engine to plan from and by the gateway to name in a correction)."""

from __future__ import annotations

from relais.v1 import types_pb2

from common.clock import stamp_ms

# The parcel hash's record of the slot notice last sent: the Slot sent, and the recipient it was sent
# to (``tv``, its version, is only read by the script).
TOLD_SLOT_FIELD = "ts"
TOLD_TO_FIELD = "tr"


def window_ms(window: types_pb2.TimeWindow) -> tuple[int, int]:
    return stamp_ms(window.start), stamp_ms(window.end)


def within_threshold(told: types_pb2.TimeWindow, new: types_pb2.TimeWindow, threshold_ms: int) -> bool:
    """No correction is worth sending: ``new`` lies inside ``told``, or both ends moved <= threshold."""
    told_start, told_end = window_ms(told)
    new_start, new_end = window_ms(new)
    inside = told_start <= new_start and new_end <= told_end
    return inside or (abs(new_start - told_start) <= threshold_ms and abs(new_end - told_end) <= threshold_ms)


def told_slot(raw_slot: bytes | None, raw_to: bytes | None, recipient_id: str) -> types_pb2.Slot | None:
    """The slot last sent to ``recipient_id`` about a parcel, from its told record; None if none."""
    if raw_slot is None or raw_to is None or raw_to.decode() != recipient_id:
        return None
    return types_pb2.Slot.FromString(raw_slot)
