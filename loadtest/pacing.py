"""How one carrier paces its parcels: groups advance a stage at a time, a gap apart.

A real parcel's events are hours apart; a load test compresses that to ``gap_s`` so a group's next
event is sent only after the engine and the gateway had time to act on the previous one (a slot
notice sent before delivery cancels it). A carrier keeps up to ``max_groups`` groups on the move and
sends whichever is ready; it starts a new group when none is and the budget allows. Pure: the caller
owns the clock and the sleeping, so tests drive it with plain numbers.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from loadtest.journeys import EventBudget, Group, JourneyFactory


@dataclass(frozen=True, slots=True)
class Send:
    """Send the group's next stage; ``new`` when the group was just started (register it first).
    ``planned_s``: when it was due (the caller's clock): a send that had to wait for the system is
    timed from then, not from when it went out."""

    group: Group
    new: bool
    planned_s: float


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing is ready: come back after this many seconds."""

    seconds: float


@dataclass(slots=True)
class StagePlanner:
    factory: JourneyFactory
    budget: EventBudget
    parcels_per_group: int
    gap_s: float
    max_groups: int
    _waiting: list[tuple[float, int, Group]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.parcels_per_group < 1 or self.max_groups < 1 or self.gap_s < 0:
            raise ValueError("a carrier needs at least one parcel per group, one group and a gap >= 0")

    @property
    def active(self) -> int:
        return len(self._waiting)

    def next(self, now_s: float) -> Send | Wait | None:
        """What to do at ``now_s``: send a stage, wait, or None once every journey is over."""
        if self._waiting and self._waiting[0][0] <= now_s:
            planned_s, _, group = heapq.heappop(self._waiting)
            return Send(group, new=False, planned_s=planned_s)
        if len(self._waiting) < self.max_groups:
            started = self.budget.take_group(self.factory, self.parcels_per_group)
            if started is not None:
                return Send(started, new=True, planned_s=now_s)
        if self._waiting:
            return Wait(self._waiting[0][0] - now_s)
        return None

    def sent(self, group: Group, now_s: float) -> None:
        """The caller sent ``group.next_batch`` (its stage advanced): schedule its next stage."""
        if not group.done:
            heapq.heappush(self._waiting, (now_s + self.gap_s, next(self._order), group))
