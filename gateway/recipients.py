"""Recipients' preferences as the gateway needs them: read with the batch, pruned of dead addresses.

The engine owns the preferences (``PreferenceService``); the gateway only reads them at send time and
removes an address a provider rejected for good (unregistered push token, hard bounce, unreachable
number), with an optimistic WATCH/MULTI so a concurrent update is never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError
from relais.v1 import preferences_pb2

from channels.base import Destination, EmailAddress, PhoneNumber
from common import keys
from gateway.routing import push_destination

log = logging.getLogger(__name__)

MAX_WATCH_RETRIES = 5


def preferences_key(recipient_id: str, shards: int) -> str:
    return keys.preferences(keys.shard_of(recipient_id, shards), recipient_id)


def queue_load(pipe: Pipeline, recipient_ids: Sequence[str], shards: int) -> list[str]:
    """Queue the reads of ``recipient_ids``: one MGET per shard (its keys share the shard's tag, so it
    holds on a cluster too). Returns the ids in reply order, for ``parse_loaded``; one reply per
    shard, the shards in the order they come first."""
    by_shard: dict[int, list[str]] = {}
    for recipient_id in recipient_ids:
        by_shard.setdefault(keys.shard_of(recipient_id, shards), []).append(recipient_id)
    ordered: list[str] = []
    for shard, ids in by_shard.items():
        pipe.mget([keys.preferences(shard, recipient_id) for recipient_id in ids])
        ordered.extend(ids)
    return ordered


def parse_loaded(
    ordered: Sequence[str], replies: Sequence[Sequence[bytes | None]]
) -> dict[str, preferences_pb2.RecipientPreferences | None]:
    """The preferences per recipient id from ``queue_load``'s order and its MGET replies."""
    values = [value for reply in replies for value in reply]
    return {recipient_id: parse(value) for recipient_id, value in zip(ordered, values, strict=True)}


def parse(reply: bytes | None) -> preferences_pb2.RecipientPreferences | None:
    if reply is None:
        return None
    prefs = preferences_pb2.RecipientPreferences()
    prefs.ParseFromString(reply)
    return prefs


def _is_dead(target: preferences_pb2.PushTarget, dead: Collection[Destination]) -> bool:
    found = push_destination(target)
    return found is not None and found[1] in dead


def without(
    prefs: preferences_pb2.RecipientPreferences, dead: Collection[Destination]
) -> preferences_pb2.RecipientPreferences | None:
    """A copy without the dead addresses, or None if none of them is in ``prefs`` any more."""
    pruned = preferences_pb2.RecipientPreferences()
    pruned.CopyFrom(prefs)
    changed = False
    if prefs.email and EmailAddress(prefs.email) in dead:
        pruned.ClearField("email")
        changed = True
    if prefs.phone and PhoneNumber(prefs.phone) in dead:
        pruned.ClearField("phone")
        changed = True
    alive = [t for t in prefs.push_targets if not _is_dead(t, dead)]
    if len(alive) != len(prefs.push_targets):
        del pruned.push_targets[:]
        pruned.push_targets.extend(alive)
        changed = True
    return pruned if changed else None


async def remove_destinations(
    redis: Redis, recipient_id: str, dead: Collection[Destination], shards: int
) -> bool:
    """Remove dead addresses from the recipient's preferences; True if something was removed."""
    key = preferences_key(recipient_id, shards)
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_WATCH_RETRIES):
            try:
                await pipe.watch(key)
                prefs = parse(await pipe.get(key))
                pruned = None if prefs is None else without(prefs, dead)
                if pruned is None:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, pruned.SerializeToString())
                await pipe.execute()
                return True
            except WatchError:
                continue
    log.warning(
        "preferences of recipient %s changed %d times in a row; dead address kept",
        recipient_id,
        MAX_WATCH_RETRIES,
    )
    return False
