"""The gateway loop: outbox → route → rate-limit → render → send → record, a batch at a time.

A batch costs a constant number of Redis round trips, whatever its size:

1. ``XREADGROUP`` (or ``XAUTOCLAIM`` for a crashed gateway's entries);
2. one pipeline reading the recipients' preferences and the merchants' SMS budgets;
3. one pipeline with the GCRA call for every send's limits and every idempotency claim;
4. the sends, grouped per provider, the providers in parallel;
5. one pipeline settling it all (one script call per shard).

A channel that rejects a recipient for good (dead token, hard bounce) is left for the next channel
within the same batch (steps 3-4 again, for those notices only). Limited and quiet notices go back
to the due set unchanged; failed ones with one more attempt and a backoff; exhausted ones to the
dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import RedisError
from relais.v1 import notice_pb2, preferences_pb2, state_pb2, types_pb2

from channels.base import (
    Accepted,
    Channel,
    Destination,
    Message,
    PermanentFailure,
    SendResult,
    TransientFailure,
)
from common import keys
from common.clock import Clock, stamp_ms
from common.collector import GATEWAY_YOUNG_THRESHOLD, tune_collector
from common.keys import channel_name, kind_name
from common.quiet_hours import allowed_send_ms, is_quiet
from common.redis_client import default_consumer_name
from common.settings import GatewaySettings, Settings
from common.slots import TOLD_SLOT_FIELD, TOLD_TO_FIELD, told_slot, within_threshold
from common.telemetry import (
    LimitScope,
    SendOutcome,
    Telemetry,
    end_send_spans,
    noop_telemetry,
    record_send,
    send_spans,
    trace_id_of,
)
from gateway import idempotency, recipients
from gateway.consumer import Entry, Outbox
from gateway.idempotency import Claim
from gateway.limiter import Limit, LimitBatch, Limiter, Rate
from gateway.outcome import Outcome, Verdict, backoff_ms, judge
from gateway.render import Rendered
from gateway.render import Renderer as DefaultRenderer
from gateway.routing import SLOT_KINDS, ChannelKind, Route, RoutingPolicy, plan, single_address
from gateway.scripts import LuaScript
from gateway.settle import Settlement, attempt_view_of, timestamp

log = logging.getLogger(__name__)

# Push, then email, then SMS: at most one fallback round per channel.
MAX_ROUNDS = 3
SUPPRESSED = notice_pb2.NOTICE_STATUS_SUPPRESSED
# Bound of the per-process caches of derived keys and limits (merchants, providers).
CACHE_MAX_ENTRIES = 100_000
DEAD_LETTER = notice_pb2.NOTICE_STATUS_DEAD_LETTER
CANCELLED = notice_pb2.NOTICE_STATUS_CANCELLED
WITHDRAWN = frozenset({CANCELLED, SUPPRESSED})
CORRECTED = types_pb2.NOTICE_KIND_SLOT_CORRECTED
# A message left unsent because its provider was slow (see ``_send_batch``): the notice comes back
# later without an attempt spent, as a rate-limited one does.
NOT_ATTEMPTED = TransientFailure("not attempted: the provider was slow")
# A notice this long past its due time was held up (a long backlog): its parcel is checked, as a
# retry's is. Not sooner: the check reads and parses the parcel's state, and a backlog of minutes is
# when the gateway can least afford it (gateway bench: +50 % CPU per notice at a one-minute mark).
LATE_MS = 15 * 60_000
# Tracking statuses after which only the news of the end goes out: nothing about a slot, a pickup, a
# failed attempt, an address or a delay (DESIGN.md).
FINISHED = frozenset(
    {
        types_pb2.TRACKING_STATUS_DELIVERED,
        types_pb2.TRACKING_STATUS_RETURNING_TO_SENDER,
        types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER,
        types_pb2.TRACKING_STATUS_EXPIRED,
    }
)
PICKUP_KINDS = frozenset({types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, types_pb2.NOTICE_KIND_PICKUP_REMINDER})
# The notices a finished parcel still sends: the news of its end itself.
END_KINDS = frozenset({types_pb2.NOTICE_KIND_DELIVERED, types_pb2.NOTICE_KIND_RETURNED})


class Renderer(Protocol):
    def render(
        self,
        notice: notice_pb2.Notice,
        *,
        channel: types_pb2.Channel.ValueType,
        locale: str,
        time_zone: str,
    ) -> Rendered: ...


@dataclass(slots=True)
class BatchStats:
    sent: int = 0
    retrying: int = 0
    dead_lettered: int = 0
    failed: int = 0
    suppressed: int = 0
    limited: int = 0
    deferred_quiet: int = 0
    elsewhere: int = 0
    already_sent: int = 0
    deferred_slow: int = 0
    superseded: int = 0
    expired: int = 0

    def add(self, other: BatchStats) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_RouteKey: TypeAlias = tuple[int, bool, tuple[ChannelKind, ...]]


@dataclass(slots=True)
class _Batch:
    """What the steps of one batch share: its instant, its writes and its tallies."""

    now_ms: int
    settlement: Settlement
    stats: BatchStats = field(default_factory=BatchStats)
    # Segments spent per SMS budget key: read with the batch, plus what the batch sent.
    sms_spent: dict[str, int] = field(default_factory=dict)
    # Sent attempts per channel, added to the metrics once per batch rather than once per notice.
    sent: Counter[ChannelKind] = field(default_factory=Counter)
    # Routes that depend on the recipient alone, per (preferences' id, quiet, failed channels).
    routes: dict[_RouteKey, tuple[preferences_pb2.RecipientPreferences, Route]] = field(default_factory=dict)


@dataclass(slots=True)
class _Item:
    entry: Entry
    notice: notice_pb2.Notice
    # Read from the notice once: each read of a protobuf field looks its name up and makes a new
    # object, and the batch's steps ask for these several times each.
    kind: types_pb2.NoticeKind.ValueType
    merchant_id: str
    recipient_id: str
    prefs: preferences_pb2.RecipientPreferences | None = None
    # Why its parcel has moved on since, if it has (read for late notices only).
    moved_on: str = ""


@dataclass(slots=True)
class _Job:
    item: _Item
    route: Route
    quiet: bool
    keys: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    wait_ms: int = 0
    results: list[SendResult | None] = field(default_factory=list)
    # Rendered once, when its first message's chunk is about to go out (see ``_send_batch``).
    rendered: Rendered | None = None
    render_failed: bool = False


@functools.lru_cache(maxsize=64)
def _month_of_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m")


def _month(now_ms: int) -> str:
    return _month_of_day(now_ms // 86_400_000)


def _collapse_key(notice: notice_pb2.Notice) -> str:
    """The push collapse key: one per parcel for its slot notices, so a correction replaces the
    announcement on the phone instead of sitting beside it; the notice's own id otherwise."""
    if notice.kind in SLOT_KINDS:
        return f"{notice.parcel_id}:slot"
    return notice.notice_id


