"""The scheduler: moves due notices from the shards' due sets to their outbox streams.

Pending notices wait in ``due:{s}`` (score = due unix ms, member = ``"<parcel_id>:<KIND>"``) with their
body in the parcel hash. A :class:`Dispatcher` claims them in batches with ``common/lua/claim.lua``: one
script call per shard, all shards' calls pipelined in one round trip. The script is atomic, so several
dispatchers (tasks or processes) may claim the same shards at once without handing a notice out twice.

Internal timers share the due sets: a member ``"<parcel_id>:CHECK_<NAME>"`` (see :func:`timer_member`)
is not a notice; when due, the claim *leases* it (its score becomes now + twice ``timer_timeout_s``)
and the dispatcher calls the handler registered for ``NAME`` with ``(shard, parcel_id, NAME)``. A
handler that succeeds has its timer removed; one that fails, or a timer with no handler here, is put
back ``timer_retry_ms`` later; one that runs past ``timer_timeout_s`` is left to its lease. Each only
if the handler did not reschedule the timer itself. These settlements go with the shard's next claim
call (``claim_once`` sends them at once). A dispatcher killed while its handlers run settles nothing:
its timers are due again when their lease ends. Timers are so at least once, and handlers must be
idempotent. In :meth:`Dispatcher.run` handlers run beside the claims, never in front of them: at most
``timer_concurrency`` at once, each within ``timer_timeout_s`` of its claim (waiting for a slot
included); due timers beyond what the dispatcher may hold are deferred in the due set by
``TIMER_DEFER_MS``, so notices behind them still go.

The loop sleeps until the earliest due time (the claim script reports it, at no extra round trip).
Every write that adds to a due set publishes the earliest due time it added on
``keys.SCHEDULER_WAKE_CHANNEL``, in the same round trip: the engine's parcel writes
(``ParcelStore.write``, in any engine worker), the gateway's retries and deferrals and the dead-letter
replay (``settle.lua``), the alert check timers (``alerts_apply.lua``) and the claims' own leases,
deferrals and settlements (``claim.lua``: for another dispatcher of the same shards). The dispatcher
follows that channel on a connection of its own and wakes when a time comes before the one it sleeps
for, so a notice due now goes at once. Wake-ups coalesce: all those that arrive during a round or a
sleep cost one more round, which takes everything due. :meth:`Dispatcher.wake` does the same within
a process. The sleep still ends after ``max_idle_s``, for a message lost (no subscriber yet, the
channel reconnecting) or a due set written by hand. Cost per claim is O(log n + batch), whatever is
pending.
A failed round (any Redis error: a lost connection, READONLY after a failover, a script error) is
logged and retried after a backoff that doubles up to ``max_backoff_s``: the loop never dies of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import NoOpTracer, Tracer
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from common import keys
from common.clock import Clock
from common.redis_client import register
from common.settings import SchedulerSettings

log = logging.getLogger(__name__)

TIMER_PREFIX = "CHECK_"
# The first retry after a failed claim round; each further failure doubles it, up to max_backoff_s.
FIRST_BACKOFF_S = 0.1
# Timers a dispatcher holds (running or waiting for a slot) per slot of ``timer_concurrency``: enough
# to keep every slot busy between two claim rounds. Beyond it they wait in Redis, not in memory.
HELD_PER_SLOT = 32
# How much later a due timer beyond what the dispatcher may hold is tried again.
TIMER_DEFER_MS = 1000
# On stop, how long handlers still running get to finish before they are cancelled and handed back.
STOP_GRACE_S = 1.0

TimerHandler = Callable[[int, str, str], Awaitable[None]]
"""``async handler(shard, parcel_id, name) -> None`` for a due timer ``<parcel_id>:CHECK_<name>``."""


def timer_member(parcel_id: str, name: str) -> str:
    """The due-set member of timer ``name`` of a parcel: ZADD it to ``keys.due(shard)`` to schedule."""
    if not name or ":" in name:
        raise ValueError("timer name must be non-empty and without ':'")
    return keys.notice_id(parcel_id, TIMER_PREFIX + name)


def parse_timer(member: str) -> tuple[str, str]:
    """``(parcel_id, name)`` of a timer member (the inverse of :func:`timer_member`)."""
    parcel_id, _, kind = member.rpartition(":")
    if not kind.startswith(TIMER_PREFIX):
        raise ValueError("not a timer member")
    return parcel_id, kind[len(TIMER_PREFIX) :]


@dataclass(frozen=True)
class ClaimStats:
    """What one claim round did, over all shards."""

    # Notices moved to an outbox.
    claimed: int = 0
    # Due members without a body (withdrawn notices), removed.
    dropped: int = 0
    # Due timers taken; of those, ``timer_failures`` failed, timed out or had no handler (counted by
    # ``claim_once`` only, which waits for their handlers).
    timers: int = 0
    timer_failures: int = 0
    # Due timers left for later: the dispatcher held as many as it may.
    timers_deferred: int = 0
    # The earliest due time still pending on any shard, None if nothing is pending.
    next_due_ms: int | None = None
    # Some shard had a full batch due: more may be due right now.
    saturated: bool = False
    # Redis round trips spent claiming (timer handlers' own calls are not counted).
    round_trips: int = 0


@dataclass(frozen=True)
class _ShardReply:
    shard: int
    claimed: int
    dropped: int
    next_due_ms: int | None
    deferred: int
    timers: tuple[str, ...]


class Dispatcher:
    """Claims due notices of ``shards`` (a count, or the shard numbers this dispatcher serves).

    ``batch_size`` is the most a shard hands out per script call: a claim round moves up to
    ``batch_size * len(shards)`` notices in one round trip. The idle limit and the timer parameters
    default to ``SchedulerSettings`` (``RELAIS_SCHEDULER_*``); ``engine.app.build_dispatcher`` builds
    one from the settings.
    """

    def __init__(
        self,
        redis: Redis,
        clock: Clock,
        shards: int | Sequence[int],
        *,
        batch_size: int = 1000,
        max_idle_s: float = SchedulerSettings.max_idle_s,
        max_backoff_s: float = 5.0,
        timer_retry_ms: int = SchedulerSettings.timer_retry_ms,
        timer_concurrency: int = SchedulerSettings.timer_concurrency,
        timer_timeout_s: float = SchedulerSettings.timer_timeout_s,
        tracer: Tracer | None = None,
    ) -> None:
        # Lua's unpack-free claim has no stack limit, but a batch this size already blocks Redis
        # for a few milliseconds: beyond it, latency for everyone else suffers.
        if not 1 <= batch_size <= 10_000:
            raise ValueError("batch_size must be 1 to 10000")
        if max_idle_s <= 0 or max_backoff_s <= 0:
            raise ValueError("max_idle_s and max_backoff_s must be positive")
        if timer_retry_ms <= 0 or timer_concurrency <= 0:
            raise ValueError("timer_retry_ms and timer_concurrency must be positive")
        if timer_timeout_s <= 0:
            raise ValueError("timer_timeout_s must be positive")
        self._redis = redis
        self._clock = clock
        self._tracer = tracer or NoOpTracer()
        self._shards: tuple[int, ...] = tuple(range(shards)) if isinstance(shards, int) else tuple(shards)
        if not self._shards:
            raise ValueError("a dispatcher needs at least one shard")
        self._batch_size = batch_size
        self._batch_arg = str(batch_size)
        self._max_idle_s = max_idle_s
        self._max_backoff_s = max_backoff_s
        self._timer_retry_ms = timer_retry_ms
        self._timer_slots = asyncio.Semaphore(timer_concurrency)
        self._max_held = timer_concurrency * HELD_PER_SLOT
        # Timers this dispatcher holds, by (shard, member): the end of the lease it holds them by.
        self._held: dict[tuple[int, str], int] = {}
        self._timer_tasks: set[asyncio.Task[bool]] = set()
        self._timer_timeout_s = timer_timeout_s
        # Twice the handler's timeout: a live dispatcher settles its timer (done, failed or timed out)
        # well before the lease ends, so only a dead one's timers are claimed again.
        self._timer_lease_ms = max(int(timer_timeout_s * 2000), 1)
        # Per shard, the settlements (member, lease end, new score or "" to remove) of timers whose
        # handler finished, flat as the claim script takes them; sent with that shard's next call.
        self._settlements: dict[int, list[str]] = {s: [] for s in self._shards}
        self._script = register(redis, "claim")
        self._keys = {s: (keys.due(s), keys.outbox(s), keys.parcel(s, "")) for s in self._shards}
        self._handlers: dict[str, TimerHandler] = {}
        self._wakeup = asyncio.Event()
        # When (clock ms) the loop claims next: lowered by wake() and by the wake-up channel.
        self._wake_at_ms = math.inf

    @property
    def shards(self) -> tuple[int, ...]:
        return self._shards

    def register_timer(self, name: str, handler: TimerHandler) -> None:
        """Call ``handler(shard, parcel_id, name)`` when a ``timer_member(parcel_id, name)`` is due."""
        timer_member("x", name)  # validates the name
        if name in self._handlers:
            raise ValueError(f"timer {name!r} already has a handler")
        self._handlers[name] = handler

    def wake(self) -> None:
        """Claim again now: something was scheduled earlier than the loop is sleeping for."""
        self._wake_at(-math.inf)

    def _wake_at(self, due_ms: float) -> None:
        # Only earlier than planned: a later time would wake the loop to sleep again.
        if due_ms < self._wake_at_ms:
            self._wake_at_ms = due_ms
            self._wakeup.set()

    async def claim_once(self) -> ClaimStats:
        """One claim round over every shard (one round trip), then the due timers' handlers, waited
        for and settled (one more round trip when there were any)."""
        return await self._traced_round(wait=True)

    async def _traced_round(self, *, wait: bool) -> ClaimStats:
        with self._tracer.start_as_current_span("scheduler.claim") as span:
            stats = await self._claim_round(wait=wait)
            span.set_attribute("relais.claimed", stats.claimed)
            span.set_attribute("relais.timers", stats.timers)
            return stats

    async def _claim_round(self, *, wait: bool) -> ClaimStats:
        """Claim every shard and start the handlers of the timers taken; with ``wait``, wait for
        them and settle them before returning."""
        now_ms = self._clock.now_ms()
        replies, error, round_trips = await self._claim(now_ms, self._shards, self._batch_arg)
        # The shards that answered leased their timers: their handlers run even when another shard
        # failed, rather than leaving those timers to wait for the end of their lease.
        started = self._start_timers(replies, now_ms + self._timer_lease_ms)
        failures = 0
        if wait and started:
            failures = (await asyncio.gather(*started)).count(False)
            round_trips += await self._settle()
        if error is not None:
            raise error
        pending = [r.next_due_ms for r in replies if r.next_due_ms is not None]
        return ClaimStats(
            claimed=sum(r.claimed for r in replies),
            dropped=sum(r.dropped for r in replies),
            timers=sum(len(r.timers) for r in replies),
            timer_failures=failures,
            timers_deferred=sum(r.deferred for r in replies),
            next_due_ms=min(pending) if pending else None,
            saturated=any(
                r.claimed + r.dropped + r.deferred + len(r.timers) >= self._batch_size for r in replies
            ),
            round_trips=round_trips,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Claim until ``stop`` is set; a claim round in progress finishes first, and timer handlers
        still running get ``STOP_GRACE_S`` before they are cancelled and their timers handed back.

        Timer handlers run beside the claims (at most ``timer_concurrency`` at once), never in front
        of them: a slow handler holds back no notice. Their settlements go with the next round."""
        relay = asyncio.create_task(self._relay(stop))
        listener = asyncio.create_task(self._listen())
        failures = 0
        try:
            while not stop.is_set():
                # Reset before claiming, so what is published or woken during the claim is not lost.
                self._wake_at_ms = math.inf
                try:
                    stats = await self._traced_round(wait=False)
                except RedisError as exc:
                    failures += 1
                    backoff_s = min(FIRST_BACKOFF_S * 2 ** (failures - 1), self._max_backoff_s)
                    # The error's type and code only: its message may quote keys (parcel ids).
                    log.warning("claim failed (%s), retrying in %.1fs", _describe(exc), backoff_s)
                    # Only stop cuts the backoff short: a wake() would just meet the same failure.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff_s)
                    continue
                failures = 0
                self._wake_at(self._clock.now_ms() + self._delay_after(stats) * 1000)
                await self._sleep(stop)
        finally:
            for task in (relay, listener):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._stop_timers()

    async def _sleep(self, stop: asyncio.Event) -> None:
        """Until the planned wake-up time, moved earlier meanwhile by wake() or the wake-up channel,
        and at most ``max_idle_s``: what is scheduled without a wake-up (a message lost while the
        channel reconnected) is still seen."""
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + self._max_idle_s
        while not stop.is_set():
            self._wakeup.clear()
            wait_s = min((self._wake_at_ms - self._clock.now_ms()) / 1000, idle_until - loop.time())
            if wait_s <= 0:
                await asyncio.sleep(0)  # let the rest of the process run between full batches
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
            except TimeoutError:
                return

    async def _listen(self) -> None:
        """Follow the wake-up channel (every writer of a due set publishes the earliest due time it
        added) on a connection of its own, subscribing again after a failure, with the claims'
        backoff."""
        failures = 0
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(keys.SCHEDULER_WAKE_CHANNEL)
                if failures:
                    log.info("wake-up channel subscribed again")
                    self.wake()  # what was published meanwhile is lost: one claim round finds it
                failures = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        self._published(message["data"])
            except (RedisError, OSError) as exc:
                failures += 1
                # Once: the claims report Redis being down, and the wake-up only saves latency.
                if failures == 1:
                    log.warning("wake-up channel lost (%s): subscribing again", _describe(exc))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await asyncio.sleep(min(FIRST_BACKOFF_S * 2 ** (failures - 1), self._max_backoff_s))

    def _published(self, data: object) -> None:
        # Anything but a time is not ours: ignored.
        if isinstance(data, bytes | str) and data.isdigit():
            self._wake_at(int(data))

    async def _stop_timers(self) -> None:
        """Let running handlers finish within the grace, cancel the rest, and settle them all."""
        if self._timer_tasks:
            _done, late = await asyncio.wait(self._timer_tasks, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._settle()

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakeup.set()

    def _delay_after(self, stats: ClaimStats) -> float:
        """How long to sleep after a successful round."""
        if stats.saturated:
            return 0.0
        if stats.next_due_ms is None:
            return self._max_idle_s
        wait_s = (stats.next_due_ms - self._clock.now_ms()) / 1000
        return min(max(wait_s, 0.0), self._max_idle_s)

    async def _claim(
        self, now_ms: int, shards: Sequence[int], limit: str
    ) -> tuple[list[_ShardReply], RedisError | None, int]:
        """Claim up to ``limit`` items of each of ``shards`` (``"0"``: only settle), sending their
        settlements: the replies of the shards whose script ran, the first error of those whose did
        not, and the round trips spent."""
        round_trips = 0
        lease_arg = str(now_ms + self._timer_lease_ms)
        defer_arg = str(now_ms + TIMER_DEFER_MS)
        # What may still be held, shared by the shards (rounded up: a few more at worst).
        free = max(self._max_held - len(self._held), 0)
        cap_arg = str(-(-free // len(shards)))
        sent = {shard: len(self._settlements[shard]) for shard in shards}
        results: dict[int, Any] = {}
        todo = list(shards)
        for _attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for shard in todo:
                due, outbox, parcel_prefix = self._keys[shard]
                # evalsha directly, not through the pipeline's script check: a NOSCRIPT is answered by
                # loading once and claiming again within this round.
                pipe.evalsha(
                    self._script.sha,
                    2,
                    due,
                    outbox,
                    str(now_ms),
                    limit,
                    parcel_prefix,
                    TIMER_PREFIX,
                    lease_arg,
                    cap_arg,
                    defer_arg,
                    keys.SCHEDULER_WAKE_CHANNEL,
                    *self._settlements[shard][: sent[shard]],
                )
            results.update(zip(todo, await pipe.execute(raise_on_error=False), strict=True))
            round_trips += 1
            # Only those again: the others' scripts ran, and what they claimed is in their replies.
            todo = [shard for shard in todo if isinstance(results[shard], NoScriptError)]
            if not todo:
                break
            # Redis restarted or flushed its scripts: load once and claim again.
            await self._redis.script_load(self._script.script)
            round_trips += 1
        replies = []
        error: RedisError | None = None
        for shard in shards:
            result = results[shard]
            if isinstance(result, RedisError):
                error = error or result
            else:
                # Settled: later settlements (appended meanwhile) wait for the next call.
                del self._settlements[shard][: sent[shard]]
                replies.append(_parse_reply(shard, result))
        return replies, error, round_trips

    def _start_timers(self, replies: Iterable[_ShardReply], lease_ms: int) -> list[asyncio.Task[bool]]:
        """Start the handlers of the timers taken, each to finish within ``timer_timeout_s`` from
        now (waiting for a slot included), well inside its lease."""
        deadline = asyncio.get_running_loop().time() + self._timer_timeout_s
        started = []
        for reply in replies:
            for member in reply.timers:
                held = (reply.shard, member)
                fresh = held not in self._held
                # Taken again while held (its lease ended under a stalled loop): the running handler
                # settles it under the new lease, and it does not run twice here.
                self._held[held] = lease_ms
                if fresh:
                    task = asyncio.create_task(self._run_timer(reply.shard, member, deadline))
                    self._timer_tasks.add(task)
                    task.add_done_callback(functools.partial(self._forget, held))
                    started.append(task)
        return started

    async def _settle(self) -> int:
        """Send the queued settlements now, one round trip for every shard; the round trips spent. A
        failure is logged, not raised: they go with the next claim, or else the lease brings the
        timers back."""
        shards = [shard for shard, pending in self._settlements.items() if pending]
        if not shards:
            return 0
        try:
            _replies, error, round_trips = await self._claim(self._clock.now_ms(), shards, "0")
        except RedisError as exc:
            error, round_trips = exc, 1
        if error is not None:
            log.warning("could not settle timers (%s): settling them later", _describe(error))
        return round_trips

    def _forget(self, held: tuple[int, str], task: asyncio.Task[bool]) -> None:
        # Here, not in the handler's own finally: a task cancelled before it started runs none of it.
        self._timer_tasks.discard(task)
        self._held.pop(held, None)

    async def _run_timer(self, shard: int, member: str, deadline: float) -> bool:
        """Run the timer's handler and queue its settlement; whether the handler ran to completion."""
        parcel_id, name = parse_timer(member)
        handler = self._handlers.get(name)
        after: str | None = ""
        try:
            if handler is None:
                # Handed back rather than lost: a dispatcher with the handler (or this one, once it is
                # registered) takes it later.
                log.warning("no handler for timer %s of parcel %s: handed back", name, parcel_id)
                after = str(self._clock.now_ms() + self._timer_retry_ms)
            else:
                try:
                    async with asyncio.timeout_at(deadline), self._timer_slots:
                        await handler(shard, parcel_id, name)
                except TimeoutError:
                    # Not settled: the lease brings it back, by when whatever stalled it may be over.
                    log.warning(
                        "timer %s of parcel %s timed out: due again at its lease's end", name, parcel_id
                    )
                    after = None
                except Exception:
                    log.exception("timer %s of parcel %s failed: retrying later", name, parcel_id)
                    after = str(self._clock.now_ms() + self._timer_retry_ms)
        except asyncio.CancelledError:
            # Stopped: due again at once, for another dispatcher (or this one, restarted) to take.
            after = str(self._clock.now_ms())
            raise
        finally:
            lease_ms = self._held[(shard, member)]
            if after is not None:
                self._settlements[shard] += (member, str(lease_ms), after)
        return after == ""


def _describe(exc: Exception) -> str:
    """The error's type, and for an error reply its code word ("READONLY", "WRONGTYPE", "ERR"): what
    an operator needs, without the rest of the message, which may quote keys or script arguments."""
    name = type(exc).__name__
    if isinstance(exc, ResponseError):
        code = str(exc).split(" ", 1)[0]
        if code.isalpha() and code.isupper():
            return f"{name} {code}"
    return name


def _parse_reply(shard: int, result: list[object]) -> _ShardReply:
    claimed, dropped, next_due, deferred, *timers = result
    assert isinstance(claimed, int)
    assert isinstance(dropped, int)
    assert isinstance(deferred, int)
    # Scores come back as strings ("1773133200000"); a pending count of zero as nil.
    next_due_ms = int(float(next_due)) if isinstance(next_due, bytes | str) else None
    return _ShardReply(
        shard=shard,
        claimed=claimed,
        dropped=dropped,
        next_due_ms=next_due_ms,
        deferred=deferred,
        timers=tuple(t.decode() if isinstance(t, bytes) else str(t) for t in timers),
    )
