"""A parcel's state and how it is kept in Redis.

The parcel hash (``keys.parcel``) holds ``v`` (version), ``s`` (``ParcelState`` protobuf, without what
``load_state`` derives), ``q`` (kinds the engine scheduled), ``am`` (the alert monitor's mark, see
``engine.alert_monitor.settled``), ``ct`` (what the daily counters counted, see ``engine.counting``)
and per notice kind ``n:``/``nv:``/``ns:`` (body, version, withdrawal)
beside the gateway's ``a:`` (attempts). Redis should keep it as a listpack (``hash-max-listpack-value``
4096, see README). ``ParcelStore.update`` is the one way the engine changes parcels:

1. read every parcel of the call, all shards' read scripts pipelined in ONE round trip (a re-plan
   also reads the pending notices' bodies, in the same scripts);
2. let the caller change each state (apply events, merge a registration);
3. read the recipients' preferences (one pipelined round trip, only when someone is to be told);
4. plan the notices (``engine.planner``, pure) and write each shard's parcels with ONE apply-script
   call per shard, all pipelined in ONE round trip, under an optimistic version check, with the
   parcel's daily counter increments;
5. re-read and re-plan only the parcels whose version moved meanwhile;
6. hand the records to ``after_update`` (the alert monitor) outside the parcels' turn, in update
   order per parcel.

A batch therefore costs a constant number of round trips whatever its size.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, state_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import Clock, stamp_ms
from common.counters import Increment
from common.errors import RelaisError
from common.keys import kind_name
from common.redis_client import lua_array, register
from common.settings import Settings
from common.slots import told_slot
from common.telemetry import inject_trace_context
from engine.alert_rules import ParcelFacts
from engine.counting import count_change, parse_counted
from engine.facts import facts_from_state
from engine.planner import Audience, Plan, PlanRules, plan
from engine.turns import Turns
from engine.validation import set_stamp_ms

FINISHED = frozenset(
    {
        types_pb2.TRACKING_STATUS_DELIVERED,
        types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER,
        types_pb2.TRACKING_STATUS_EXPIRED,
    }
)
DAY_MS = 86_400_000
# Events a parcel's timeline keeps: its first and the latest ones. Real journeys have 5 to 60 scans;
# a feed stuck in a loop must not grow one parcel without bound, since every batch reads and writes
# its whole state and GetParcel returns it (6,000 events made a 1.1 MB view taking 55 ms).
MAX_TIMELINE_EVENTS = 200
# Re-reads after version conflicts before a call gives up (the caller may retry: it is idempotent).
MAX_ATTEMPTS = 10
# Between attempts, a random pause up to this, doubling from the first: writers that conflicted once
# would collide again if they re-read at once (four processes on the same 200 parcels aborted one batch
# in six without it). At most ~0.2 s in all before a call gives up.
CONFLICT_BACKOFF_S = 0.004
CONFLICT_BACKOFF_MAX_S = 0.128
# Parcels mutated or planned between two turns of the event loop: a batch of 500 is ~60 ms of CPU,
# and a GetParcel arriving meanwhile should not wait for all of it (nor for every batch queued).
YIELD_EVERY = 64

F_VERSION = b"v"
F_STATE = keys.PARCEL_STATE_FIELD.encode()
F_SCHEDULED = b"q"
F_COUNTED = b"ct"


def body_field(name: str) -> str:
    return "n:" + name


def version_field(name: str) -> str:
    return "nv:" + name


def withdrawn_field(name: str) -> str:
    return "ns:" + name


def attempts_field(name: str) -> str:
    return "a:" + name


class ConflictError(RelaisError, RuntimeError):
    """Parcels kept changing under the engine: the caller should retry the (idempotent) call."""


@dataclass(slots=True)
class ParcelRecord:
    """One parcel as read: its version, state and the notice kinds still in the due set."""

    parcel_id: str
    shard: int
    version: int
    state: state_pb2.ParcelState
    pending: frozenset[str]
    # The alert monitor's mark (field ``am``): what it last applied, so unchanged verdicts cost nothing.
    alert_mark: str = ""
    # What the daily counters already counted (field ``ct``, see ``engine.counting``).
    counted: frozenset[str] = frozenset()
    # The pending notices' bodies by kind name, as the gateway may have written them back (read for a
    # re-plan only, see ``ParcelStore.read``).
    bodies: Mapping[str, bytes] = field(default_factory=dict)
    # What planning decided, once the record was planned and written.
    plan: Plan | None = None
    # Its facts as written, for a parcel with a merchant (``engine.facts``): counted by ``change_of``,
    # then evaluated by the alert hook without a second pass over the timeline.
    facts: ParcelFacts | None = None

    @property
    def exists(self) -> bool:
        return self.version > 0


def seen_event_ids(state: state_pb2.ParcelState) -> set[str]:
    return {entry.event.event_id for entry in state.timeline}


def apply_event(
    state: state_pb2.ParcelState, event: tracking_pb2.TrackingEvent, received_ms: int, seen: set[str]
) -> bool:
    """Fold one valid event into the state; False for a duplicate (``seen`` holds the event ids)."""
    if event.event_id in seen:
        return False
    seen.add(event.event_id)
    occurred_ms = stamp_ms(event.occurred_at)
    timeline = state.timeline
    # Events mostly arrive in order: look for the place from the end.
    at = len(timeline)
    while at > 0 and stamp_ms(timeline[at - 1].event.occurred_at) > occurred_ms:
        at -= 1
    if not state.carrier:
        state.carrier = event.carrier
    # In order (the usual case) the entry is built in place: an insert would copy it once more.
    in_order = at == len(timeline)
    entry = timeline.add() if in_order else parcel_pb2.TimelineEntry()
    entry.event.CopyFrom(event)
    # Stored without what the parcel already says (its id, its carrier): ``add_full_timeline`` puts them
    # back for readers. A few dozen bytes per event, and parcels are many.
    stored = entry.event
    stored.ClearField("parcel_id")
    if stored.carrier == state.carrier:
        stored.ClearField("carrier")
    set_stamp_ms(entry.received_at, received_ms)
    if not in_order:
        timeline.insert(at, entry)
    if len(timeline) > MAX_TIMELINE_EVENTS:
        # The second goes: the first says when the journey began (the alert rules and counters read
        # it) and the last is the status event. An event dropped so and sent again is applied again
        # as an old one: it changes no status, and counters and notices remember what they counted.
        del timeline[1]
    if event.status != types_pb2.TRACKING_STATUS_INFO_RECEIVED:
        state.scanned = True
    if not state.created_ms:
        state.created_ms = received_ms
    state.updated_ms = received_ms
    if state.status == types_pb2.TRACKING_STATUS_UNSPECIFIED or occurred_ms >= state.status_occurred_ms:
        _set_status(state, event, occurred_ms)
    if event.HasField("delivery_window") and occurred_ms >= state.slot_occurred_ms:
        _set_slot(state, event.delivery_window, occurred_ms)
    return True


def add_full_timeline(
    state: state_pb2.ParcelState, timeline: MutableSequence[parcel_pb2.TimelineEntry]
) -> None:
    """Append the timeline to ``timeline``, each event with its parcel id and carrier as the carrier
    sent them (copied once, straight into the reply)."""
    timeline.extend(state.timeline)
    for entry in timeline:
        event = entry.event
        event.parcel_id = state.parcel_id
        if not event.carrier:
            event.carrier = state.carrier


def _set_status(state: state_pb2.ParcelState, event: tracking_pb2.TrackingEvent, occurred_ms: int) -> None:
    state.status = event.status
    state.substatus = event.substatus
    state.exception_reason = event.exception_reason
    state.status_event_id = event.event_id
    state.status_occurred_ms = occurred_ms
    if event.status == types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
        state.pickup_point.CopyFrom(event.pickup_point)
    else:
        state.ClearField("pickup_point")


def _set_slot(state: state_pb2.ParcelState, window: types_pb2.TimeWindow, occurred_ms: int) -> None:
    state.slot_occurred_ms = occurred_ms
    current = state.slot.window
    if state.HasField("slot") and current.start == window.start and current.end == window.end:
        return
    state.slot.window.CopyFrom(window)
    state.slot.version += 1


# Planning preferences by a digest of the stored bytes: a recipient's parcels recur batch after batch,
# and a changed preference is a new digest. Keyed by digest, not by the bytes, so no contact data
# outlives an erasure in this cache. Bounded: cleared when full.
_AUDIENCES: dict[bytes, Audience] = {}
_AUDIENCES_MAX = 16_384


def audience_of(raw: bytes | None) -> Audience | None:
    if raw is None:
        return None
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    audience = _AUDIENCES.get(digest)
    if audience is None:
        if len(_AUDIENCES) >= _AUDIENCES_MAX:
            _AUDIENCES.clear()
        prefs = preferences_pb2.RecipientPreferences.FromString(raw)
        audience = _AUDIENCES[digest] = Audience.from_preferences(prefs)
    return audience


@dataclass(slots=True)
class ParcelChange:
    """What one parcel's apply-script entry writes, every item already bytes."""

    expected_version: int
    ttl_ms: int
    checks: list[bytes] = field(default_factory=list)
    sets: list[bytes] = field(default_factory=list)
    dels: list[bytes] = field(default_factory=list)
    adds: list[bytes] = field(default_factory=list)
    rems: list[bytes] = field(default_factory=list)
    incs: list[Increment] = field(default_factory=list)
    # The earliest due time among ``adds`` (0 when none): what the write publishes to wake the scheduler.
    first_due_ms: int = 0

    def add_items(self, items: list[bytes | int], key_index: Callable[[str], int]) -> None:
        """Append the entry's items to the call's ``items``; ``key_index`` numbers a counter hash among
        the call's KEYS."""
        items += (
            b"%d" % self.expected_version,  # compared with the hash's ``v``, a string
            self.ttl_ms,
            len(self.checks),
            len(self.sets) // 2,
            len(self.dels),
            len(self.adds) // 2,
            len(self.rems),
            len(self.incs),
        )
        items += self.checks
        items += self.sets
        items += self.dels
        items += self.adds
        items += self.rems
        for inc in self.incs:
            items.append(key_index(inc.key))
            items += inc.words