def _late(notice: notice_pb2.Notice, now_ms: int) -> bool:
    """A retry, or a notice that waited in a backlog: long enough for its parcel to have moved on."""
    return notice.attempt > 0 or now_ms - stamp_ms(notice.due_at) > LATE_MS


def _expired(notice: notice_pb2.Notice, kind: types_pb2.NoticeKind.ValueType, now_ms: int) -> bool:
    """A notice about a slot that is over, or a pickup whose deadline passed, tells the recipient
    nothing true any more: late after a retry, a backlog or a quiet-hours hold, it is not sent."""
    if kind in SLOT_KINDS:
        return notice.HasField("slot") and stamp_ms(notice.slot.end) <= now_ms
    if kind in PICKUP_KINDS:
        return notice.HasField("deadline") and stamp_ms(notice.deadline) <= now_ms
    return False


def _moved_on(notice: notice_pb2.Notice, state: state_pb2.ParcelState) -> str:
    """Why a late notice or a slot notice no longer tells the truth about its parcel, or "" if it
    still does.

    The engine withdraws what is still due when the parcel is delivered. A slot notice handed over
    but not sent yet (waiting in the outbox, retried) is the engine's to replace or withdraw when the
    slot moves: it goes out only while its kind's mark still has its version, not withdrawn. A newer
    version of its kind replaced it - even one withdrawn since: the engine planned that from what the
    recipient was sent, without this one (the slot moved back within the threshold of it, say). A
    newer notice of the other kind, not withdrawn, supersedes it: never the old slot after it. A newer
    slot version with no newer notice (a move under the correction threshold) leaves it true enough to
    send."""
    if state.status in FINISHED:
        return "the parcel was delivered or returned meanwhile"
    if notice.kind in SLOT_KINDS:
        version = notice.version
        for mark in state.notices:
            if mark.kind == notice.kind and mark.version == version and mark.status in WITHDRAWN:
                return f"withdrawn by the engine: {mark.status_reason}"
            # A withdrawn one of the other kind supersedes nothing: it never goes out.
            newer = mark.kind in SLOT_KINDS and mark.version > version
            if newer and (mark.kind == notice.kind or mark.status not in WITHDRAWN):
                return f"superseded by the {kind_name(mark.kind)} notice of slot version {mark.version}"
    return ""


def _resolve_correction(notice: notice_pb2.Notice, told: types_pb2.Slot | None, threshold_ms: int) -> str:
    """A correction names the slot its recipient was last sent, whatever the engine saw when it planned
    it: a slot notice it had handed over may have gone out since (``engine.planner``'s ``in_hand``).
    Sets ``previous_slot`` to that slot; returns why the correction no longer needs to go out (its
    slot lies within the threshold of the one sent, or a newer one was sent), or ""."""
    if told is None:
        return ""
    if told.version > notice.version:
        return f"superseded by the slot notice of slot version {told.version} sent"
    if within_threshold(told.window, notice.slot, threshold_ms):
        return "its slot lies within the threshold of the slot last sent"
    notice.previous_slot.CopyFrom(told.window)
    return ""


