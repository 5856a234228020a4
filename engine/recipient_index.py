"""Each recipient's parcels (``keys.recipient_parcels``): what re-planning after a preference change
and erasure walk.

A hash of parcel id -> when it was indexed (unix ms), written at registration: a hash rather than a
set, since Redis keeps a small hash as a listpack (a few bytes a parcel) and a set of strings as a
hashtable (~80 bytes a parcel). Parcels leave Redis by expiring, which tells nobody, so without
pruning a recipient who orders every week would keep every parcel id they were ever sent. An index
is pruned of the parcels Redis no longer holds when a registration takes it past a power of two
(from ``PRUNE_FROM`` entries: a constant amortized cost per registration, and at most about twice
the live parcels kept), and by every walk, which reads the parcels anyway. An entry goes only if it
still holds the time that was read with it: a parcel id registered again meanwhile stays indexed,
and erasure still finds it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from common import keys
from common.redis_client import register
from common.settings import Settings
from engine.state import DAY_MS

PRUNE_FROM = 32


def crossed_power_of_two(before: int, after: int) -> bool:
    """A registration took the index from ``before`` to ``after`` entries past a power of two worth a
    prune (32, 64, 128, ...)."""
    return after >= PRUNE_FROM and after.bit_length() > before.bit_length()


class RecipientIndex:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._shards = settings.shards
        self._ttl_ms = settings.engine.idle_retention_days * DAY_MS
        self._forget: AsyncScript = register(redis, "index_forget")

    def key(self, recipient_id: str) -> str:
        return keys.recipient_parcels(keys.shard_of(recipient_id, self._shards), recipient_id)

    async def add(self, recipients: Mapping[str, str], moved: Mapping[str, str], now_ms: int) -> int:
        """Index ``recipients`` (parcel id -> recipient id) and take parcels that ``moved`` to another
        recipient out of their previous one's (parcel id -> previous recipient id), in one round trip;
        then prune the indexes that grew past a power of two. Returns how many entries were pruned."""
        by_recipient: dict[str, list[str]] = defaultdict(list)
        for pid, rid in recipients.items():
            by_recipient[rid].append(pid)
        stamp = str(now_ms)
        pipe = self._redis.pipeline(transaction=False)
        for rid, pids in by_recipient.items():
            key = self.key(rid)
            pipe.hset(key, mapping=dict.fromkeys(pids, stamp))
            pipe.pexpire(key, self._ttl_ms)
            pipe.hlen(key)
        for pid, rid in moved.items():
            pipe.hdel(self.key(rid), pid)
        replies = await pipe.execute()
        grown = [
            rid
            for n, rid in enumerate(by_recipient)
            if crossed_power_of_two(replies[3 * n + 2] - replies[3 * n], replies[3 * n + 2])
        ]
        return await self.prune(grown) if grown else 0

    async def entries(self, recipient_id: str) -> dict[str, bytes]:
        """The recipient's indexed parcel ids and the time each was indexed (as stored)."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.key(recipient_id))  # type: ignore[misc]
        return {pid.decode(): stamp for pid, stamp in raw.items()}

    async def forget(self, gone: Mapping[str, Mapping[str, bytes]]) -> int:
        """Remove entries (recipient id -> parcel id -> the time read with it) that still hold that
        time, one script call per recipient that has any, one round trip; how many went."""
        gone = {rid: entries for rid, entries in gone.items() if entries}
        if not gone:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for rid, entries in gone.items():
            flat = [item for entry in entries.items() for item in entry]
            await self._forget(keys=[self.key(rid)], args=flat, client=pipe)
        return sum(await pipe.execute())

    async def prune(self, recipient_ids: Iterable[str]) -> int:
        """Drop the entries of parcels Redis no longer holds: three round trips for any number of
        recipients. Returns how many went."""
        rids = list(recipient_ids)
        pipe = self._redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(self.key(rid))
        indexed: list[dict[bytes, bytes]] = await pipe.execute()
        pairs = [
            (rid, pid.decode(), stamp)
            for rid, found in zip(rids, indexed, strict=True)
            for pid, stamp in found.items()
        ]
        pipe = self._redis.pipeline(transaction=False)
        for _rid, pid, _stamp in pairs:
            pipe.exists(keys.parcel(keys.shard_of(pid, self._shards), pid))
        held = await pipe.execute()
        gone: dict[str, dict[str, bytes]] = defaultdict(dict)
        for (rid, pid, stamp), exists in zip(pairs, held, strict=True):
            if not exists:
                gone[rid][pid] = stamp
        return await self.forget(gone)
