"""Re-planning a recipient's parcels: after a preference change, and on GDPR erasure.

The preferences helper calls these through the callables the engine composition hands it
(``engine.app``). Both walk ``keys.recipient_parcels`` (kept at registration) and go through
``ParcelStore.update``: a constant number of round trips whatever the number of parcels, and the same
optimistic version check as ingest, so a concurrent event never undoes a re-plan.
"""

from __future__ import annotations

from common import keys
from engine.state import ParcelRecord, ParcelStore


class Replanner:
    def __init__(self, store: ParcelStore) -> None:
        self._store = store

    async def _parcels_of(self, recipient_id: str) -> list[str]:
        shard = keys.shard_of(recipient_id, self._store.settings.shards)
        members: list[bytes] = await self._store.redis.hkeys(  # type: ignore[misc]
            keys.recipient_parcels(shard, recipient_id)
        )
        return sorted(m.decode() for m in members)

    async def _update(self, recipient_id: str, *, erase: bool) -> int:
        parcel_ids = await self._parcels_of(recipient_id)
        if not parcel_ids:
            return 0

        def theirs(record: ParcelRecord) -> bool:
            # The set may still list a parcel re-registered to someone else, or expired.
            return record.exists and record.state.recipient_id == recipient_id

        records = await self._store.update(parcel_ids, theirs, refresh=not erase, erase=erase)
        return sum(len(r.plan.withdrawn if erase else r.plan.checked) for r in records.values() if r.plan)

    async def replan_recipient(self, recipient_id: str) -> int:
        """Plan the pending notices of every parcel of the recipient again (new quiet hours, muted
        kinds, time zone); returns how many pending notices were re-planned."""
        return await self._update(recipient_id, erase=False)

    async def cancel_recipient_notices(self, recipient_id: str) -> int:
        """GDPR erasure: withdraw every pending notice of the recipient's parcels (their bodies are
        deleted) and plan nothing more for them until they set preferences again; returns how many
        notices were cancelled. The engine holds no contact data: only the recipient's opaque id."""
        return await self._update(recipient_id, erase=True)
