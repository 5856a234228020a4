"""ParcelService: register parcels (merging what carriers already scanned) and read a parcel's story.

``RegisterParcels`` rejects bad entries by index (a parcel named again later in the same request among
them) and applies the rest: it stores the order facts, merges them into a parcel carriers may have
scanned first, plans what became plannable (the recipient is now known) and plans pending notices
again with the new facts. It indexes each parcel under its recipient (``engine.recipient_index``)
for the re-planning on a preference change and for erasure.

``GetParcel`` answers from ONE script call (``view_parcel.lua``): the parcel's version, state, which
notices are still due and when (the gateway puts back there, later, what it could not send yet), the
gateway's attempts fields of its hash (not the whole hash: it also holds the notice bodies, a few kB
a parcel GetParcel does not show) and its alert hash. One command, not a pipeline of three:
redis-py's pipeline machinery cost more client CPU than the call itself.
Another merchant's parcel is NOT_FOUND, like an unknown one: nobody can probe which tracking numbers exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import grpc
from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, parcel_pb2_grpc, state_pb2, types_pb2

from common import keys
from common.clock import Clock
from common.keys import kind_name
from common.redis_client import register
from engine import auth
from engine.alert_store import parse_parcel_alerts
from engine.planner import recipient_changed
from engine.recipient_index import RecipientIndex
from engine.state import (
    ConflictError,
    ParcelRecord,
    ParcelStore,
    add_full_timeline,
    attempts_field,
    load_state,
)
from engine.validation import MAX_BATCH_PARCELS, Problem, check_parcel_id, check_registration, set_stamp_ms

Context = grpc.aio.ServicerContext[object, object]

_WITHDRAWN = (notice_pb2.NOTICE_STATUS_CANCELLED, notice_pb2.NOTICE_STATUS_SUPPRESSED)

# Every notice kind's attempts field, in one order: GetParcel's HMGET asks for all of them at once.
_ATTEMPT_KINDS = tuple(kind_name(k) for k in types_pb2.NoticeKind.values() if k)
_ATTEMPT_FIELDS = [attempts_field(name) for name in _ATTEMPT_KINDS]


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def notice_view(
    parcel_id: str, mark: state_pb2.NoticeMark, due: Mapping[str, int], raw_attempts: bytes | None
) -> notice_pb2.NoticeView:
    """One notice as GetParcel shows it: the engine's mark plus the gateway's attempts; ``due`` holds
    the due time of each kind still waiting in the due set."""
    name = kind_name(mark.kind)
    view = notice_pb2.NoticeView(
        notice_id=keys.notice_id(parcel_id, name),
        kind=mark.kind,
        version=mark.version,
        status_reason=mark.status_reason,
    )
    due_ms = due.get(name)
    # Waiting, it goes when the due set says: later than planned if the gateway put it back.
    scheduled_ms = mark.due_ms if due_ms is None else due_ms
    if scheduled_ms:
        set_stamp_ms(view.scheduled_at, scheduled_ms)
    if mark.HasField("slot"):
        view.slot.CopyFrom(mark.slot)
    if mark.HasField("previous_slot"):
        view.previous_slot.CopyFrom(mark.previous_slot)
    if raw_attempts:
        # The gateway appends one serialized NoticeView per attempt: concatenated, they parse as one.
        view.attempts.extend(notice_pb2.NoticeView.FromString(raw_attempts).attempts)
    last = view.attempts[-1] if view.attempts else None
    if mark.status in _WITHDRAWN:
        view.status = mark.status
    elif due_ms is not None:
        # Put back by the gateway: after a failed attempt (recorded), or unsent and without an
        # attempt spent, under a rate limit or behind a slow provider (then only its time moved).
        retrying = (last is not None and last.status == notice_pb2.NOTICE_STATUS_RETRYING) or (
            due_ms != mark.due_ms
        )
        view.status = notice_pb2.NOTICE_STATUS_RETRYING if retrying else notice_pb2.NOTICE_STATUS_SCHEDULED
    else:
        view.status = last.status if last is not None else notice_pb2.NOTICE_STATUS_QUEUED
    if not view.status_reason and last is not None and last.status == view.status:
        # What the gateway decided (suppressed without a channel, failed, dead-lettered) says why
        # in its attempt; the view says it where the engine's own reasons go.
        view.status_reason = last.error
    for attempt in reversed(view.attempts):
        if attempt.status == notice_pb2.NOTICE_STATUS_SENT:
            view.sent_at.CopyFrom(attempt.attempted_at)
            view.channel = attempt.channel
            break
    return view


def parcel_view(
    record: ParcelRecord, attempts: Mapping[str, bytes], due: Mapping[str, int]
) -> parcel_pb2.ParcelView:
    """The parcel as GetParcel shows it (alerts are added by the caller); ``attempts`` are the
    gateway's attempts by notice kind name, ``due`` the due times of the kinds still waiting."""
    state = record.state
    view = parcel_pb2.ParcelView(
        parcel_id=record.parcel_id,
        merchant_id=state.merchant_id,
        carrier=state.carrier,
        recipient_id=state.recipient_id,
        registered=state.registered,
        status=state.status,
        substatus=state.substatus,
        exception_reason=state.exception_reason,
    )
    add_full_timeline(state, view.timeline)
    if state.HasField("slot"):
        view.current_slot.CopyFrom(state.slot)
    if state.HasField("pickup_point"):
        view.pickup_point.CopyFrom(state.pickup_point)
    if state.HasField("order"):
        view.order.CopyFrom(state.order)
    for mark in state.notices:
        raw = attempts.get(kind_name(mark.kind))
        view.notices.append(notice_view(record.parcel_id, mark, due, raw))
    if state.created_ms:
        set_stamp_ms(view.created_at, state.created_ms)
    if state.updated_ms:
        set_stamp_ms(view.updated_at, state.updated_ms)
    if state.expires_ms:
        set_stamp_ms(view.expires_at, state.expires_ms)
    return view


