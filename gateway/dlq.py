"""The dead-letter streams: notices out of retries, for an operator to list and replay.

An entry is named ``<shard>/<stream id>`` (stream ids are per shard). Replay puts the notice back
into its shard's due set, due now, with a fresh attempt count and no failed channels, and removes the
entry, in one settle call per shard; a notice the engine superseded meanwhile is just removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from relais.v1 import notice_pb2

from common import keys
from common.clock import Clock
from gateway.scripts import LuaScript
from gateway.settle import Settlement


@dataclass(frozen=True, slots=True)
class DeadLetter:
    shard: int
    stream_id: str
    notice: notice_pb2.Notice
    reason: str
    at_ms: int

    @property
    def id(self) -> str:
        return f"{self.shard}/{self.stream_id}"


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    superseded: int
    # Ids asked for that are not in the dead-letter streams (malformed or already replayed).
    missing: tuple[str, ...]


def parse_id(text: str, shards: int) -> tuple[int, str]:
    """``3/1773133200000-0`` → ``(3, "1773133200000-0")``; ``ValueError`` names what is wrong."""
    shard_text, sep, stream_id = text.partition("/")
    if not sep or not shard_text.isdigit() or int(shard_text) >= shards or not stream_id:
        raise ValueError(f"dead-letter id {text!r} should be <shard>/<stream id>, shard below {shards}")
    return int(shard_text), stream_id


def _decode(shard: int, stream_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    notice = notice_pb2.Notice()
    notice.ParseFromString(fields.get(b"n", b""))
    return DeadLetter(
        shard=shard,
        stream_id=stream_id.decode(),
        notice=notice,
        reason=fields.get(b"reason", b"").decode(errors="replace"),
        at_ms=int(fields.get(b"at", b"0")),
    )


async def list_dead_letters(redis: Redis, shards: int, *, count: int = 1000) -> list[DeadLetter]:
    """The oldest ``count`` entries of each shard, oldest first per shard; one round trip."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        pipe.xrange(keys.dead_letters(shard), count=count)
    letters: list[DeadLetter] = []
    for shard, entries in enumerate(await pipe.execute()):
        letters.extend(_decode(shard, stream_id, fields) for stream_id, fields in entries)
    return letters


async def _select(redis: Redis, shards: int, ids: Sequence[str] | None) -> tuple[list[DeadLetter], list[str]]:
    if ids is None:
        return await list_dead_letters(redis, shards, count=100_000), []
    wanted = [parse_id(text, shards) for text in ids]
    pipe = redis.pipeline(transaction=False)
    for shard, stream_id in wanted:
        pipe.xrange(keys.dead_letters(shard), min=stream_id, max=stream_id)
    letters: list[DeadLetter] = []
    missing: list[str] = []
    for (shard, stream_id), entries in zip(wanted, await pipe.execute(), strict=True):
        if entries:
            letters.append(_decode(shard, entries[0][0], entries[0][1]))
        else:
            missing.append(f"{shard}/{stream_id}")
    return letters, missing


async def replay(redis: Redis, shards: int, clock: Clock, ids: Sequence[str] | None = None) -> ReplayResult:
    """Replay the named entries (``None``: all of them) into the due set, due now."""
    letters, missing = await _select(redis, shards, ids)
    now_ms = clock.now_ms()
    settlement = Settlement(
        LuaScript(redis, "settle"), group=keys.OUTBOX_GROUP, retention_ms=0, now_ms=now_ms
    )
    for letter in letters:
        notice = notice_pb2.Notice()
        notice.CopyFrom(letter.notice)
        notice.attempt = 0
        del notice.failed_channels[:]
        settlement.reschedule(letter.shard, notice, now_ms)
        settlement.drop_dead_letter(letter.shard, letter.stream_id)
    superseded = await settlement.execute(redis, load_scripts=True)
    return ReplayResult(replayed=len(letters) - superseded, superseded=superseded, missing=tuple(missing))