@functools.cache
def _kind_fields(kind: types_pb2.NoticeKind.ValueType) -> tuple[bytes, bytes, bytes]:
    """A notice kind's body, version and withdrawn field names as the apply script takes them:
    encoded once per kind, not once per notice written."""
    name = kind_name(kind)
    return body_field(name).encode(), version_field(name).encode(), withdrawn_field(name).encode()


@functools.cache
def _reason(status: int) -> bytes:
    return notice_pb2.NoticeStatus.Name(status)[len("NOTICE_STATUS_") :].encode()  # type: ignore[arg-type]


def change_of(record: ParcelRecord, result: Plan, *, now_ms: int, settings: Settings) -> ParcelChange:
    """Turn a planned parcel into the fields, due-set moves and TTL its apply-script entry writes."""
    state = record.state
    if state.status in FINISHED:
        state.idle_ttl_day = 0
        if not state.expires_ms:
            state.expires_ms = now_ms + settings.retention_days * DAY_MS
        ttl_ms = max(state.expires_ms - now_ms, 1)
    else:
        state.expires_ms = 0
        # An active parcel expires once abandoned for the idle retention. Pushing that back on the
        # first write of each UTC day only (a day early at worst) spares Redis a PEXPIRE per event.
        today = now_ms // DAY_MS
        if state.idle_ttl_day == today:
            ttl_ms = 0
        else:
            state.idle_ttl_day = today
            ttl_ms = settings.engine.idle_retention_days * DAY_MS
    change = ParcelChange(expected_version=record.version, ttl_ms=ttl_ms)
    pid = record.parcel_id
    if result.checked:
        change.checks.extend(keys.notice_id(pid, kind_name(kind)).encode() for kind in result.checked)
    for notice in result.scheduled.values():
        body, version, withdrawn = _kind_fields(notice.kind)
        change.sets += [body, notice.SerializeToString(), version, b"%d" % notice.version]
        if notice.kind in result.revived:
            change.dels.append(withdrawn)
        due_ms = stamp_ms(notice.due_at)
        change.adds += [b"%d" % due_ms, notice.notice_id.encode()]
        if not change.first_due_ms or due_ms < change.first_due_ms:
            change.first_due_ms = due_ms
    for kind, status in result.withdrawn.items():
        body, version, withdrawn = _kind_fields(kind)
        change.sets += [withdrawn, _reason(status)]
        change.dels += [body, version]
        change.rems.append(keys.notice_id(pid, kind_name(kind)).encode())
    scheduled = ",".join(result.pending_names)
    change.sets += [
        F_STATE,
        stored_state(state),
        F_VERSION,
        b"%d" % (record.version + 1),
        F_SCHEDULED,
        scheduled.encode(),
    ]
    if state.merchant_id:
        record.facts = facts_from_state(state)
        change.incs, counted = count_change(record.shard, record.facts, record.counted)
        if counted is not None:
            change.sets += [F_COUNTED, counted.encode()]
    return change


