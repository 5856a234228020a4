"""Re-planning a recipient's parcels: after a preference change, and on GDPR erasure.

The preferences helper calls these through the callables the engine composition hands it
(``engine.app``). Both walk the recipient's index (``engine.recipient_index``, kept at registration)
and go through ``ParcelStore.update``: a constant number of round trips whatever the number of
parcels, and the same optimistic version check as ingest, so a concurrent event never undoes a
re-plan. The walk takes out of the index the parcels that expired or went to another recipient.
"""

from __future__ import annotations

from engine.recipient_index import RecipientIndex
from engine.state import ParcelRecord, ParcelStore


def _theirs(record: ParcelRecord, recipient_id: str) -> bool:
    # The index may still list a parcel that expired or was registered to someone else since.
    return record.exists and record.state.recipient_id == recipient_id


class Replanner:
    def __init__(self, store: ParcelStore) -> None:
        self._store = store
        self._index = RecipientIndex(store.redis, store.settings)

    async def _update(self, recipient_id: str, *, erase: bool) -> int:
        indexed = await self._index.entries(recipient_id)
        if not indexed:
            return 0
        records = await self._store.update(
            sorted(indexed), lambda r: _theirs(r, recipient_id), refresh=not erase, erase=erase
        )
        gone = {pid: indexed[pid] for pid, r in records.items() if not _theirs(r, recipient_id)}
        await self._index.forget({recipient_id: gone})
        # A re-plan counts the pending notices it planned again and the muted ones it brought back.
        return sum(
            len(r.plan.withdrawn if erase else r.plan.checked | r.plan.revived)
            for r in records.values()
            if r.plan
        )

    async def replan_recipient(self, recipient_id: str) -> int:
        """Plan the pending notices of every parcel of the recipient again (new quiet hours, muted
        kinds, time zone) and bring back the unmuted ones that still make sense; returns how many
        notices were re-planned. Idempotent: a retry after a failure is safe."""
        return await self._update(recipient_id, erase=False)

    async def cancel_recipient_notices(self, recipient_id: str) -> int:
        """GDPR erasure: withdraw every pending notice of the recipient's parcels (their bodies are
        deleted) and plan nothing more for them until they set preferences again; returns how many
        notices were cancelled. The engine holds no contact data: only the recipient's opaque id."""
        return await self._update(recipient_id, erase=True)
