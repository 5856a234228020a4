"""Shared pieces of the gateway tests: notices and preferences written into Redis the way the engine
writes them, a stand-in for the scheduler's claim (due → outbox), and a scripted channel.

``ScriptedChannel`` is a transport stand-in (like httpx's MockTransport): it implements the real
``channels.base.Channel`` protocol, records every message it is handed and answers with scripted
results per address. Nothing of the gateway's own logic is replaced.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Self

from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis
from relais.v1 import notice_pb2, preferences_pb2, types_pb2

from channels.base import Accepted, Destination, Message, SendResult
from common import keys
from common.keys import kind_name
from common.settings import GatewaySettings, Settings

SHARDS = 4


def settings(**gateway: object) -> Settings:
    base = GatewaySettings(backoff_base_s=10.0, backoff_max_s=60.0, batch_size=100, block_ms=1)
    return Settings(shards=SHARDS, gateway=replace(base, **gateway))  # type: ignore[arg-type]


def ts(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def make_notice(
    parcel_id: str,
    kind: types_pb2.NoticeKind.ValueType = types_pb2.NOTICE_KIND_SHIPPED,
    *,
    recipient_id: str = "r-1",
    merchant_id: str = "m-1",
    version: int = 1,
    value_minor: int = 0,
    slot_ms: tuple[int, int] | None = None,
    previous_slot_ms: tuple[int, int] | None = None,
    deadline_ms: int | None = None,
) -> notice_pb2.Notice:
    notice = notice_pb2.Notice(
        notice_id=f"{parcel_id}:{types_pb2.NoticeKind.Name(kind).removeprefix('NOTICE_KIND_')}",
        version=version,
        kind=kind,
        parcel_id=parcel_id,
        merchant_id=merchant_id,
        recipient_id=recipient_id,
        carrier="swisspost",
        parcel_status=types_pb2.TRACKING_STATUS_IN_TRANSIT,
        paid=True,
        actionable=True,
        declared_value=types_pb2.Money(currency_code="CHF", amount_minor=value_minor),
        shard=keys.shard_of(parcel_id, SHARDS),
    )
    if slot_ms is not None:
        notice.slot.start.CopyFrom(ts(slot_ms[0]))
        notice.slot.end.CopyFrom(ts(slot_ms[1]))
    if previous_slot_ms is not None:
        notice.previous_slot.start.CopyFrom(ts(previous_slot_ms[0] - 3_600_000))
        notice.previous_slot.end.CopyFrom(ts(previous_slot_ms[1] - 3_600_000))
    if deadline_ms is not None:
        notice.deadline.CopyFrom(ts(deadline_ms))
    return notice


async def hget(redis: Redis, key: str, field: str) -> bytes | None:
    """HGET, typed (redis-py's hash commands are typed for sync and async clients at once)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hget(key, field)
    (reply,) = await pipe.execute()
    return reply if reply is None else bytes(reply)


async def hset(redis: Redis, key: str, field: str, value: str | bytes | int) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.hset(key, field, value)  # type: ignore[arg-type]
    await pipe.execute()


async def put_prefs(redis: Redis, prefs: preferences_pb2.RecipientPreferences) -> None:
    key = keys.preferences(keys.shard_of(prefs.recipient_id, SHARDS), prefs.recipient_id)
    await redis.set(key, prefs.SerializeToString())


async def get_prefs(redis: Redis, recipient_id: str) -> preferences_pb2.RecipientPreferences:
    raw = await redis.get(keys.preferences(keys.shard_of(recipient_id, SHARDS), recipient_id))
    prefs = preferences_pb2.RecipientPreferences()
    prefs.ParseFromString(raw)
    return prefs


async def queue_notice(redis: Redis, notice: notice_pb2.Notice) -> None:
    """As the engine and the scheduler leave it: body and version in the parcel hash, entry in the outbox."""
    shard = notice.shard
    kind = kind_name(notice.kind)
    body = notice.SerializeToString()
    pipe = redis.pipeline(transaction=False)
    pipe.hset(keys.parcel(shard, notice.parcel_id), mapping={f"n:{kind}": body, f"nv:{kind}": notice.version})
    pipe.xadd(keys.outbox(shard), {"n": body})
    await pipe.execute()


async def claim_due(redis: Redis, now_ms: int) -> int:
    """The scheduler's claim, as it is specified (due members up to now → their body to the outbox)."""
    moved = 0
    for shard in range(SHARDS):
        members = await redis.zrangebyscore(keys.due(shard), "-inf", now_ms)
        for member in members:
            parcel_id, _, kind = member.decode().rpartition(":")
            body = await hget(redis, keys.parcel(shard, parcel_id), f"n:{kind}")
            await redis.zrem(keys.due(shard), member)
            if body is not None:
                await redis.xadd(keys.outbox(shard), {"n": body})
                moved += 1
    return moved


async def age_pending(redis: Redis, idle_ms: int = 3_600_000) -> int:
    """Every pending outbox entry made ``idle_ms`` idle on the server's clock, its owner and delivery
    count kept (XCLAIM IDLE JUSTID): time passing for XAUTOCLAIM without a test racing a short send
    timeout against a busy machine."""
    aged = 0
    for shard in range(SHARDS):
        stream = keys.outbox(shard)
        for entry in await redis.xpending_range(stream, keys.OUTBOX_GROUP, "-", "+", 10_000):
            await redis.xclaim(
                stream,
                keys.OUTBOX_GROUP,
                entry["consumer"],
                0,
                [entry["message_id"]],
                idle=idle_ms,
                justid=True,
            )
            aged += 1
    return aged


async def attempts(redis: Redis, notice: notice_pb2.Notice) -> list[notice_pb2.DeliveryAttempt]:
    raw = await hget(redis, keys.parcel(notice.shard, notice.parcel_id), f"a:{kind_name(notice.kind)}")
    view = notice_pb2.NoticeView()
    view.ParseFromString(raw or b"")
    return list(view.attempts)


async def body(redis: Redis, notice: notice_pb2.Notice) -> notice_pb2.Notice:
    raw = await hget(redis, keys.parcel(notice.shard, notice.parcel_id), f"n:{kind_name(notice.kind)}")
    stored = notice_pb2.Notice()
    stored.ParseFromString(raw or b"")
    return stored


async def due_ms(redis: Redis, notice: notice_pb2.Notice) -> int | None:
    score = await redis.zscore(keys.due(notice.shard), notice.notice_id)
    return None if score is None else int(score)


async def outbox_left(redis: Redis) -> int:
    """Entries still in any outbox stream (settled ones are trimmed once none before them is pending)."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(SHARDS):
        pipe.xlen(keys.outbox(shard))
    return sum(await pipe.execute())


class ScriptedChannel:
    """Records messages; answers each address with its scripted results in turn, then ``Accepted``."""

    def __init__(
        self,
        name: str,
        script: Mapping[Destination, Sequence[SendResult]] | None = None,
        *,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.sent: list[Message] = []
        self.calls = 0
        # A slow provider: each message takes this long, one after another, and counts as sent once
        # that time is over (cancelled midway, the earlier ones went out).
        self.delay_s = delay_s
        self._script: dict[Destination, list[SendResult]] = defaultdict(list)
        for to, results in (script or {}).items():
            self._script[to].extend(results)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(options.get("name", "scripted"))

    def script(self, to: Destination, *results: SendResult) -> None:
        self._script[to].extend(results)

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        self.calls += 1
        results: list[SendResult] = []
        for message in messages:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.sent.append(message)
            queued = self._script.get(message.to)
            results.append(queued.pop(0) if queued else Accepted(f"{self.name}-{len(self.sent)}"))
        return results

    async def aclose(self) -> None:
        return None
