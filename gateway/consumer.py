"""The outbox streams, read through one consumer group by any number of gateway processes.

Each process reads every shard's stream in one blocking ``XREADGROUP`` under its own consumer name.
An entry stays pending until its batch is settled (XACK in the settle script, which then trims the
stream up to its oldest pending entry: never an entry pending or not yet delivered). Entries of a
gateway that died stay pending too, and in the stream: after two send timeouts (a live gateway's
batch ends within 1.5) they are idle long enough that another gateway takes them over with
``XAUTOCLAIM`` (``min-idle-time``), so a crash delays notices but loses none.

A reclaimed entry carries how many times the group delivered it (``XPENDING``): an entry whose
batches keep failing (a notice that makes the gateway raise) is told apart from one whose gateway
died, so the gateway can isolate it and, in the end, dead-letter it instead of retrying it forever,
which would also hold the stream's trimming behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import keys
from common.redis_client import forget_gone_consumers


@dataclass(frozen=True, slots=True)
class Entry:
    shard: int
    entry_id: bytes
    # The Notice bytes; None when the entry has no ``n`` field (malformed: acknowledged and dropped).
    body: bytes | None
    # Times the group handed it out, this one included (1 for a first read).
    deliveries: int = 1


class Outbox:
    def __init__(
        self,
        redis: Redis,
        shards: int,
        consumer: str,
        *,
        batch_size: int,
        block_ms: int,
        min_idle_ms: int,
    ) -> None:
        self._redis = redis
        self._consumer = consumer
        self._batch_size = batch_size
        self._block_ms = block_ms
        self._min_idle_ms = min_idle_ms
        self._streams = {keys.outbox(s): s for s in range(shards)}
        self._by_name = {name.encode(): s for name, s in self._streams.items()}
        self._cursors = dict.fromkeys(range(shards), b"0-0")

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (and the stream itself), reading from the start,
        and forget the consumers of gateways long gone."""
        pipe = self._redis.pipeline(transaction=False)
        for name in self._streams:
            pipe.xgroup_create(name, keys.OUTBOX_GROUP, id="0", mkstream=True)
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply
        await forget_gone_consumers(self._redis, self._streams, keys.OUTBOX_GROUP)

    async def read(self, *, block: bool = True) -> list[Entry]:
        """New entries of every shard, up to ``batch_size`` per stream; waits up to ``block_ms``."""
        reply = await self._redis.xreadgroup(
            keys.OUTBOX_GROUP,
            self._consumer,
            dict.fromkeys(self._streams, ">"),
            count=self._batch_size,
            block=self._block_ms if block else None,
        )
        entries: list[Entry] = []
        for name, messages in reply or ():
            shard = self._by_name[name]
            entries.extend(Entry(shard, entry_id, fields.get(b"n")) for entry_id, fields in messages)
        return entries

    async def reclaim(self) -> list[Entry]:
        """Entries other consumers left pending longer than ``min_idle_ms``, now ours, each with its
        delivery count. Two round trips: the claims, then the counts of the shards that had any."""
        pipe = self._redis.pipeline(transaction=False)
        for name, shard in self._streams.items():
            pipe.xautoclaim(
                name,
                keys.OUTBOX_GROUP,
                self._consumer,
                self._min_idle_ms,
                start_id=self._cursors[shard],
                count=self._batch_size,
            )
        claimed: dict[str, list[tuple[bytes, bytes | None]]] = {}
        for (name, shard), reply in zip(self._streams.items(), await pipe.execute(), strict=True):
            # [next cursor, claimed entries, ids deleted meanwhile (Redis drops those from the PEL)]
            self._cursors[shard] = reply[0]
            found = [(entry_id, fields.get(b"n")) for entry_id, fields in reply[1] if entry_id is not None]
            if found:
                claimed[name] = found
        if not claimed:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for name, found in claimed.items():
            # Our pending entries between the first and the last claimed: the claimed ones, and at most
            # the batches this consumer has in flight (their ids are newer, so rarely in the range).
            # One missing from the reply counts as a second delivery; the next reclaim counts it again.
            first, last = found[0][0], found[-1][0]
            pipe.xpending_range(
                name, keys.OUTBOX_GROUP, first, last, 2 * len(found) + self._batch_size, self._consumer
            )
        entries: list[Entry] = []
        for (name, found), pending in zip(claimed.items(), await pipe.execute(), strict=True):
            counts = {row["message_id"]: row["times_delivered"] for row in pending}
            shard = self._streams[name]
            entries.extend(Entry(shard, entry_id, body, counts.get(entry_id, 2)) for entry_id, body in found)
        return entries
