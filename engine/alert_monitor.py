"""The engine's alert hook: evaluate the rules on parcels that changed or whose check timer is due,
and apply the verdicts to the store.

The engine calls ``check`` after it applied a batch (with the parcels' facts as they now stand); the
scheduler calls ``on_timer`` when a parcel's ``<parcel_id>:CHECK_ALERTS`` member of its shard's due
set is due, and the monitor re-reads that parcel through ``load_facts``. Alerts never plan recipient
notices: DELAYED and EXCEPTION notices are the engine's planning alone, so nothing is sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from common.clock import Clock
from engine.alert_rules import AlertConfig, Evaluation, ParcelFacts, evaluate
from engine.alert_store import CHECK_TIMER, AlertStore, Changes

log = logging.getLogger(__name__)

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

    async def on_timer(self, shard: int, parcel_id: str, name: str) -> None:
        """The scheduler's handler for ``CHECK_ALERTS`` timers."""
        if name != CHECK_TIMER:
            return
        if self._load_facts is None:
            raise RuntimeError("AlertMonitor.on_timer needs a load_facts function")
        facts = await self._load_facts(shard, [parcel_id])
        if parcel_id in facts:
            await self.check([facts[parcel_id]], timer_fired=True)