def stored_state(state: state_pb2.ParcelState) -> bytes:
    """The state as field ``s`` keeps it, without what ``load_state`` derives: a parcel hash that
    stays under an allocator size class is worth a few dozen bytes per parcel tracked.

    Left out: the parcel id (the key says it) and what the status event says (it is always the
    timeline's last entry: events are inserted after every one that occurred no later, and only one
    that occurred no earlier sets the status). Cleared for the serialization and put back, field by
    field: this runs for every parcel written."""
    parcel_id, status_event_id = state.parcel_id, state.status_event_id
    timeline = state.timeline
    state.ClearField("parcel_id")
    if not timeline or timeline[-1].event.event_id != status_event_id:
        raw = state.SerializeToString()
        state.parcel_id = parcel_id
        return raw
    substatus, status_occurred_ms = state.substatus, state.status_occurred_ms
    state.ClearField("status_event_id")
    state.ClearField("substatus")
    state.ClearField("status_occurred_ms")
    raw = state.SerializeToString()
    state.parcel_id, state.status_event_id = parcel_id, status_event_id
    state.substatus, state.status_occurred_ms = substatus, status_occurred_ms
    return raw


def load_state(parcel_id: str, raw: bytes | None) -> state_pb2.ParcelState:
    """Field ``s`` as ``stored_state`` wrote it (an empty state when there is none), made whole."""
    state = state_pb2.ParcelState.FromString(raw) if raw else state_pb2.ParcelState()
    state.parcel_id = parcel_id
    if state.timeline and not state.status_event_id:
        last = state.timeline[-1].event
        state.status_event_id = last.event_id
        state.substatus = last.substatus
        state.status_occurred_ms = stamp_ms(last.occurred_at)
    return state