def _quiet_window(prefs: preferences_pb2.RecipientPreferences) -> tuple[int, int] | None:
    if not prefs.HasField("quiet_hours"):
        return None
    return (prefs.quiet_hours.start_minute, prefs.quiet_hours.end_minute)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        clock: Clock,
        channels: Mapping[str, Channel],
        *,
        renderer: Renderer | None = None,
        consumer: str | None = None,
        rng: random.Random | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or noop_telemetry()
        if renderer is None:
            renderer = DefaultRenderer(settings.gateway.templates_dir, link_base=settings.gateway.link_base)
        self._settings: GatewaySettings = settings.gateway
        self._slot_threshold_ms = settings.engine.slot_shift_threshold_s * 1000
        self._shards = settings.shards
        self._redis = redis
        self._clock = clock
        self._channels = channels
        self._renderer = renderer
        self._rng = rng or random.Random()
        self._policy = RoutingPolicy.for_providers(
            channels,
            sms_value_threshold_minor=self._settings.sms_value_threshold_minor,
            sms_monthly_budget_segments=self._settings.sms_monthly_budget_segments,
        )
        self._lease_ms = max(1, int(self._settings.send_timeout_s * 1000))
        self.outbox = Outbox(
            redis,
            settings.shards,
            consumer or default_consumer_name(),
            batch_size=self._settings.batch_size,
            block_ms=self._settings.block_ms,
            # Two send timeouts: a live gateway's batch ends within 1.5 (see ``_send_batch``), so an
            # entry taken over is a dead gateway's, never one still being sent.
            min_idle_ms=2 * self._lease_ms,
        )
        self._limiter = Limiter(redis)
        self._shared_limits_by_name: dict[tuple[tuple[str, ...], str], tuple[Limit, ...]] = {}
        self._merchant_rate = Rate(self._settings.merchant_rate_per_s, self._settings.merchant_burst)
        self._recipient_rate = Rate(
            self._settings.recipient_rate_per_h / 3600, self._settings.recipient_burst
        )
        self._budget_keys: dict[tuple[str, str], str] = {}
        self._settle = LuaScript(redis, "settle")
        # Longer than what is left of a batch when a claim is taken (at most 1.5 send timeouts in
        # all): a claim is still held when its send's outcome is settled.
        self._claim_ms = 2 * self._lease_ms
        self._claims = idempotency.Claims(redis, self._claim_ms)

    async def start(self) -> None:
        await self.outbox.ensure_groups()
        await self._limiter.load()
        await self._settle.load()
        await self._claims.load()

    # --- the loop -------------------------------------------------------------------------------

    async def run_once(self, *, block: bool = False, reclaim: bool = False) -> BatchStats:
        """Read one batch (reclaimed entries first if asked) and process it: for tests and tools."""
        entries = await self._triage(await self.outbox.reclaim()) if reclaim else []
        entries = entries or await self.outbox.read(block=block)
        return await self.process(entries)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: read, process with at most ``max_in_flight`` batches at once."""
        await self.start()
        # A long-running loop compiles its templates before its first batch, not during it.
        if isinstance(self._renderer, DefaultRenderer):
            self._renderer.warm()
        tune_collector(GATEWAY_YOUNG_THRESHOLD)
        permits = asyncio.Semaphore(self._settings.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time()
        while not stop.is_set():
            await permits.acquire()
            try:
                entries: list[Entry] = []
                if loop.time() >= next_reclaim:
                    next_reclaim = loop.time() + self._settings.reclaim_interval_s
                    entries = await self._triage(await self.outbox.reclaim())
                entries = entries or await self.outbox.read()
            except (RedisError, OSError) as exc:
                permits.release()
                log.warning("outbox read failed (%s); retrying in 1 s", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            if not entries:
                permits.release()
                continue
            task = asyncio.create_task(self._process_guarded(entries, permits))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _process_guarded(self, entries: list[Entry], permits: asyncio.Semaphore) -> None:
        try:
            await self.process(entries)
        except Exception:
            # The entries stay pending: another gateway (or this one) reclaims them after the lease.
            log.exception("batch of %d notices failed; left for reclaim", len(entries))
        finally:
            permits.release()

    async def _triage(self, entries: list[Entry]) -> list[Entry]:
        """Sort reclaimed entries; returns those to process as one batch.

        At its second delivery an entry's gateway most likely died: it goes back in a batch. Later,
        its batches failed before, maybe because of it: it is processed alone, so it holds back no
        other notice. Handed out more than ``max_deliveries`` times, it goes to the dead-letter
        stream, where an operator sees it and can replay it once the gateway is fixed.
        """
        batch: list[Entry] = []
        exhausted: list[Entry] = []
        for entry in entries:
            if entry.deliveries > self._settings.max_deliveries:
                exhausted.append(entry)
            elif entry.deliveries > 2:
                try:
                    await self.process([entry])
                except (RedisError, OSError):
                    raise
                except Exception:
                    log.exception(
                        "outbox entry %s of shard %d failed again (delivery %d of %d); left for reclaim",
                        entry.entry_id.decode(),
                        entry.shard,
                        entry.deliveries,
                        self._settings.max_deliveries,
                    )
            else:
                batch.append(entry)
        if exhausted:
            await self._dead_letter_exhausted(exhausted)
        return batch

    async def _dead_letter_exhausted(self, entries: list[Entry]) -> None:
        now_ms = self._clock.now_ms()
        settlement = self._settlement(now_ms)
        reason = f"not settled after {self._settings.max_deliveries} deliveries: the gateway failed on it"
        items = self._parse(entries, settlement)
        for item in items:
            log.error(
                "outbox entry %s of shard %d (notice %s) failed %d times; moved to the dead-letter stream",
                item.entry.entry_id.decode(),
                item.entry.shard,
                item.notice.notice_id,
                item.entry.deliveries - 1,
            )
            self._give_up(item, notice_pb2.NOTICE_STATUS_DEAD_LETTER, reason, now_ms, settlement)
            settlement.ack(item.entry.shard, item.entry.entry_id)
        await settlement.execute(self._redis)
        for item in items:
            self._telemetry.metrics.dead_lettered(item.kind)

    # --- one batch ------------------------------------------------------------------------------

    def _settlement(self, now_ms: int) -> Settlement:
        return Settlement(
            self._settle,
            group=keys.OUTBOX_GROUP,
            retention_ms=self._settings.idempotency_retention_s * 1000,
            now_ms=now_ms,
            dead_letter_retention_ms=self._settings.dead_letter_retention_days * 86_400_000,
        )

    async def process(self, entries: Sequence[Entry]) -> BatchStats:
        stats = BatchStats()
        if not entries:
            return stats
        now_ms = self._clock.now_ms()
        settlement = self._settlement(now_ms)
        batch = _Batch(now_ms, settlement, stats)
        items = self._parse(entries, settlement)
        batch.sms_spent = await self._load(items, now_ms)
        pending = items
        # No chunk of any round starts after this: the batch's sends end within 1.5 send timeouts.
        last_start = asyncio.get_running_loop().time() + self._settings.send_timeout_s / 2
        for _ in range(MAX_ROUNDS + 1):
            jobs = self._plan(pending, batch)
            if not jobs:
                break
            await self._claim_and_limit(jobs, now_ms)
            await self._send(jobs, last_start)
            pending = await self._judge(jobs, batch)
            if pending:
                # Another round follows (fallbacks, rare): what this one sent is marked sent first,
                # so a gateway taking the entry over during that round never sends it again.
                stats.superseded += await batch.settlement.execute(self._redis)
                batch.settlement = self._settlement(now_ms)
        for item in items:
            batch.settlement.ack(item.entry.shard, item.entry.entry_id)
        stats.superseded += await batch.settlement.execute(self._redis)
        for channel, count in batch.sent.items():
            self._telemetry.metrics.send(channel, SendOutcome.SENT, count)
        return stats

    def _parse(self, entries: Sequence[Entry], settlement: Settlement) -> list[_Item]:
        items: list[_Item] = []
        for entry in entries:
            notice = notice_pb2.Notice()
            try:
                if entry.body is None:
                    raise ValueError("no body")
                notice.ParseFromString(entry.body)
            except Exception:
                log.error("outbox entry %s of shard %d is not a Notice; dropped", entry.entry_id, entry.shard)
                settlement.ack(entry.shard, entry.entry_id)
                continue
            items.append(_Item(entry, notice, notice.kind, notice.merchant_id, notice.recipient_id))
        return items

    def _sms_budget_key(self, merchant_id: str, now_ms: int) -> str:
        month = _month(now_ms)
        key = self._budget_keys.get((merchant_id, month))
        if key is None:
            if len(self._budget_keys) > CACHE_MAX_ENTRIES:
                self._budget_keys.clear()
            key = self._budget_keys[(merchant_id, month)] = keys.sms_budget(merchant_id, month, self._shards)
        return key

    async def _load(self, items: list[_Item], now_ms: int) -> dict[str, int]:
        """Preferences and SMS budgets of the batch, one round trip. Returns segments spent per key."""
        recipient_ids = list({item.recipient_id for item in items})
        budget_keys = [
            self._sms_budget_key(merchant_id, now_ms) for merchant_id in {i.merchant_id for i in items}
        ]
        # Notices that went out late (a retry, a backlog) may find their parcel delivered or their slot
        # corrected: the engine cancels or replaces what is still due, not what it handed over.
        # And every slot notice: the engine replaces an announcement or correction that was handed
        # over but not sent yet when the slot moves, and the one it replaced must not go out.
        late = [
            item
            for item in items
            if item.kind in SLOT_KINDS or (item.kind not in END_KINDS and _late(item.notice, now_ms))
        ]
        pipe = self._redis.pipeline(transaction=False)
        ordered = recipients.queue_load(pipe, recipient_ids, self._shards)
        for budget_key in budget_keys:
            pipe.get(budget_key)
        for item in late:
            parcel = keys.parcel(item.entry.shard, item.notice.parcel_id)
            if item.kind == CORRECTED:
                # And the slot last sent, which a correction names (see ``_resolve_correction``).
                pipe.hmget(parcel, [keys.PARCEL_STATE_FIELD, TOLD_SLOT_FIELD, TOLD_TO_FIELD])
            else:
                pipe.hget(parcel, keys.PARCEL_STATE_FIELD)
        replies = await pipe.execute()
        loads = len(replies) - len(budget_keys) - len(late)
        prefs = recipients.parse_loaded(ordered, replies[:loads])
        for item in items:
            item.prefs = prefs[item.recipient_id]
        for item, reply in zip(late, replies[loads + len(budget_keys) :], strict=True):
            raw, told = reply, None
            if item.kind == CORRECTED:
                raw, raw_told, told_to = reply
                told = told_slot(raw_told, told_to, item.recipient_id)
            if raw is not None:
                item.moved_on = _moved_on(item.notice, state_pb2.ParcelState.FromString(raw))
            if item.kind == CORRECTED and not item.moved_on:
                item.moved_on = _resolve_correction(item.notice, told, self._slot_threshold_ms)
        spent = replies[loads : loads + len(budget_keys)]
        return {key: int(value or 0) for key, value in zip(budget_keys, spent, strict=True)}

    # --- routing ------------------------------------------------------------------------------

    def _plan(self, items: list[_Item], batch: _Batch) -> list[_Job]:
        jobs: list[_Job] = []
        for item in items:
            job = self._plan_one(item, batch)
            if job is not None:
                jobs.append(job)
        return jobs

    def _plan_one(self, item: _Item, batch: _Batch) -> _Job | None:
        notice, prefs, shard = item.notice, item.prefs, item.entry.shard
        now_ms, settlement, stats = batch.now_ms, batch.settlement, batch.stats
        if _expired(notice, item.kind, now_ms):
            self._give_up(
                item, CANCELLED, "too late: its slot or pickup deadline has passed", now_ms, settlement
            )
            stats.expired += 1
            return None
        if item.moved_on:
            self._give_up(item, CANCELLED, item.moved_on, now_ms, settlement)
            stats.expired += 1
            return None
        if prefs is None:
            self._give_up(item, SUPPRESSED, "no preferences", now_ms, settlement)
            stats.suppressed += 1
            return None
        # upb's repeated fields iterate by index until an IndexError, which costs more than the
        # check itself: an empty one (nearly always) is not iterated.
        muted = prefs.muted_kinds
        if muted and item.kind in muted:
            self._give_up(item, SUPPRESSED, "kind muted by the recipient", now_ms, settlement)
            stats.suppressed += 1
            return None
        quiet = self._quiet(prefs, now_ms)
        if quiet:
            deadline_ms = notice.deadline.ToMilliseconds() if notice.HasField("deadline") else None
            send_ms = allowed_send_ms(now_ms, now_ms, _quiet_window(prefs), self._zone(prefs), deadline_ms)
            if send_ms > now_ms:
                settlement.reschedule(shard, notice, send_ms)
                stats.deferred_quiet += 1
                return None
        route = self._route(notice, prefs, quiet, batch)
        if route is not None:
            return _Job(item, route, quiet)
        if notice.failed_channels:
            self._give_up(item, DEAD_LETTER, "every channel failed", now_ms, settlement)
            stats.dead_lettered += 1
        else:
            self._give_up(item, SUPPRESSED, "no reachable channel", now_ms, settlement)
            stats.suppressed += 1
        return None

    def _route(
        self,
        notice: notice_pb2.Notice,
        prefs: preferences_pb2.RecipientPreferences,
        quiet: bool,
        batch: _Batch,
    ) -> Route | None:
        """The notice's best route; reused for the batch's other notices to the same recipient when it
        did not depend on the notice (a recipient often has several notices in a batch)."""
        failed = notice.failed_channels
        key = (id(prefs), quiet, tuple(failed) if failed else ())
        cached = batch.routes.get(key)
        # The preferences themselves are compared too: an id is only unique among live objects.
        if cached is not None and cached[0] is prefs:
            return cached[1]
        now_ms = batch.now_ms
        spent = batch.sms_spent.get(self._sms_budget_key(notice.merchant_id, now_ms), 0)
        routes = plan(
            notice, prefs, self._policy, now_ms=now_ms, quiet=quiet, sms_spent_segments=spent, first_only=True
        )
        if not routes:
            return None
        if routes[0].general:
            batch.routes[key] = (prefs, routes[0])
        return routes[0]

    def _quiet(self, prefs: preferences_pb2.RecipientPreferences, now_ms: int) -> bool:
        return is_quiet(now_ms, _quiet_window(prefs), self._zone(prefs))

    @staticmethod
    def _zone(prefs: preferences_pb2.RecipientPreferences) -> str:
        return prefs.time_zone or "UTC"

    # --- limits and claims: one round trip ------------------------------------------------------

    def _shared_limits(self, route: Route, merchant_id: str) -> tuple[Limit, ...]:
        """The provider and merchant limits of a send, one tuple per combination, built once: every
        batch names the same few (the limiter recognises a tuple by identity)."""
        targets = route.targets
        providers = (
            (targets[0].provider,) if len(targets) == 1 else tuple(dict.fromkeys(t.provider for t in targets))
        )
        key = (providers, merchant_id)
        shared = self._shared_limits_by_name.get(key)
        if shared is None:
            if len(self._shared_limits_by_name) > CACHE_MAX_ENTRIES:
                self._shared_limits_by_name.clear()
            limits = [Limit("provider", name, self._provider_rate(name)) for name in providers]
            limits.append(Limit("merchant", merchant_id, self._merchant_rate))
            shared = self._shared_limits_by_name[key] = tuple(limits)
        return shared

    def _provider_rate(self, provider: str) -> Rate:
        rate = self._settings.provider_rate(provider)
        return Rate(rate, max(1, int(rate)))  # a second's worth at once

    def _limit_batch(self, jobs: Sequence[_Job]) -> LimitBatch:
        batch = LimitBatch("recipient", self._recipient_rate)
        for job in jobs:
            item = job.item
            # A slot notice or a correction is the point of relais: never held back by the frequency cap.
            personal = None if item.kind in SLOT_KINDS else item.recipient_id
            batch.add(self._shared_limits(job.route, item.merchant_id), personal)
        return batch

    async def _claim_and_limit(self, jobs: list[_Job], now_ms: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        if self._settings.limits_enabled:
            self._limiter.queue(pipe, now_ms, self._limit_batch(jobs))
        by_shard: dict[int, list[str]] = defaultdict(list)
        for job in jobs:
            notice = job.item.notice
            job.keys = [
                idempotency.idempotency_key(notice.notice_id, notice.version, job.route.channel, target.to)
                for target in job.route.targets
            ]
            by_shard[job.item.entry.shard].extend(job.keys)
        for shard, shard_keys in by_shard.items():
            self._claims.queue(pipe, shard, shard_keys)
        replies = list(await pipe.execute())
        waits = [int(w) for w in replies.pop(0)] if self._settings.limits_enabled else [0] * len(jobs)
        # Each shard's claims come back in the order its jobs queued them.
        claims = {
            shard: iter(self._claims.parse(reply)) for shard, reply in zip(by_shard, replies, strict=True)
        }
        for job, wait_ms in zip(jobs, waits, strict=True):
            job.wait_ms = wait_ms
            shard_claims = claims[job.item.entry.shard]
            job.claims = [next(shard_claims) for _ in job.keys]

    # --- sending ------------------------------------------------------------------------------

    def _message(self, job: _Job, index: int, rendered: Rendered) -> Message:
        notice, prefs = job.item.notice, job.item.prefs
        assert prefs is not None
        push = job.route.channel == types_pb2.CHANNEL_PUSH
        expires_at = None
        if push and notice.HasField("slot"):
            expires_at = notice.slot.end.ToDatetime(tzinfo=UTC)
        return Message(
            idempotency_key=job.keys[index],
            to=job.route.targets[index].to,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            data=rendered.data,
            collapse_key=_collapse_key(notice) if push else "",
            expires_at=expires_at,
            locale=prefs.locale or "en",
        )

    async def _send(self, jobs: list[_Job], last_start: float) -> None:
        by_provider: dict[str, list[tuple[_Job, int]]] = defaultdict(list)
        for job in jobs:
            job.results = [None] * len(job.keys)
            if job.wait_ms:
                continue
            for index, claim in enumerate(job.claims):
                if claim is Claim.CLAIMED:
                    by_provider[job.route.targets[index].provider].append((job, index))
        await asyncio.gather(*(self._send_provider(p, b, last_start) for p, b in by_provider.items()))

    def _message_for(self, job: _Job, index: int) -> Message | None:
        """The message to ``index``, its job rendered on first use; None when rendering failed (the
        job's results then say so for every address)."""
        if job.rendered is None:
            if job.render_failed:
                return None
            job.rendered = self._render(job)
            if job.rendered is None:
                job.render_failed = True
                return None
        return self._message(job, index, job.rendered)

    def _render(self, job: _Job) -> Rendered | None:
        notice, prefs = job.item.notice, job.item.prefs
        assert prefs is not None
        try:
            return self._renderer.render(
                notice, channel=job.route.channel, locale=prefs.locale or "en", time_zone=self._zone(prefs)
            )
        except Exception as exc:
            log.exception(
                "notice %s cannot be rendered for %s", notice.notice_id, channel_name(job.route.channel)
            )
            job.results = [PermanentFailure(f"render failed: {type(exc).__name__}")] * len(job.keys)
            return None

    async def _send_provider(self, provider: str, batch: list[tuple[_Job, int]], last_start: float) -> None:
        spans = send_spans(self._telemetry, provider, [(j.item.notice, j.route.channel) for j, _ in batch])
        try:
            await self._send_batch(provider, batch, last_start)
        finally:
            end_send_spans(spans, [job.results[index] for job, index in batch])

    async def _send_batch(self, provider: str, batch: list[tuple[_Job, int]], last_start: float) -> None:
        """The provider's messages in chunks, each under the send timeout. A chunk that times out or
        fails is retried whole (what it sent may go out twice: at most one chunk); no chunk starts
        after ``last_start`` (half a send timeout into the batch), so a slow provider leaves the rest
        for later, never sent, and the batch ends before another gateway may take it over. Messages
        are rendered just before their chunk goes out, not all first: a large batch's rendering
        does not use up the time before the cut and leave every chunk unsent."""
        loop = asyncio.get_running_loop()
        timeout_s = self._settings.send_timeout_s
        chunk = self._settings.send_chunk
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            if loop.time() > last_start:
                for job, index in part:
                    if not job.render_failed:  # a render failure stands for every address
                        job.results[index] = NOT_ATTEMPTED
                continue
            ready = [
                (job, index, m) for job, index in part if (m := self._message_for(job, index)) is not None
            ]
            if not ready:
                continue
            results = await self._send_chunk(provider, ready, timeout_s)
            for (job, index, _), result in zip(ready, results, strict=True):
                job.results[index] = result

    async def _send_chunk(
        self, provider: str, part: list[tuple[_Job, int, Message]], timeout_s: float
    ) -> Sequence[SendResult]:
        try:
            results = await asyncio.wait_for(
                self._channels[provider].send([message for _, _, message in part]), timeout_s
            )
            if len(results) != len(part):
                raise RuntimeError(f"channel {provider} returned {len(results)} results for {len(part)}")
            return results
        except Exception as exc:
            # Third-party messages may quote addresses: log the type only.
            log.warning("provider %s failed a batch of %d: %s", provider, len(part), type(exc).__name__)
            return [TransientFailure(f"{provider}: {type(exc).__name__}")] * len(part)

    # --- outcomes -----------------------------------------------------------------------------

    async def _judge(self, jobs: list[_Job], batch: _Batch) -> list[_Item]:
        """Settle each job; returns the items that fall back to their next channel."""
        settlement, stats = batch.settlement, batch.stats
        fall_back: list[_Item] = []
        dead_by_recipient: dict[str, list[Destination]] = defaultdict(list)
        # The keys this round claimed, gathered only if a job claimed none of its own (a copy, rare).
        ours: set[str] | None = None
        for job in jobs:
            shard, notice = job.item.entry.shard, job.item.notice
            if job.wait_ms:
                self._defer(job, batch, job.wait_ms)
                stats.limited += 1
                self._telemetry.metrics.limited(LimitScope.SEND)
                continue
            claims, results = job.claims, job.results
            if len(claims) == 1 and claims[0] is Claim.CLAIMED and isinstance(results[0], Accepted):
                # Nearly every notice: one address, claimed and accepted (no Outcome to judge).
                settlement.sent(shard, job.keys[0])
                self._settle_sent(job, results[0], 0, batch)
                continue
            if Claim.CLAIMED not in claims:
                if ours is None:
                    ours = {
                        k for j in jobs for k, c in zip(j.keys, j.claims, strict=True) if c is Claim.CLAIMED
                    }
                self._settle_unclaimed(job, batch, ours)
                continue
            if NOT_ATTEMPTED in results and not any(isinstance(r, Accepted) for r in results):
                self._defer(job, batch, self._lease_ms)
                stats.deferred_slow += 1
                continue
            outcome = self._outcome(job)
            if outcome.dead:
                dead_by_recipient[notice.recipient_id].extend(outcome.dead)
            if self._settle_job(job, outcome, batch):
                notice.failed_channels.append(job.route.channel)
                fall_back.append(job.item)
        if dead_by_recipient:
            await self._remove_dead(dead_by_recipient, jobs)
        return fall_back

    @staticmethod
    def _defer(job: _Job, batch: _Batch, delay_ms: int) -> None:
        """Back to the due set in ``delay_ms``, unsent and without an attempt spent (limited, or its
        provider too slow this round); its claims released."""
        shard = job.item.entry.shard
        for key, claim in zip(job.keys, job.claims, strict=True):
            if claim is Claim.CLAIMED:  # another gateway's claim is not ours to free
                batch.settlement.free(shard, key)
        batch.settlement.reschedule(shard, job.item.notice, batch.now_ms + delay_ms)

    def _settle_unclaimed(self, job: _Job, batch: _Batch, ours: set[str]) -> None:
        """Not one of the notice's sends was ours. All sent before, or claimed by this very batch: a
        copy of a notice sent (or being sent) and recorded, acknowledged and nothing more. Some held
        by another gateway: this entry may be one taken over from a gateway that died mid-send, whose
        claim has not expired yet, so the notice comes back when that claim has ended, either sent by
        its holder (then it is acknowledged as a copy) or free to send."""
        held = [key for key, claim in zip(job.keys, job.claims, strict=True) if claim is Claim.IN_FLIGHT]
        if any(key not in ours for key in held):
            notice = job.item.notice
            batch.settlement.reschedule(job.item.entry.shard, notice, batch.now_ms + self._claim_ms)
            batch.stats.elsewhere += 1
        else:
            batch.stats.already_sent += 1

    @staticmethod
    def _outcome(job: _Job) -> Outcome:
        # A key sent before counts as accepted: the message reached the provider already.
        results = [
            Accepted("") if claim is Claim.SENT else result
            for claim, result in zip(job.claims, job.results, strict=True)
        ]
        return judge(results, [t.to for t in job.route.targets])

    def _settle_job(self, job: _Job, outcome: Outcome, batch: _Batch) -> bool:
        """Record one job's outcome; True when the notice should try its next channel."""
        shard, notice = job.item.entry.shard, job.item.notice
        now_ms, settlement, stats = batch.now_ms, batch.settlement, batch.stats
        if outcome.verdict is Verdict.SENT:
            assert outcome.accepted is not None
            for key, claim, result in zip(job.keys, job.claims, job.results, strict=True):
                if claim is Claim.CLAIMED:
                    (settlement.sent if isinstance(result, Accepted) else settlement.free)(shard, key)
            self._settle_sent(job, outcome.accepted, outcome.accepted_index, batch)
            return False
        for key, claim in zip(job.keys, job.claims, strict=True):
            if claim is Claim.CLAIMED:
                settlement.free(shard, key)
        provider = job.route.targets[0].provider
        if outcome.verdict is Verdict.FALL_BACK:
            self._record(job, notice_pb2.NOTICE_STATUS_FAILED, batch, provider, error=outcome.reason)
            stats.failed += 1
            return True
        attempt = notice.attempt + 1
        if attempt >= self._settings.max_attempts:
            self._record(job, notice_pb2.NOTICE_STATUS_DEAD_LETTER, batch, provider, error=outcome.reason)
            notice.attempt = attempt
            settlement.dead_letter(shard, notice, f"out of retries: {outcome.reason}")
            stats.dead_lettered += 1
            return False
        self._record(job, notice_pb2.NOTICE_STATUS_RETRYING, batch, provider, error=outcome.reason)
        delay_ms = backoff_ms(
            notice.attempt,
            base_s=self._settings.backoff_base_s,
            max_s=self._settings.backoff_max_s,
            rng=self._rng,
        )
        notice.attempt = attempt
        settlement.reschedule(shard, notice, now_ms + max(delay_ms, outcome.retry_after_ms))
        stats.retrying += 1
        return False

    def _settle_sent(self, job: _Job, accepted: Accepted, accepted_index: int, batch: _Batch) -> None:
        """Record and count a notice a provider accepted (its keys already marked sent or freed)."""
        item, channel = job.item, job.route.channel
        provider = job.route.targets[accepted_index].provider
        self._record(job, notice_pb2.NOTICE_STATUS_SENT, batch, provider, accepted.provider_message_id)
        batch.settlement.count_sent(item.entry.shard, item.merchant_id, item.kind, channel, accepted)
        if item.kind in SLOT_KINDS:
            batch.settlement.told(item.entry.shard, item.notice)
        if channel == types_pb2.CHANNEL_SMS:
            budget_key = self._sms_budget_key(item.merchant_id, batch.now_ms)
            batch.settlement.spend_sms(budget_key, accepted.segments)
            batch.sms_spent[budget_key] = batch.sms_spent.get(budget_key, 0) + max(1, accepted.segments)
        batch.stats.sent += 1

    def _record(
        self,
        job: _Job,
        status: notice_pb2.NoticeStatus.ValueType,
        batch: _Batch,
        provider: str,
        provider_message_id: str = "",
        *,
        error: str = "",
    ) -> None:
        notice, channel, version = job.item.notice, job.route.channel, job.item.notice.version
        # The notice's key for the channel: the one its send claimed, unless a push to several devices
        # claimed one per device.
        if single_address(channel):
            key = job.keys[0]
        else:
            key = idempotency.idempotency_key(notice.notice_id, version, channel)
        # The trace only when tracing is on: without it notices carry no context to read.
        trace_id = trace_id_of(notice) if self._telemetry.enabled else ""
        view = attempt_view_of(
            channel, provider, provider_message_id, status, batch.now_ms, error, key, version, trace_id
        )
        batch.settlement.record_view(job.item.entry.shard, notice, view)
        if status != notice_pb2.NOTICE_STATUS_SENT:
            record_send(self._telemetry.metrics, notice, job.route.channel, status, batch.now_ms)
            return
        # Sends are counted in the batch's tally; the lag measured only when metrics record (the
        # no-op histogram would drop it anyway).
        batch.sent[job.route.channel] += 1
        if self._telemetry.enabled and notice.HasField("due_at"):
            self._telemetry.metrics.schedule_lag(batch.now_ms - notice.due_at.ToMilliseconds(), notice.kind)

    def _give_up(
        self,
        item: _Item,
        status: notice_pb2.NoticeStatus.ValueType,
        reason: str,
        now_ms: int,
        settlement: Settlement,
    ) -> None:
        """Record a notice that no channel took: SUPPRESSED (nothing to try) or DEAD_LETTER (all failed)."""
        attempt = notice_pb2.DeliveryAttempt(
            status=status, attempted_at=timestamp(now_ms), error=reason, version=item.notice.version
        )
        settlement.record(item.entry.shard, item.notice, attempt)
        if status == notice_pb2.NOTICE_STATUS_DEAD_LETTER:
            settlement.dead_letter(item.entry.shard, item.notice, reason)

    async def _remove_dead(self, dead_by_recipient: dict[str, list[Destination]], jobs: list[_Job]) -> None:
        """Prune dead addresses from the stored preferences, and from this batch's copies so a
        fallback round does not use them. Rare (failures only), so one WATCH/MULTI per recipient."""
        await asyncio.gather(
            *(
                recipients.remove_destinations(self._redis, recipient_id, dead, self._shards)
                for recipient_id, dead in dead_by_recipient.items()
            )
        )
        for job in jobs:
            item = job.item
            dead = dead_by_recipient.get(item.notice.recipient_id)
            if dead and item.prefs is not None:
                item.prefs = recipients.without(item.prefs, dead) or item.prefs


async def run_gateway(
    settings: Settings,
    redis: Redis,
    clock: Clock,
    channels: Mapping[str, Channel],
    stop: asyncio.Event,
    *,
    renderer: Renderer | None = None,
    consumer: str | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Run a gateway until ``stop`` is set; any number may run at once against the same Redis, each
    under its own consumer name (default: host and process id)."""
    await Gateway(
        settings, redis, clock, channels, renderer=renderer, consumer=consumer, telemetry=telemetry
    ).run(stop)


async def run_configured_gateway(
    settings: Settings, redis: Redis, clock: Clock, stop: asyncio.Event, *, telemetry: Telemetry | None = None
) -> None:
    """``run_gateway`` with the channels the settings name (entry points), closed when it stops."""
    from channels.registry import load_channels

    channels = load_channels(settings.channels, settings.channel_options)
    log.info("relais gateway started with channels %s", ", ".join(channels))
    try:
        await run_gateway(settings, redis, clock, channels, stop, telemetry=telemetry)
    finally:
        for channel in channels.values():
            await channel.aclose()