def merge_registration(
    state: state_pb2.ParcelState, parcel: parcel_pb2.ParcelRegistration, now_ms: int
) -> None:
    """Fold the order facts into the state (a parcel scanned first keeps its events; the carrier is
    the one the merchant names)."""
    state.registered = True
    state.merchant_id = parcel.merchant_id
    state.recipient_id = parcel.recipient_id
    if state.carrier != parcel.carrier:
        # The merchant knows whom they shipped with; a carrier that scanned first keeps its events,
        # each naming it (they were stored without the carrier while it was the parcel's).
        for entry in state.timeline:
            if not entry.event.carrier:
                entry.event.carrier = state.carrier
        state.carrier = parcel.carrier
    state.order.CopyFrom(parcel.order)
    if not state.created_ms:
        state.created_ms = now_ms
    state.updated_ms = now_ms


class ParcelServicer(parcel_pb2_grpc.ParcelServiceServicer):
    def __init__(self, store: ParcelStore, clock: Clock) -> None:
        self._store = store
        self._redis: Redis = store.redis
        self._clock = clock
        self._view = register(self._redis, "view_parcel")
        self._index = RecipientIndex(self._redis, store.settings)

    def _screen(
        self, parcels: Sequence[parcel_pb2.ParcelRegistration], now_ms: int
    ) -> tuple[dict[str, tuple[int, parcel_pb2.ParcelRegistration]], list[parcel_pb2.RejectedParcel]]:
        wanted: dict[str, tuple[int, parcel_pb2.ParcelRegistration]] = {}
        rejected: list[parcel_pb2.RejectedParcel] = []
        # Where each parcel id first appeared, accepted or not: which of two registrations of one
        # parcel in a request the caller meant is theirs to say, so a later one is refused, never
        # silently merged or dropped.
        first: dict[str, int] = {}
        for index, parcel in enumerate(parcels):
            problem = check_registration(parcel, now_ms)
            if problem is None and parcel.parcel_id in first:
                problem = Problem(
                    "parcel_id",
                    f"parcel_id is already at index {first[parcel.parcel_id]} of this request;"
                    " register a parcel once per request",
                )
            if problem is None and not auth.can_access_merchant(parcel.merchant_id):
                problem = Problem("merchant_id", "the caller may not register parcels for this merchant")
            if problem is None and not auth.can_access_recipient(parcel.recipient_id):
                problem = Problem("recipient_id", "the recipient id is outside the caller's namespace")
            first.setdefault(parcel.parcel_id, index)
            if problem is not None:
                rejected.append(
                    parcel_pb2.RejectedParcel(index=index, field=problem.field, reason=problem.reason)
                )
            else:
                wanted[parcel.parcel_id] = (index, parcel)
        return wanted, rejected

    async def RegisterParcels(  # noqa: N802 - gRPC method name
        self, request: parcel_pb2.RegisterParcelsRequest, context: Context
    ) -> parcel_pb2.RegisterParcelsResponse:
        if len(request.parcels) > MAX_BATCH_PARCELS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "parcels: at most 5000 per request")
        now_ms = self._clock.now_ms()
        wanted, rejected = self._screen(request.parcels, now_ms)
        taken: dict[str, int] = {}
        previous: dict[str, str] = {}

        def mutate(record: ParcelRecord) -> bool:
            index, parcel = wanted[record.parcel_id]
            state = record.state
            if state.merchant_id and state.merchant_id != parcel.merchant_id:
                taken[record.parcel_id] = index
                return False
            taken.pop(record.parcel_id, None)
            if state.recipient_id and state.recipient_id != parcel.recipient_id:
                previous[record.parcel_id] = state.recipient_id
                recipient_changed(state, record.pending)
            merge_registration(state, parcel, now_ms)
            return True

        if wanted:
            try:
                await self._store.update(list(wanted), mutate, refresh=True)
            except ConflictError:
                # Contention, not a bug (so no INTERNAL, no error log): registering is idempotent, so
                # the caller's retry is safe, and it indexes the parcels this attempt already wrote.
                await _abort(
                    context, grpc.StatusCode.ABORTED, "parcels changed concurrently; send the request again"
                )
            indexed = {pid: parcel.recipient_id for pid, (_i, parcel) in wanted.items() if pid not in taken}
            await self._index.add(indexed, previous, now_ms)
        for index in taken.values():
            rejected.append(
                parcel_pb2.RejectedParcel(
                    index=index, field="parcel_id", reason="the parcel is registered by another merchant"
                )
            )
        rejected.sort(key=lambda r: r.index)
        return parcel_pb2.RegisterParcelsResponse(registered=len(wanted) - len(taken), rejected=rejected)

    async def GetParcel(  # noqa: N802 - gRPC method name
        self, request: parcel_pb2.GetParcelRequest, context: Context
    ) -> parcel_pb2.ParcelView:
        pid = request.parcel_id
        problem = check_parcel_id(pid)
        if problem is not None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem.reason)
        view = await self.get_parcel(pid)
        # A parcel nobody registered yet belongs to no merchant: only operators may read it then.
        if view is None or not auth.can_access_merchant(view.merchant_id):
            await _abort(context, grpc.StatusCode.NOT_FOUND, "parcel_id: no such parcel")
        return view

    async def get_parcel(self, parcel_id: str) -> parcel_pb2.ParcelView | None:
        """The parcel's whole story in one round trip; None when unknown (or expired)."""
        shard = self._store.shard(parcel_id)
        call_keys = [keys.due(shard), keys.parcel(shard, parcel_id), keys.alerts(shard, parcel_id)]
        reply = await self._view(keys=call_keys, args=[parcel_id, *_ATTEMPT_FIELDS])
        if reply is None:
            return None
        raw_version, raw_state, flat_waiting, raw_attempts, flat_alerts = reply
        # Scores as Redis formats doubles; due times are whole milliseconds.
        due = {
            kind.decode(): int(float(score))
            for kind, score in zip(flat_waiting[::2], flat_waiting[1::2], strict=True)
        }
        state = load_state(parcel_id, raw_state)
        record = ParcelRecord(parcel_id, shard, int(raw_version), state, frozenset(due))
        attempts = {name: raw for name, raw in zip(_ATTEMPT_KINDS, raw_attempts, strict=True) if raw}
        view = parcel_view(record, attempts, due)
        alerts = dict(zip(flat_alerts[::2], flat_alerts[1::2], strict=True))
        view.open_alerts.extend(parse_parcel_alerts(alerts).unresolved())
        return view


def add_parcel_service(servicer: ParcelServicer) -> Callable[[grpc.aio.Server], None]:
    """A ``register`` callable for ``engine.server.start_server``."""

    def add(server: grpc.aio.Server) -> None:
        parcel_pb2_grpc.add_ParcelServiceServicer_to_server(servicer, server)

    return add
