"""Everything a batch decided, written back in one round trip: one ``settle.lua`` call per shard.

Outcomes are appended to the parcel hash (``a:<KIND>``, read by GetParcel), finished sends mark their
idempotency keys ``sent``, retries and delays go back into the due set (only if the engine has not
superseded the notice meanwhile; the script then publishes the earliest due time it wrote on the
scheduler's wake-up channel, so one due now is not left to the dispatcher's idle limit), exhausted
notices go to the dead-letter stream, the merchants' counters (hashes of the shard) are incremented,
and the outbox entries are acknowledged (then trimmed off the stream in bulk, once no entry before
them is pending).
Spent SMS segments (a key per merchant, not of a shard) ride in the same pipeline.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from babel.numbers import get_currency_precision
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from relais.v1 import notice_pb2, types_pb2

from channels.base import Accepted
from common import counters, keys
from common.counters import Increment
from common.keys import kind_name
from common.redis_client import lua_array
from gateway.scripts import LuaScript

# An SMS budget counter outlives its month by a few days, for an operator to read.
SMS_BUDGET_TTL_S = 40 * 24 * 3600


# (shard, merchant id, kind, channel, (segments, cost in micro-units, currency)) of accepted sends.
_SentGroup: TypeAlias = tuple[
    int, str, types_pb2.NoticeKind.ValueType, types_pb2.Channel.ValueType, tuple[int, int, str]
]


@dataclass(slots=True)
class _ShardOps:
    keys: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    acked: list[bytes] = field(default_factory=list)


def attempt_view(attempt: notice_pb2.DeliveryAttempt) -> bytes:
    """A NoticeView holding just this attempt: appended to the parcel's earlier ones, the bytes parse
    as one view with every attempt."""
    return notice_pb2.NoticeView(attempts=[attempt]).SerializeToString()


# --- the same bytes, written directly for the gateway's hot path -------------------------------------
# Building a DeliveryAttempt and a NoticeView around it to serialise them cost a few µs per notice;
# the protobuf wire format of these few fields is simple enough to write (proto3: fields in number
# order, zero values left out), and the test holds it to protobuf's own bytes.

_VIEW_ATTEMPTS = 10  # NoticeView.attempts
_CHANNEL, _PROVIDER, _MESSAGE_ID, _STATUS, _AT, _ERROR, _KEY, _VERSION, _TRACE = range(
    1, 10
)  # DeliveryAttempt
_VARINT, _LENGTH_DELIMITED = 0, 2
# One byte each (field numbers below 16): the tags written for every notice.
_MESSAGE_ID_TAG, _ERROR_TAG, _KEY_TAG, _VIEW_TAG = (
    bytes((number << 3 | _LENGTH_DELIMITED,)) for number in (_MESSAGE_ID, _ERROR, _KEY, _VIEW_ATTEMPTS)
)
_TRACE_TAG = bytes((_TRACE << 3 | _LENGTH_DELIMITED,))
_VERSION_TAG = bytes((_VERSION << 3 | _VARINT,))


# Lengths and versions mostly fit one byte: their varints, made once.
_ONE_BYTE_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _number(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""


def _text(tag: bytes, value: str) -> bytes:
    raw = value.encode()
    return tag + _varint(len(raw)) + raw if raw else b""


def _tag(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


@functools.lru_cache(maxsize=64)
def _head(channel: int, provider: str) -> bytes:
    return _number(_tag(_CHANNEL, _VARINT), channel) + _text(_tag(_PROVIDER, _LENGTH_DELIMITED), provider)


@functools.lru_cache(maxsize=64)
def _status_at(status: int, at_ms: int) -> bytes:
    stamp = timestamp(at_ms).SerializeToString()
    at = _tag(_AT, _LENGTH_DELIMITED) + _varint(len(stamp)) + stamp
    return _number(_tag(_STATUS, _VARINT), status) + at


def attempt_view_of(
    channel: types_pb2.Channel.ValueType,
    provider: str,
    provider_message_id: str,
    status: notice_pb2.NoticeStatus.ValueType,
    at_ms: int,
    error: str,
    idempotency_key: str,
    version: int,
    trace_id: str = "",
) -> bytes:
    """``attempt_view`` of the DeliveryAttempt with these fields (``attempted_at`` = ``at_ms``)."""
    # One list of pieces joined once (this runs for every notice): the fields in number order, the
    # empty ones left out.
    parts = [_head(channel, provider)]
    if provider_message_id:
        raw = provider_message_id.encode()
        parts += (_MESSAGE_ID_TAG, _varint(len(raw)), raw)
    parts.append(_status_at(status, at_ms))
    if error:
        raw = error.encode()
        parts += (_ERROR_TAG, _varint(len(raw)), raw)
    if idempotency_key:
        raw = idempotency_key.encode()
        parts += (_KEY_TAG, _varint(len(raw)), raw)
    if version:
        parts += (_VERSION_TAG, _varint(version))
    if trace_id:
        raw = trace_id.encode()
        parts += (_TRACE_TAG, _varint(len(raw)), raw)
    attempt = b"".join(parts)
    return b"".join((_VIEW_TAG, _varint(len(attempt)), attempt))


def sent_counters(
    shard: int,
    merchant_id: str,
    kind: types_pb2.NoticeKind.ValueType,
    channel: types_pb2.Channel.ValueType,
    accepted: Accepted,
    now_ms: int,
) -> list[Increment]:
    """The merchant's counters for a notice a provider accepted: by kind and channel, and for SMS the
    segments and the estimated cost (providers report micro-units; counters keep minor units)."""
    cost = None
    if accepted.currency:
        digits = get_currency_precision(accepted.currency)
        cost = types_pb2.Money(
            currency_code=accepted.currency, amount_minor=round(accepted.cost_micros / 10 ** (6 - digits))
        )
    return counters.notice_sent(
        shard, merchant_id, now_ms, kind, channel, sms_segments=accepted.segments, sms_cost=cost
    )


def timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


class Settlement:
    """Collects a batch's writes per shard; ``execute`` sends them all in one pipeline."""

    def __init__(
        self,
        script: LuaScript,
        *,
        group: str,
        retention_ms: int,
        now_ms: int,
        dead_letter_retention_ms: int = 0,
    ) -> None:
        self._script = script
        self._group = group
        self._retention_ms = retention_ms
        # 0: dead letters stay until replayed or removed (callers that add none).
        self._dead_letter_retention_ms = dead_letter_retention_ms
        self._now_ms = now_ms
        self._shards: dict[int, _ShardOps] = defaultdict(_ShardOps)
        self._sms_segments: dict[str, int] = defaultdict(int)
        # Sends counted per merchant, kind, channel and price: their counters are built at execute,
        # once per group rather than once per notice.
        self._sent: dict[_SentGroup, int] = defaultdict(int)

    def _op(self, shard: int, name: str, *args: Any, key: str | None = None) -> None:
        ops = self._shards[shard]
        ops.args.append(name)
        ops.args.extend(args)
        if key is not None:
            ops.keys.append(key)

    def ack(self, shard: int, entry_id: bytes) -> None:
        self._shards[shard].acked.append(entry_id)

    def record(self, shard: int, notice: notice_pb2.Notice, attempt: notice_pb2.DeliveryAttempt) -> None:
        self.record_view(shard, notice, attempt_view(attempt))

    # record_view and sent run for every notice: their op written in place, not through _op.

    def record_view(self, shard: int, notice: notice_pb2.Notice, view: bytes) -> None:
        """``record`` with the attempt already as its view's bytes (``attempt_view_of``)."""
        ops = self._shards[shard]
        ops.args += ("rec", kind_name(notice.kind), view)
        ops.keys.append(keys.parcel(shard, notice.parcel_id))

    def told(self, shard: int, notice: notice_pb2.Notice) -> None:
        """A slot notice went out: the slot its recipient now knows, for the engine's planning."""
        slot = types_pb2.Slot(window=notice.slot, version=notice.version).SerializeToString()
        key = keys.parcel(shard, notice.parcel_id)
        self._op(shard, "told", notice.version, slot, notice.recipient_id, key=key)

    def sent(self, shard: int, idempotency_key: str) -> None:
        ops = self._shards[shard]
        ops.args.append("sent")
        ops.keys.append(keys.idempotency(shard, idempotency_key))

    def free(self, shard: int, idempotency_key: str) -> None:
        self._op(shard, "free", key=keys.idempotency(shard, idempotency_key))

    def reschedule(self, shard: int, notice: notice_pb2.Notice, due_ms: int) -> None:
        """Back into the due set at ``due_ms`` with ``notice`` as the new body, if still current."""
        body = notice_pb2.Notice()
        body.CopyFrom(notice)
        body.due_at.CopyFrom(timestamp(due_ms))
        key = keys.parcel(shard, notice.parcel_id)
        args = (
            kind_name(notice.kind),
            str(notice.version),
            notice.notice_id,
            due_ms,
            body.SerializeToString(),
        )
        self._op(shard, "resched", *args, key=key)

    def dead_letter(self, shard: int, notice: notice_pb2.Notice, reason: str) -> None:
        key = keys.parcel(shard, notice.parcel_id)
        args = (kind_name(notice.kind), str(notice.version), notice.SerializeToString(), reason)
        self._op(shard, "dlq", *args, key=key)

    def drop_dead_letter(self, shard: int, entry_id: bytes | str) -> None:
        self._op(shard, "dlqdel", entry_id)

    def spend_sms(self, budget_key: str, segments: int) -> None:
        self._sms_segments[budget_key] += max(1, segments)

    def count_sent(
        self,
        shard: int,
        merchant_id: str,
        kind: types_pb2.NoticeKind.ValueType,
        channel: types_pb2.Channel.ValueType,
        accepted: Accepted,
    ) -> None:
        """Count a notice of ``merchant_id`` and ``kind`` a provider accepted (``sent_counters``), summed
        with the batch's others."""
        price = (accepted.segments, accepted.cost_micros, accepted.currency)
        self._sent[shard, merchant_id, kind, channel, price] += 1

    def _count_sends(self) -> None:
        """The batch's counters, summed per hash and field, into their shard's script call: a few
        HINCRBYs per merchant, and one PEXPIRE per hash."""
        counts: dict[int, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        ttls_ms: dict[int, dict[str, int]] = defaultdict(dict)
        for (shard, merchant_id, kind, channel, price), times in self._sent.items():
            segments, cost_micros, currency = price
            accepted = Accepted("", segments=segments, cost_micros=cost_micros, currency=currency)
            for inc in sent_counters(shard, merchant_id, kind, channel, accepted, self._now_ms):
                counts[shard][inc.key, inc.field] += inc.amount * times
                if inc.ttl_ms is not None:
                    ttls_ms[shard][inc.key] = inc.ttl_ms
        self._sent.clear()
        for shard, fields in counts.items():
            for (key, name), amount in fields.items():
                self._op(shard, "incr", name, amount, key=key)
            for key, ttl_ms in ttls_ms[shard].items():
                self._op(shard, "pexp", ttl_ms, key=key)

    async def execute(self, redis: Redis, *, load_scripts: bool = False) -> int:
        """One round trip; returns how many notices were dropped as superseded. ``load_scripts`` for
        callers off the hot path that did not load the script at start (the CLI)."""
        self._count_sends()
        if not self._shards and not self._sms_segments:
            return 0
        if load_scripts:
            await self._script.load()
        pipe = redis.pipeline(transaction=False)
        for shard, ops in self._shards.items():
            fixed = [keys.outbox(shard), keys.due(shard), keys.dead_letters(shard)]
            args = [
                self._group,
                self._retention_ms,
                self._now_ms,
                lua_array(ops.args),
                lua_array(ops.acked),
                self._dead_letter_retention_ms,
                keys.SCHEDULER_WAKE_CHANNEL,
            ]
            self._script.queue(pipe, fixed + ops.keys, args)
        for budget_key, segments in self._sms_segments.items():
            pipe.incrby(budget_key, segments)
            pipe.expire(budget_key, SMS_BUDGET_TTL_S)
        replies = await pipe.execute()
        return sum(int(reply) for reply in replies[: len(self._shards)])