def parse_kinds(raw: bytes | None) -> frozenset[str]:
    """Notice kind names as the read scripts join them (``pending_kinds.lua``)."""
    return frozenset(raw.decode().split(",")) if raw else frozenset()


def parse_read(
    shard: int, parcel_ids: Sequence[str], reply: Sequence[Any], *, bodies: bool = False
) -> dict[str, ParcelRecord]:
    """The read script's reply (``read_parcels.lua``); ``bodies`` when it was asked for them."""
    records: dict[str, ParcelRecord] = {}
    width = 8 if bodies else 7
    for i, pid in enumerate(parcel_ids):
        at = width * i
        raw_version, raw_state, raw_pending, raw_mark, raw_counted, raw_told, told_to = reply[at : at + 7]
        state = load_state(pid, raw_state)
        told = told_slot(raw_told, told_to, state.recipient_id)
        if told is not None:
            # What the recipient read is what the gateway sent them (``told`` in settle.lua), not
            # what the scheduler handed over: that may fail, wait, or be retried.
            state.told_slot.CopyFrom(told.window)
            state.told_version = told.version
        mark = raw_mark.decode() if raw_mark else ""
        records[pid] = ParcelRecord(
            pid,
            shard,
            int(raw_version or 0),
            state,
            parse_kinds(raw_pending),
            mark,
            parse_counted(raw_counted),
        )
        if bodies and raw_pending:
            # In the order the script joined the pending kinds.
            kinds = raw_pending.decode().split(",")
            found = zip(kinds, reply[at + 7], strict=True)
            records[pid].bodies = {kind: raw for kind, raw in found if raw is not None}
    return records


