"""Each recipient's parcel index: kept at registration, pruned of the parcels Redis no longer holds."""

from __future__ import annotations

from redis.asyncio import Redis
from relais.v1 import parcel_pb2

from common import keys
from common.clock import ManualClock
from engine.recipient_index import PRUNE_FROM, RecipientIndex, crossed_power_of_two
from tests.conftest import T0_MS
from tests.engine.core_support import SETTINGS, Core, engine_for, registration

RECIPIENT = "acme/r1"


async def register(engine: Core, *parcel_ids: str) -> None:
    request = parcel_pb2.RegisterParcelsRequest(parcels=[registration(pid) for pid in parcel_ids])
    reply = await engine.parcels.RegisterParcels(request, None)  # type: ignore[arg-type]
    assert reply.registered == len(parcel_ids)


async def expire(redis: Redis, *parcel_ids: str) -> None:
    """As Redis does when a parcel's TTL runs out: the key goes, nobody is told."""
    await redis.delete(*(keys.parcel(keys.shard_of(pid, SETTINGS.shards), pid) for pid in parcel_ids))


async def indexed(redis: Redis) -> dict[str, bytes]:
    return await RecipientIndex(redis, SETTINGS).entries(RECIPIENT)


def test_a_prune_is_due_when_the_index_grows_past_a_power_of_two() -> None:
    assert PRUNE_FROM == 32
    assert crossed_power_of_two(31, 32)
    assert crossed_power_of_two(63, 64)
    assert crossed_power_of_two(10, 40)
    assert not crossed_power_of_two(32, 33)
    assert not crossed_power_of_two(0, 31)
    assert not crossed_power_of_two(64, 64)  # registered again: nothing added


async def test_registration_prunes_expired_parcels_past_a_power_of_two(
    redis: Redis, clock: ManualClock
) -> None:
    engine = engine_for(redis, clock)
    first = [f"P{n:02d}" for n in range(31)]
    await register(engine, *first)
    entries = await indexed(redis)
    assert sorted(entries) == first
    assert set(entries.values()) == {str(T0_MS).encode()}  # when each was indexed
    await expire(redis, *first[:20])
    assert len(await indexed(redis)) == 31  # expiry tells nobody: still listed

    await register(engine, "P31")  # the 32nd entry: the expired ones go
    assert sorted(await indexed(redis)) == [*first[20:], "P31"]
    await register(engine, "P32")  # 13 entries, no power of two crossed: nothing to do
    assert len(await indexed(redis)) == 13


async def test_an_entry_registered_again_since_it_was_read_stays(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await register(engine, "P1", "P2")
    read = await indexed(redis)
    clock.set_ms(T0_MS + 1000)
    await register(engine, "P2")  # a new indexing time
    index = RecipientIndex(redis, SETTINGS)
    assert await index.forget({RECIPIENT: read}) == 1
    assert await indexed(redis) == {"P2": str(T0_MS + 1000).encode()}


async def test_walks_take_out_expired_and_moved_parcels(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await register(engine, "P1", "P2", "P3")
    await expire(redis, "P1")
    # P2 goes to another recipient; as if the move's own index update had been lost.
    moved = registration("P2", recipient_id="acme/r2")
    await engine.parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=[moved]), None)  # type: ignore[arg-type]
    await redis.hset(keys.recipient_parcels(keys.shard_of(RECIPIENT, SETTINGS.shards), RECIPIENT), "P2", "1")  # type: ignore[misc]

    await engine.replanner.replan_recipient(RECIPIENT)
    assert sorted(await indexed(redis)) == ["P3"]
    await engine.replanner.cancel_recipient_notices(RECIPIENT)
    assert sorted(await indexed(redis)) == ["P3"]  # a live parcel stays indexed through erasure
