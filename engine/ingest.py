"""Applying a batch of tracking events: validate each, fold them into their parcels, plan, write.

Bad events are rejected by index and the rest applied. Unknown parcels are accepted (carriers scan
before merchants register); duplicates (same ``event_id``) change nothing. A carrier's events for a
parcel another carrier carries are rejected (``engine.auth.confined_carrier``). The whole batch costs a
constant number of Redis round trips (see ``engine.state.ParcelStore.update``); each parcel's state is
decoded and encoded once per batch, whatever its number of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import NoOpTracer, Tracer
from relais.v1 import tracking_pb2

from common.clock import Clock
from common.telemetry import Metrics
from engine.auth import Principal, can_post_for_carrier, confined_carrier, current_principal
from engine.state import ParcelRecord, ParcelStore, apply_event, seen_event_ids
from engine.validation import check_event


@dataclass(slots=True)
class _Tally:
    accepted: int = 0
    duplicates: int = 0


class Ingestor:
    """Applies batches of events; safe to call concurrently (parcels are guarded by their version)."""

    def __init__(
        self, store: ParcelStore, clock: Clock, metrics: Metrics | None = None, tracer: Tracer | None = None
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.tracer = tracer or NoOpTracer()

    def _screen(
        self, events: Sequence[tracking_pb2.TrackingEvent], principal: Principal | None
    ) -> tuple[dict[str, list[tracking_pb2.TrackingEvent]], list[tracking_pb2.RejectedEvent]]:
        now_ms = self.clock.now_ms()
        by_parcel: dict[str, list[tracking_pb2.TrackingEvent]] = defaultdict(list)
        rejected: list[tracking_pb2.RejectedEvent] = []
        for index, event in enumerate(events):
            problem = check_event(event, now_ms)
            if problem is not None:
                rejected.append(
                    tracking_pb2.RejectedEvent(
                        index=index,
                        code=tracking_pb2.REJECT_CODE_INVALID_ARGUMENT,
                        field=problem.field,
                        reason=problem.reason,
                        event_id=event.event_id[:128],
                    )
                )
            elif not can_post_for_carrier(event.carrier, principal):
                rejected.append(
                    _denied(index, event, "carrier", "the caller may not post events for this carrier")
                )
            else:
                by_parcel[event.parcel_id].append(event)
        return by_parcel, rejected

    async def apply(self, batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck:
        """Apply one batch and say what became of each event."""
        # One span per batch, counts only: events carry ids, never worth a span attribute.
        with self.tracer.start_as_current_span("ingest.batch") as span:
            ack = await self._apply(batch)
            span.set_attribute("relais.events", len(batch.events))
            span.set_attribute("relais.events.accepted", ack.accepted)
            span.set_attribute("relais.events.rejected", len(ack.rejected))
            return ack

    async def _apply(self, batch: tracking_pb2.EventBatch) -> tracking_pb2.BatchAck:
        principal = current_principal()
        by_parcel, rejected = self._screen(batch.events, principal)
        confined = confined_carrier(principal)
        tallies: dict[str, _Tally] = {}
        # Parcels another carrier carries, whose events are refused (a caller confined to its own).
        foreign: set[str] = set()

        def mutate(record: ParcelRecord) -> bool:
            # Called again for a parcel whose write conflicted: the tally starts over.
            tally = tallies[record.parcel_id] = _Tally()
            state = record.state
            if confined is not None and state.carrier and state.carrier != confined:
                foreign.add(record.parcel_id)
                return False
            if foreign:
                foreign.discard(record.parcel_id)  # registered to this carrier since an earlier attempt
            received_ms = self.clock.now_ms()
            seen = seen_event_ids(state)
            for event in by_parcel[record.parcel_id]:
                if apply_event(state, event, received_ms, seen):
                    tally.accepted += 1
                else:
                    tally.duplicates += 1
            return tally.accepted > 0

        if by_parcel:
            await self.store.update(list(by_parcel), mutate)
        accepted = sum(t.accepted for t in tallies.values())
        duplicates = sum(t.duplicates for t in tallies.values())
        if foreign:
            rejected += _foreign_rejections(batch.events, foreign, {r.index for r in rejected})
            rejected.sort(key=lambda r: r.index)
        if self.metrics is not None:
            self.metrics.events_applied(accepted=accepted, duplicates=duplicates, rejected=len(rejected))
        return tracking_pb2.BatchAck(
            seq=batch.seq, accepted=accepted, duplicates=duplicates, rejected=rejected
        )


def _foreign_rejections(
    events: Sequence[tracking_pb2.TrackingEvent], foreign: set[str], already: set[int]
) -> list[tracking_pb2.RejectedEvent]:
    # Found again by a pass over the batch: rare, so the common path keeps no index per event. An
    # event rejected at screening (``already``) is not rejected twice.
    reason = "the parcel is carried by another carrier"
    return [
        _denied(index, event, "parcel_id", reason)
        for index, event in enumerate(events)
        if event.parcel_id in foreign and index not in already
    ]


def _denied(
    index: int, event: tracking_pb2.TrackingEvent, field: str, reason: str
) -> tracking_pb2.RejectedEvent:
    return tracking_pb2.RejectedEvent(
        index=index,
        code=tracking_pb2.REJECT_CODE_PERMISSION_DENIED,
        field=field,
        reason=reason,
        event_id=event.event_id,
    )
