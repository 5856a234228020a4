"""The engine's alert hook: evaluate the rules on parcels that changed or whose check timer is due,
and apply the verdicts to the store.

The engine calls ``check`` after it applied a batch (with the parcels' facts as they now stand); the
scheduler calls ``on_timer`` when a parcel's ``<parcel_id>:CHECK_ALERTS`` member of its shard's due
set is due, and the monitor re-reads that parcel through ``load_facts``. Alerts never plan recipient
notices: DELAYED and EXCEPTION notices are the engine's planning alone, so nothing is sent twice.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from relais.v1 import state_pb2

from common.clock import Clock
from engine.alert_rules import AlertConfig, Evaluation, ParcelFacts, evaluate
from engine.alert_store import CHECK_TIMER, AlertStore, Changes
from engine.facts import facts_from_state

log = logging.getLogger(__name__)

WRITTEN_MAX = 100_000


class Updated(Protocol):
    """A parcel the engine just wrote (``engine.state.ParcelRecord``): its state, alert mark and, when
    the write counted with them, its facts."""

    @property
    def state(self) -> state_pb2.ParcelState: ...

    @property
    def parcel_id(self) -> str: ...

    @property
    def alert_mark(self) -> str: ...

    @property
    def facts(self) -> ParcelFacts | None: ...


def outcome_digest(facts: ParcelFacts, ev: Evaluation, expiry: str = "") -> str:
    """What applying a verdict leaves in the alert store, timer aside: the same digest twice means the
    second apply would open or resolve nothing (CRC-32: a collision only skips one apply). The daily
    counters are not in it: the parcel's own write counts them (``engine.counting``). ``expiry`` (see
    ``expiry_epoch``) is in it, while alerts are open, because an apply also moves the alerts' TTL to
    the parcel's."""
    firing = ev.firing  # mostly none: no generator, sort and tuple built for nothing
    digest = _digest(facts.merchant_id, tuple(sorted(f.kind for f in firing)) if firing else ())
    return f"{digest}@{expiry}" if expiry else digest


def expiry_epoch(state: state_pb2.ParcelState) -> str:
    """What the engine set the parcel hash's TTL from (``engine.state.change_of``): a finished
    parcel's expiry, or the UTC day an active one's was last pushed back. When it changes, the
    parcel's alerts must be written once so their TTL follows, or they would expire first."""
    return f"x{state.expires_ms}" if state.expires_ms else f"d{state.idle_ttl_day}"


@functools.lru_cache(maxsize=4096)
def _digest(merchant_id: str, firing: tuple[int, ...]) -> str:
    # Cached: a batch's parcels have the same few merchants and mostly nothing firing.
    return f"{zlib.crc32(repr((merchant_id, list(firing))).encode()):08x}"


def make_mark(next_check_ms: int, digest: str) -> str:
    """The parcel hash's alert mark (field ``am``): the check timer as written, and the digest."""
    return f"{next_check_ms}:{digest}"


def settled(mark: str, digest: str, next_check_ms: int, now_ms: int) -> bool:
    """Nothing to write: same outcome as last applied, and the recorded check timer fires no later
    than needed (an early one only re-evaluates the parcel and arms the next: cheaper than moving
    the timer on every event)."""
    timer, _, last = mark.partition(":")
    if last != digest or not timer.isdigit():
        return False
    timer_ms = int(timer)
    early_enough = not next_check_ms or timer_ms <= next_check_ms
    return timer_ms == next_check_ms or (now_ms < timer_ms and early_enough)


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
        # parcel id -> (the mark a hook read, the mark it wrote). The engine runs the next update of a
        # parcel while its previous hook still works, so that update may read the mark from before the
        # hook wrote: then the written one is the current one. Bounded: cleared when it grows large.
        self._written: dict[str, tuple[str, str]] = {}

    def evaluate(self, facts: ParcelFacts, now_ms: int) -> Evaluation:
        return evaluate(facts, now_ms, self._config.thresholds_for(facts.merchant_id))

    async def check(
        self,
        facts: Sequence[ParcelFacts],
        *,
        timer_fired: bool = False,
        marks: Mapping[str, str] | None = None,
        expiries: Mapping[str, str] | None = None,
    ) -> dict[str, Changes]:
        """Open, resolve and reschedule alerts of these parcels: two round trips for the batch.

        Parcels without a merchant (scanned before registration) have no team to alert: skipped
        until they are registered. With ``marks`` (each parcel's alert mark as read with it), parcels
        whose verdict is settled are skipped, and the others' marks are written with their alerts.
        ``expiries`` (each parcel's ``expiry_epoch``) unsettles a parcel whose TTL moved.
        """
        now_ms = self._clock.now_ms()
        verdicts = [(f, self.evaluate(f, now_ms)) for f in facts if f.merchant_id]
        new_marks: dict[str, str] | None = None
        if marks is not None:
            new_marks = {}
            unsettled = []
            for f, ev in verdicts:
                # Only open alerts must not expire before their parcel: a parcel with none (nearly
                # all) is not written again each time its expiry moves, only its mark is compared.
                expiry = (expiries or {}).get(f.parcel_id, "") if ev.firing else ""
                digest = outcome_digest(f, ev, expiry)
                next_ms = ev.next_check_ms or 0
                if timer_fired or not settled(marks.get(f.parcel_id, ""), digest, next_ms, now_ms):
                    new_marks[f.parcel_id] = make_mark(next_ms, digest)
                    unsettled.append((f, ev))
            verdicts = unsettled
        if not verdicts:
            return {}
        changes = await self._store.apply(verdicts, now_ms, timer_fired=timer_fired, marks=new_marks)
        if marks is not None and new_marks:
            if len(self._written) > WRITTEN_MAX:
                self._written.clear()
            for pid, mark in new_marks.items():
                self._written[pid] = (marks.get(pid, ""), mark)
        opened = sum(len(c.opened) for c in changes.values())
        resolved = sum(len(c.resolved) for c in changes.values())
        if opened or resolved:
            log.debug("alerts: %d opened, %d resolved over %d parcels", opened, resolved, len(verdicts))
        return changes

    async def on_states(self, records: Sequence[Updated]) -> None:
        """The engine's hook after it wrote parcels (events applied, registrations merged): only the
        parcels whose alerts could change cost round trips."""
        marks: dict[str, str] = {}
        expiries: dict[str, str] = {}
        facts: list[ParcelFacts] = []
        for record in records:
            pid, mark = record.parcel_id, record.alert_mark
            written = self._written.pop(pid, None)
            if written is not None and written[0] == mark:
                mark = written[1]  # read before this process's previous hook wrote it
            marks[pid] = mark
            expiries[pid] = expiry_epoch(record.state)
            # Facts come with every parcel written with a merchant; read ones only are mapped here.
            found = record.facts
            if found is None and record.state.merchant_id:
                found = facts_from_state(record.state)
            if found is not None:
                facts.append(found)
        await self.check(facts, marks=marks, expiries=expiries)

    async def on_timer(self, shard: int, parcel_id: str, name: str) -> None:
        """The scheduler's handler for ``CHECK_ALERTS`` timers."""
        if name != CHECK_TIMER:
            return
        if self._load_facts is None:
            raise RuntimeError("AlertMonitor.on_timer needs a load_facts function")
        facts = await self._load_facts(shard, [parcel_id])
        if parcel_id in facts:
            await self.check([facts[parcel_id]], timer_fired=True)
