"""Counts of what a load generator did, in events and messages, not only requests.

Locust counts requests: a batch of 500 events is one. A ``Tally`` counts what is inside (events
sent, accepted, duplicates, rejected; parcels registered; reads and preference updates) and travels
from Locust workers to the master as a plain dict of deltas, where the totals are summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(slots=True)
class Tally:
    batches: int = 0
    events_sent: int = 0
    events_accepted: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    batch_failures: int = 0
    # StreamEvents calls that ended in an error: that carrier's remaining events were never sent.
    streams_broken: int = 0
    parcels_registered: int = 0
    parcels_rejected: int = 0
    parcel_reads: int = 0
    preference_updates: int = 0
    call_failures: int = 0
    # Wall-clock span of the event traffic, unix seconds (0: not yet): first send, last ack.
    first_send_s: float = 0.0
    last_ack_s: float = 0.0

    def add(self, other: dict[str, float]) -> None:
        """Fold in a worker's report (counts add up, the span widens)."""
        for f in fields(self):
            value = other.get(f.name)
            if value is None:
                continue
            if f.name == "first_send_s":
                if value and (not self.first_send_s or value < self.first_send_s):
                    self.first_send_s = value
            elif f.name == "last_ack_s":
                self.last_ack_s = max(self.last_ack_s, value)
            else:
                setattr(self, f.name, getattr(self, f.name) + int(value))

    def take(self) -> dict[str, float]:
        """The counts so far as a report, and reset to zero (the span is kept: it is not additive)."""
        report: dict[str, float] = asdict(self)
        for f in fields(self):
            if f.name not in {"first_send_s", "last_ack_s"}:
                setattr(self, f.name, 0)
        return report

    def snapshot(self) -> dict[str, float]:
        return asdict(self)

    @property
    def event_seconds(self) -> float:
        return max(0.0, self.last_ack_s - self.first_send_s) if self.first_send_s else 0.0

    @property
    def events_per_s(self) -> float:
        seconds = self.event_seconds
        return (self.events_accepted + self.events_duplicate) / seconds if seconds > 0 else 0.0