def shard_call(shard: int, entries: Sequence[tuple[str, ParcelChange]]) -> tuple[list[str], bytes]:
    """The apply script's KEYS (due set, parcel hashes, then the counter hashes the entries name, each
    once) and its blob, for one shard's entries."""
    call_keys = [keys.due(shard), *(keys.parcel(shard, pid) for pid, _ in entries)]
    index: dict[str, int] = {}

    def key_index(key: str) -> int:
        if key not in index:
            call_keys.append(key)
            index[key] = len(call_keys)
        return index[key]

    # The apply script's one argument: one instead of dozens per parcel, because packing each
    # argument costs the client more than the whole script costs Redis.
    items: list[bytes | int] = []
    for _pid, change in entries:
        change.add_items(items, key_index)
    return call_keys, lua_array(items)


# Changes a parcel's state in place; False when nothing changed (nothing is written then).
Mutator = Callable[[ParcelRecord], bool]
# ``async hook(records)`` after an update wrote its parcels.
StatesHook = Callable[[Sequence[ParcelRecord]], Awaitable[None]]


class ParcelStore:
    """Reads, plans and writes parcels in a constant number of round trips per call."""

    def __init__(
        self, redis: Redis, settings: Settings, clock: Clock, *, after_update: StatesHook | None = None
    ) -> None:
        self.redis = redis
        # Called with the records of every parcel an update read (written or not, so a batch retried
        # after a failure repairs what the hook missed), in turn with the writes: the alert monitor.
        self.after_update = after_update
        self.settings = settings
        self.clock = clock
        self.rules = PlanRules.from_settings(settings.engine)
        self._read: AsyncScript = register(redis, "read_parcels")
        self._apply: AsyncScript = register(redis, "apply")
        # Round trips made so far: the tests check a batch costs a constant number.
        self.round_trips = 0
        # Parcels an update of this process is working on: concurrent batches of one process touching
        # the same parcel take turns instead of conflicting (version conflicts remain the guard
        # between processes).
        self._busy = Turns()
        # Parcels whose ``after_update`` hook is running: the next hook of a parcel waits its turn.
        self._hooking = Turns()

    def shard(self, ident: str) -> int:
        return keys.shard_of(ident, self.settings.shards)

    async def read(self, parcel_ids: Iterable[str], *, bodies: bool = False) -> dict[str, ParcelRecord]:
        """Every parcel (an empty record for an unknown one), one script call per shard, one round trip.
        ``bodies``: with its pending notices' bodies (``ParcelRecord.bodies``), for a re-plan."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for pid in parcel_ids:
            by_shard[self.shard(pid)].append(pid)
        if not by_shard:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        order = list(by_shard.items())
        for shard, pids in order:
            await self.queue_read(pipe, shard, pids, bodies=bodies)
        replies = await pipe.execute()
        self.round_trips += 1
        records: dict[str, ParcelRecord] = {}
        for (shard, pids), reply in zip(order, replies, strict=True):
            records.update(parse_read(shard, pids, reply, bodies=bodies))
        return records

    async def queue_read(
        self, pipe: Pipeline, shard: int, parcel_ids: Sequence[str], *, bodies: bool = False
    ) -> None:
        """Queue the read script for ``parcel_ids`` (all of ``shard``) on ``pipe``; see ``parse_read``."""
        parcels = [keys.parcel(shard, pid) for pid in parcel_ids]
        args = [b"1" if bodies else b"0", *parcel_ids]
        await self._read(keys=[keys.due(shard), *parcels], args=args, client=pipe)

    async def audiences(self, recipient_ids: Iterable[str]) -> dict[str, Audience | None]:
        """Planning preferences of each recipient: one MGET per recipient shard, one round trip."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for rid in set(recipient_ids):
            by_shard[self.shard(rid)].append(rid)
        if not by_shard:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        order = list(by_shard.items())
        for shard, rids in order:
            pipe.mget([keys.preferences(shard, rid) for rid in rids])
        replies = await pipe.execute()
        self.round_trips += 1
        found: dict[str, Audience | None] = {}
        for (_shard, rids), values in zip(order, replies, strict=True):
            for rid, raw in zip(rids, values, strict=True):
                found[rid] = audience_of(raw)
        return found

    async def write(self, changes: Mapping[str, tuple[int, ParcelChange]]) -> set[str]:
        """Apply every change, one script call per shard, one round trip; the parcel ids that conflicted."""
        by_shard: dict[int, list[tuple[str, ParcelChange]]] = defaultdict(list)
        for pid, (shard, change) in changes.items():
            by_shard[shard].append((pid, change))
        if not by_shard:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        order = list(by_shard.items())
        for shard, entries in order:
            call_keys, blob = shard_call(shard, entries)
            await self._apply(keys=call_keys, args=[blob, len(entries)], client=pipe)
        earliest_ms = min((c.first_due_ms for _s, c in changes.values() if c.first_due_ms), default=None)
        if earliest_ms is not None:
            # In the same pipeline, no round trip more: the dispatcher (often in another worker)
            # wakes for a notice due before it meant to, instead of sleeping up to its idle limit.
            pipe.publish(keys.SCHEDULER_WAKE_CHANNEL, b"%d" % earliest_ms)
        replies = await pipe.execute()
        self.round_trips += 1
        conflicts: set[str] = set()
        for (_shard, entries), positions in zip(order, replies[: len(order)], strict=True):
            conflicts.update(entries[int(pos) - 1][0] for pos in positions)
        return conflicts

    async def update(
        self, parcel_ids: Sequence[str], mutate: Mutator, *, refresh: bool = False, erase: bool = False
    ) -> dict[str, ParcelRecord]:
        """Read, mutate, plan and write ``parcel_ids``, retrying only the parcels that conflicted.

        ``mutate`` says whether a parcel is to be planned and written. ``refresh`` plans every pending
        notice again (preferences or order facts changed); ``erase`` withdraws them all (GDPR erasure).
        Returns the records as written, each with its ``plan`` (unchanged ones as read, without).
        """
        todo = list(dict.fromkeys(parcel_ids))
        turn = await self._busy.take(todo)
        hook_turn: asyncio.Future[None] | None = None
        try:
            done = await self._update(todo, mutate, refresh=refresh, erase=erase)
            if self.after_update is not None:
                # Hand over hand: take the parcels' hook turn before letting the next update of them
                # in, so hooks run in the order the updates did, while the next update's round trips
                # overlap this hook's instead of queueing behind them.
                hook_turn = await self._hooking.take(todo)
        finally:
            self._busy.release(todo, turn)
        if self.after_update is not None and hook_turn is not None:
            try:
                await self.after_update([r for r in done.values() if r.exists or r.plan is not None])
            finally:
                self._hooking.release(todo, hook_turn)
        return done

    async def _update(
        self, parcel_ids: list[str], mutate: Mutator, *, refresh: bool, erase: bool
    ) -> dict[str, ParcelRecord]:
        todo = parcel_ids
        done: dict[str, ParcelRecord] = {}
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                pause_s = min(CONFLICT_BACKOFF_S * 2 ** (attempt - 1), CONFLICT_BACKOFF_MAX_S)
                await asyncio.sleep(random.uniform(0, pause_s))
            # A refresh plans pending notices again: it keeps what the gateway wrote back into them.
            records = await self.read(todo, bodies=refresh)
            changed: list[ParcelRecord] = []
            for n, record in enumerate(records.values(), 1):
                if mutate(record):
                    changed.append(record)
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            done.update(records)
            # Read again on every attempt, never kept from the one that conflicted: what bumped the
            # version may be a preference change re-planning the recipient's parcels, and planning
            # with the preferences read before it would schedule a kind they just muted.
            wanted = {r.state.recipient_id for r in changed if r.state.recipient_id}
            audiences = await self.audiences(wanted) if wanted else {}
            now_ms = self.clock.now_ms()
            # The batch's span, for every notice it plans: read once, not per notice.
            trace_context: dict[str, str] = {}
            inject_trace_context(trace_context)
            changes: dict[str, tuple[int, ParcelChange]] = {}
            for n, record in enumerate(changed, 1):
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                audience = audiences.get(record.state.recipient_id)
                record.plan = plan(
                    record.state,
                    record.pending,
                    audience,
                    now_ms,
                    self.rules,
                    shard=record.shard,
                    refresh=refresh,
                    erase=erase,
                    trace_context=trace_context,
                    stored=record.bodies,
                )
                change = change_of(record, record.plan, now_ms=now_ms, settings=self.settings)
                changes[record.parcel_id] = (record.shard, change)
            conflicts = await self.write(changes)
            if not conflicts:
                return done
            todo = [pid for pid in todo if pid in conflicts]
        raise ConflictError(f"{len(todo)} parcels kept changing during {MAX_ATTEMPTS} attempts; retry")
