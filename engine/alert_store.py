"""Alerts in Redis: one hash per parcel, merchant indexes for listing, a feed for digests.

Layout (keys in ``common/keys.py``, all tagged with the parcel's shard):

- ``al:{s}:<parcel>`` hash: ``<alert id>`` -> ``Alert`` bytes (every occurrence), ``cur:<KIND>`` ->
  n of the latest occurrence of a rule, ``v`` version, ``t`` the scheduled check (ms, "0": none).
- ``al-idx:{s}:<merchant>:<KIND>:<STATE>`` sorted sets, all scores 0, members
  ``<inverted opened ms>|<alert id>``: lexicographic order is newest first, so a page is a
  ``ZRANGEBYLEX`` from an exact cursor. Merchant ``*`` indexes every merchant for operators.
  Listing merges the shards (one script call per shard, pipelined: one round trip).
- ``al-feed:{s}`` stream: alerts as they open, for the digest sender.

Retention: the alert hash expires with the parcel hash (the script copies the parcel's TTL on every
write, and the monitor writes again whenever the engine pushes the parcel's expiry back). An index
is kept at least as long as every alert hash it names; entries whose alert is gone are removed by a
sample swept on each write of the index and when a page meets them, so indexes hold a bounded share
of dead entries however long they are written to.

Every change of a parcel's alerts goes through one compare-and-set script (``alerts_apply.lua``)
with its index moves, feed entry, counters and check timer: on a concurrent change the parcel is
re-read and re-planned, so an alert is never opened twice. A batch of parcels costs two round trips
(read, write) plus one per rare conflict.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from redis.asyncio import Redis
from relais.v1 import alerts_pb2

from common import keys
from common.redis_client import register
from engine import stats
from engine.alert_rules import (
    ALL_KINDS,
    TEAM_OF,
    AlertKind,
    Evaluation,
    ParcelFacts,
    kind_from_name,
    kind_name,
)

Alert = alerts_pb2.Alert
AlertState: TypeAlias = alerts_pb2.AlertState.ValueType

ALL_MERCHANTS = "*"
CHECK_TIMER = "ALERTS"
# Cap of each shard's feed stream: the digest sender reads far more often than this fills up.
FEED_MAXLEN = 100_000
# 13 digits of milliseconds last until the year 2286.
_INVERT_MS = 10**13 - 1
_MAX_RETRIES = 5
# Entries of an index checked at random on each write to it: each write adds at most one entry that
# can go dead, and removes on average this many times the dead share, which keeps that share under
# about 1/SWEEP_SAMPLE.
SWEEP_SAMPLE = 8
_ALERT_ID = re.compile(r"^(?P<parcel>.+):(?P<kind>[A-Z_]+):(?P<n>[1-9][0-9]{0,8})$")
_MEMBER = re.compile(r"^[0-9]{13}\|.+:[A-Z_]+:[0-9]+$")
CURSOR_PREFIX = "a1|"
# The parcel hash's field where the engine keeps its alert mark (see ``engine.alert_monitor.settled``).
F_ALERT_MARK = "am"

OPEN = alerts_pb2.ALERT_STATE_OPEN
ACKNOWLEDGED = alerts_pb2.ALERT_STATE_ACKNOWLEDGED
RESOLVED = alerts_pb2.ALERT_STATE_RESOLVED
STATES: tuple[AlertState, ...] = (OPEN, ACKNOWLEDGED, RESOLVED)


def state_name(state: AlertState) -> str:
    return alerts_pb2.AlertState.Name(state).removeprefix("ALERT_STATE_")


def check_member(parcel_id: str) -> str:
    """The parcel's alert check in its shard's due set (the scheduler's timer member form)."""
    return f"{parcel_id}:CHECK_{CHECK_TIMER}"


def index_member(alert: Alert) -> str:
    return f"{_INVERT_MS - alert.opened_at.ToMilliseconds():013d}|{alert.alert_id}"


def split_alert_id(alert_id: str) -> tuple[str, AlertKind, int] | None:
    """``"<parcel>:<KIND>:<n>"`` -> (parcel id, kind, n); None when malformed."""
    match = _ALERT_ID.match(alert_id)
    if match is None:
        return None
    kind = kind_from_name(match["kind"])
    if kind is None or kind not in TEAM_OF:
        return None
    return match["parcel"], kind, int(match["n"])


def encode_page_token(member: str) -> str:
    return base64.urlsafe_b64encode((CURSOR_PREFIX + member).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str | None:
    """The cursor member of a page token; None when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    member = raw.removeprefix(CURSOR_PREFIX)
    if not raw.startswith(CURSOR_PREFIX) or not _MEMBER.match(member):
        return None
    return member


@dataclass(frozen=True)
class ParcelAlerts:
    """A parcel's alert hash as read."""

    version: str = "0"
    alerts: Mapping[str, Alert] = field(default_factory=dict)
    current: Mapping[AlertKind, int] = field(default_factory=dict)
    check_ms: int = 0

    def latest(self, parcel_id: str, kind: AlertKind) -> Alert | None:
        n = self.current.get(kind)
        return None if n is None else self.alerts.get(f"{parcel_id}:{kind_name(kind)}:{n}")

    def unresolved(self) -> list[Alert]:
        live = [a for a in self.alerts.values() if a.state != RESOLVED]
        return sorted(live, key=lambda a: a.opened_at.ToMilliseconds(), reverse=True)


def parse_parcel_alerts(raw: Mapping[bytes, bytes]) -> ParcelAlerts:
    """An ``HGETALL`` of ``keys.alerts(...)``; the engine may read it in its own pipeline."""
    alerts: dict[str, Alert] = {}
    current: dict[AlertKind, int] = {}
    version, check_ms = "0", 0
    for name_b, value in raw.items():
        name = name_b.decode()
        if name == "v":
            version = value.decode()
        elif name == "t":
            check_ms = int(value)
        elif name.startswith("c:"):
            continue  # counted markers of older releases: the parcel's own write counts now
        elif name.startswith("cur:"):
            kind = kind_from_name(name[4:])
            if kind is not None:
                current[kind] = int(value)
        else:
            alerts[name] = Alert.FromString(value)
    return ParcelAlerts(version, alerts, current, check_ms)


@dataclass
class Changes:
    """What a write did to a parcel's alerts."""

    opened: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)


class _Writes:
    """One parcel's ops for ``alerts_apply.lua``, naming keys; ``_ShardCall`` numbers them."""

    def __init__(self, shard: int, parcel_id: str) -> None:
        self.shard = shard
        self.alerts_key = keys.alerts(shard, parcel_id)
        self.parcel_key = keys.parcel(shard, parcel_id)
        self.ops: list[tuple[str, str, str | int | bytes | float, str | int | bytes]] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    def op(self, op: str, key: str, a: str | int | bytes | float = "-", b: str | int | bytes = "-") -> None:
        self.ops.append((op, key, a, b))

    def hset(self, field: str, value: str | int | bytes) -> None:
        self.op("H", self.alerts_key, field, value)

    def increments(self, incs: Iterable[stats.Increment]) -> None:
        expiring: dict[str, int] = {}
        for inc in incs:
            self.op("I", inc.key, inc.field, inc.amount)
            if inc.ttl_ms is not None:
                expiring[inc.key] = inc.ttl_ms
        for key, ttl_ms in expiring.items():
            self.op("EX", key, ttl_ms)


class _ShardCall:
    """The KEYS and ARGV of one ``alerts_apply.lua`` call: every parcel of one shard."""

    def __init__(self, ttl_ms: int, shard: int) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.args: list[str | int | bytes | float] = [
            ttl_ms,
            keys.alerts(shard, ""),
            keys.SCHEDULER_WAKE_CHANNEL,
        ]
        self.parcels: list[str] = []

    def _k(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys)
        return self._index[key]

    def add(self, parcel_id: str, version: str, writes: _Writes) -> None:
        self.parcels.append(parcel_id)
        self.args += [self._k(writes.alerts_key), self._k(writes.parcel_key), version, len(writes.ops)]
        for op, key, a, b in writes.ops:
            self.args += [op, self._k(key), a, b]


class AlertStore:
    def __init__(self, redis: Redis, *, shards: int, retention_ms: int) -> None:
        self._redis = redis
        self._shards = shards
        self._retention_ms = retention_ms
        self._apply = register(redis, "alerts_apply")
        self._page = register(redis, "alerts_page")

    def shard(self, parcel_id: str) -> int:
        return keys.shard_of(parcel_id, self._shards)

    # --- reading -----------------------------------------------------------------------------------

    async def read(self, parcel_ids: Sequence[str]) -> dict[str, ParcelAlerts]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for parcel_id in parcel_ids:
                pipe.hgetall(keys.alerts(self.shard(parcel_id), parcel_id))
            replies: list[Mapping[bytes, bytes]] = await pipe.execute()
        return {pid: parse_parcel_alerts(raw) for pid, raw in zip(parcel_ids, replies, strict=True)}

    async def open_alerts(self, parcel_ids: Sequence[str]) -> dict[str, list[Alert]]:
        """Alerts open or acknowledged, newest first, per parcel: what GetParcel shows."""
        read = await self.read(parcel_ids)
        return {pid: alerts.unresolved() for pid, alerts in read.items()}

    async def get(self, alert_id: str) -> Alert | None:
        parts = split_alert_id(alert_id)
        if parts is None:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.alerts(self.shard(parts[0]), parts[0]), alert_id)
            (raw,) = await pipe.execute()
        return None if raw is None else Alert.FromString(raw)

    # --- the rules' verdicts -----------------------------------------------------------------------

    async def apply(
        self,
        verdicts: Sequence[tuple[ParcelFacts, Evaluation]],
        now_ms: int,
        *,
        timer_fired: bool = False,
        marks: Mapping[str, str] | None = None,
    ) -> dict[str, Changes]:
        """Open what fires and is not open, resolve what is open and quiet, move the check timer.

        ``timer_fired``: the scheduler just claimed the parcels' check timers, so the one recorded in
        the hash is gone and the next one is written whatever it is. ``marks``: the alert mark to set
        in each parcel's hash (if it still exists) by the same script, once its alerts are written.
        """
        by_parcel = {facts.parcel_id: (facts, ev) for facts, ev in verdicts}
        out: dict[str, Changes] = {}
        pending = list(by_parcel)
        for _ in range(_MAX_RETRIES):
            if not pending:
                break
            current = await self.read(pending)
            planned = {pid: self._plan(*by_parcel[pid], current[pid], now_ms, timer_fired) for pid in pending}
            for pid, mark in (marks or {}).items():
                if pid in planned:
                    writes_of = planned[pid][0]
                    writes_of.op("HX", writes_of.parcel_key, F_ALERT_MARK, mark)
            writes = {pid: plan for pid, plan in planned.items() if plan[0]}
            for pid, (writes_of, changes) in writes.items():
                written = [*changes.opened, *changes.resolved]
                self._keep_indexes(writes_of, current[pid].alerts, written)
            results = await self._write(current, {pid: w for pid, (w, _) in writes.items()})
            pending = [pid for pid, ok in results.items() if not ok]
            for pid, (_, changes) in planned.items():
                if pid not in pending:
                    out[pid] = changes
        if pending:
            raise RuntimeError(
                f"alerts of {len(pending)} parcels kept changing under {_MAX_RETRIES} attempts"
            )
        return out

    def _plan(
        self, facts: ParcelFacts, ev: Evaluation, current: ParcelAlerts, now_ms: int, timer_fired: bool
    ) -> tuple[_Writes, Changes]:
        shard = self.shard(facts.parcel_id)
        writes = _Writes(shard, facts.parcel_id)
        changes = Changes()
        for finding in ev.firing:
            latest = current.latest(facts.parcel_id, finding.kind)
            if latest is not None and latest.state != RESOLVED:
                continue  # already open (or acknowledged): never twice
            n = current.current.get(finding.kind, 0) + 1
            alert = Alert(
                alert_id=f"{facts.parcel_id}:{kind_name(finding.kind)}:{n}",
                parcel_id=facts.parcel_id,
                merchant_id=facts.merchant_id,
                kind=finding.kind,
                team=TEAM_OF[finding.kind],
                state=OPEN,
                summary=finding.summary,
                parcel_status=facts.status,
            )
            alert.opened_at.FromMilliseconds(now_ms)
            self._put(writes, shard, alert, None)
            writes.hset(f"cur:{kind_name(finding.kind)}", n)
            writes.op("X", keys.alert_feed(shard), FEED_MAXLEN, alert.SerializeToString())
            writes.increments(stats.alert(shard, alert.merchant_id, now_ms, alert.kind))
            changes.opened.append(alert)
        for kind in ev.quiet:
            latest = current.latest(facts.parcel_id, kind)
            if latest is None or latest.state == RESOLVED:
                continue
            resolved = Alert()
            resolved.CopyFrom(latest)
            resolved.state = RESOLVED
            resolved.resolved_at.FromMilliseconds(now_ms)
            self._put(writes, shard, resolved, latest.state)
            writes.increments(stats.alert(shard, resolved.merchant_id, now_ms, kind, resolved=True))
            changes.resolved.append(resolved)
        recorded_ms = -1 if timer_fired else current.check_ms
        self._plan_timer(writes, shard, facts.parcel_id, ev.next_check_ms or 0, recorded_ms)
        return writes, changes

    def _plan_timer(self, writes: _Writes, shard: int, parcel_id: str, next_ms: int, current_ms: int) -> None:
        if next_ms == current_ms:
            return
        if next_ms:
            writes.op("ZD", keys.due(shard), next_ms, check_member(parcel_id))
        else:
            writes.op("ZR", keys.due(shard), check_member(parcel_id))
        writes.hset("t", next_ms)

    def _put(self, writes: _Writes, shard: int, alert: Alert, old_state: AlertState | None) -> None:
        """Store an alert and move its index entries from ``old_state`` to its state."""
        writes.hset(alert.alert_id, alert.SerializeToString())
        member = index_member(alert)
        kind = kind_name(alert.kind)
        for merchant_id in (alert.merchant_id, ALL_MERCHANTS):
            if old_state is not None:
                writes.op("ZR", keys.alert_index(shard, merchant_id, kind, state_name(old_state)), member)
            index = keys.alert_index(shard, merchant_id, kind, state_name(alert.state))
            writes.op("ZA", index, 0, member)
            writes.op("SW", index, random.random(), SWEEP_SAMPLE)
            if alert.state == RESOLVED:
                # Resolved alerts leave the index after the retention, counted from when they opened.
                cutoff_ms = alert.resolved_at.ToMilliseconds() - self._retention_ms
                writes.op("TR", index, f"({_INVERT_MS - cutoff_ms:013d}|", "+")

    @staticmethod
    def _keep_indexes(writes: _Writes, stored: Mapping[str, Alert], written: Iterable[Alert]) -> None:
        """Keep the indexes of every alert the hash holds after this write as long as the hash: the
        write moves its TTL to the parcel's. Only with other writes: a write of these alone would
        bump the version and make concurrent checks conflict for nothing."""
        alerts = dict(stored)
        alerts.update((alert.alert_id, alert) for alert in written)
        indexes = {
            keys.alert_index(writes.shard, merchant_id, kind_name(alert.kind), state_name(alert.state))
            for alert in alerts.values()
            for merchant_id in (alert.merchant_id, ALL_MERCHANTS)
        }
        for index in sorted(indexes):
            writes.op("K", index)

    async def _write(
        self, current: Mapping[str, ParcelAlerts], writes: Mapping[str, _Writes]
    ) -> dict[str, bool]:
        """One script call per shard, all pipelined: one round trip. Per parcel: written or conflicted."""
        if not writes:
            return {}
        calls: dict[int, _ShardCall] = {}
        for pid, w in writes.items():
            calls.setdefault(w.shard, _ShardCall(self._retention_ms, w.shard)).add(
                pid, current[pid].version, w
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls.values():
                await self._apply(keys=call.keys, args=call.args, client=pipe)
            replies: list[list[int]] = await pipe.execute()
        written = dict.fromkeys(writes, True)
        for call, conflicts in zip(calls.values(), replies, strict=True):
            for position in conflicts:
                written[call.parcels[int(position) - 1]] = False
        return written

    # --- acknowledging -----------------------------------------------------------------------------

    async def acknowledge(self, alert_id: str, by: str, now_ms: int) -> Alert | None:
        """Acknowledge an open alert; an acknowledged or resolved one is returned as it stands.
        None when there is no such alert."""
        parts = split_alert_id(alert_id)
        if parts is None:
            return None
        parcel_id = parts[0]
        shard = self.shard(parcel_id)
        for _ in range(_MAX_RETRIES):
            current = (await self.read([parcel_id]))[parcel_id]
            alert = current.alerts.get(alert_id)
            if alert is None or alert.state != OPEN:
                return alert
            acked = Alert()
            acked.CopyFrom(alert)
            acked.state = ACKNOWLEDGED
            acked.acknowledged_at.FromMilliseconds(now_ms)
            acked.acknowledged_by = by
            writes = _Writes(shard, parcel_id)
            self._put(writes, shard, acked, OPEN)
            self._keep_indexes(writes, current.alerts, [acked])
            if (await self._write({parcel_id: current}, {parcel_id: writes}))[parcel_id]:
                return acked
        raise RuntimeError(f"alert {alert_id} kept changing under {_MAX_RETRIES} attempts")

    # --- listing -----------------------------------------------------------------------------------

    async def page(
        self,
        merchant_id: str,
        *,
        kinds: Iterable[AlertKind] = ALL_KINDS,
        states: Iterable[AlertState] = STATES,
        after: str = "",
        size: int = 50,
    ) -> tuple[list[Alert], str]:
        """Alerts newest first after the cursor member ``after``, and the cursor of the next page
        ("" on the last). ``merchant_id`` "" lists every merchant's."""
        who = merchant_id or ALL_MERCHANTS
        names = [(kind_name(k), state_name(s)) for k in kinds for s in states]
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in range(self._shards):
                index_keys = [keys.alert_index(shard, who, k, s) for k, s in names]
                await self._page(keys=index_keys, args=[after, size + 1], client=pipe)
            replies: list[list[bytes]] = await pipe.execute()
        members = sorted(m.decode() for shard_page in replies for m in shard_page)[: size + 1]
        more = len(members) > size
        members = members[:size]
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                alert_id = member.partition("|")[2]
                parcel_id = alert_id.rsplit(":", 2)[0]
                pipe.hget(keys.alerts(self.shard(parcel_id), parcel_id), alert_id)
            bodies: list[bytes | None] = await pipe.execute()
        alerts: list[Alert] = []
        dead: list[str] = []
        for member, body in zip(members, bodies, strict=True):
            alert = None if body is None else Alert.FromString(body)
            # Gone with its parcel, or an earlier alert of the same id (the parcel expired, came
            # back and the rule opened again): the entry names nothing any more.
            if alert is None or index_member(alert) != member:
                dead.append(member)
            else:
                alerts.append(alert)
        if dead:
            await self._forget(who, dead)
        return alerts, (members[-1] if more and members else "")

    async def _forget(self, merchant_id: str, members: Sequence[str]) -> None:
        """Remove dead entries from the listed indexes and the all-merchants ones (one round trip).
        Listing all merchants, the merchant of an entry whose alert is gone is unknown: its entry in
        that merchant's index goes when a write's sweep or that merchant's listing meets it."""
        merchants = dict.fromkeys((merchant_id, ALL_MERCHANTS))
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                parcel_id, kind, _ = member.partition("|")[2].rsplit(":", 2)
                shard = self.shard(parcel_id)
                for who in merchants:
                    for state in STATES:
                        pipe.zrem(keys.alert_index(shard, who, kind, state_name(state)), member)
            await pipe.execute()
