"""The engine's alert hook: evaluate the rules on parcels that changed or whose check timer is due,
and apply the verdicts to the store.

The engine calls ``check`` after it applied a batch (with the parcels' facts as they now stand); the
scheduler calls ``on_timer`` when a parcel's ``<parcel_id>:CHECK_ALERTS`` member of its shard's due
set is due, and the monitor re-reads that parcel through ``load_facts``. Alerts never plan recipient
notices: DELAYED and EXCEPTION notices are the engine's planning alone, so nothing is sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import date

from relais.v1 import state_pb2, types_pb2

from common.clock import Clock
from engine.alert_rules import AlertConfig, Evaluation, ParcelFacts, TroubleEvent, evaluate
from engine.alert_store import CHECK_TIMER, AlertStore, Changes

log = logging.getLogger(__name__)

TROUBLE = (types_pb2.TRACKING_STATUS_EXCEPTION, types_pb2.TRACKING_STATUS_ATTEMPT_FAIL)


def _promised(state: state_pb2.ParcelState) -> date | None:
    if not state.order.HasField("promised_date"):
        return None
    d = state.order.promised_date
    try:
        return date(d.year, d.month, d.day)
    except ValueError:
        return None


def facts_from_state(state: state_pb2.ParcelState) -> ParcelFacts:
    """The one adapter from the engine's ``ParcelState`` to what the rules and counters need."""
    timeline = [entry.event for entry in state.timeline]  # oldest first by occurred_at
    occurred = [event.occurred_at.ToMilliseconds() for event in timeline]
    scans = [
        ms
        for event, ms in zip(timeline, occurred, strict=True)
        if event.status != types_pb2.TRACKING_STATUS_INFO_RECEIVED
    ]
    pickup_since_ms = None
    if state.status == types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
        # The start of the latest run of AVAILABLE_FOR_PICKUP events: a carrier's daily reminder
        # scan does not restart the wait.
        for event, ms in zip(reversed(timeline), reversed(occurred), strict=True):
            if event.status != types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
                break
            pickup_since_ms = ms
    last = timeline[-1] if timeline else None
    return ParcelFacts(
        parcel_id=state.parcel_id,
        merchant_id=state.merchant_id,
        status=state.status,
        exception_reason=state.exception_reason,
        created_ms=state.created_ms,
        first_scan_ms=min(scans) if scans else None,
        last_event_ms=occurred[-1] if occurred else None,
        last_facility=(last.location.facility or last.location.city) if last is not None else "",
        pickup_since_ms=pickup_since_ms,
        pickup_deadline_ms=state.pickup_point.deadline.ToMilliseconds()
        if state.pickup_point.HasField("deadline")
        else None,
        promised_date=_promised(state),
        shipped_ms=occurred[0] if occurred else None,
        delivered_ms=state.status_occurred_ms
        if state.status == types_pb2.TRACKING_STATUS_DELIVERED
        else None,
        trouble_events=tuple(
            TroubleEvent(event.event_id, event.exception_reason, ms)
            for event, ms in zip(timeline, occurred, strict=True)
            if event.status in TROUBLE
        ),
    )


# Reads the current facts of parcels of one shard; parcels relais no longer knows are left out.
FactsLoader = Callable[[int, Sequence[str]], Awaitable[Mapping[str, ParcelFacts]]]


class AlertMonitor:
    def __init__(
        self, store: AlertStore, config: AlertConfig, clock: Clock, load_facts: FactsLoader | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._load_facts = load_facts

    def evaluate(self, facts: ParcelFacts, now_ms: int) -> Evaluation:
        return evaluate(facts, now_ms, self._config.thresholds_for(facts.merchant_id))

    async def check(self, facts: Sequence[ParcelFacts], *, timer_fired: bool = False) -> dict[str, Changes]:
        """Open, resolve and reschedule alerts of these parcels: two round trips for the batch.

        Parcels without a merchant (scanned before registration) have no team to alert: skipped
        until they are registered.
        """
        now_ms = self._clock.now_ms()
        verdicts = [(f, self.evaluate(f, now_ms)) for f in facts if f.merchant_id]
        if not verdicts:
            return {}
        changes = await self._store.apply(verdicts, now_ms, timer_fired=timer_fired)
        opened = sum(len(c.opened) for c in changes.values())
        resolved = sum(len(c.resolved) for c in changes.values())
        if opened or resolved:
            log.debug("alerts: %d opened, %d resolved over %d parcels", opened, resolved, len(verdicts))
        return changes

    async def on_states(self, states: Iterable[state_pb2.ParcelState]) -> None:
        """The engine's hook after it wrote parcels (events applied, registrations merged)."""
        await self.check([facts_from_state(state) for state in states])

    async def on_timer(self, shard: int, parcel_id: str, name: str) -> None:
        """The scheduler's handler for ``CHECK_ALERTS`` timers."""
        if name != CHECK_TIMER:
            return
        if self._load_facts is None:
            raise RuntimeError("AlertMonitor.on_timer needs a load_facts function")
        facts = await self._load_facts(shard, [parcel_id])
        if parcel_id in facts:
            await self.check([facts[parcel_id]], timer_fired=True)
