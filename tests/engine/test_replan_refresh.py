"""A preference change re-plans the recipient's pending notices: over real gRPC, against a real Redis,
with the engine's own re-planning behind the PreferenceService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import field_mask_pb2
from redis.asyncio import Redis
from relais.v1 import (
    notice_pb2,
    parcel_pb2,
    parcel_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    types_pb2,
)

from common.clock import ManualClock
from common.settings import Settings
from engine.planner import end_of_day_ms
from engine.preference_service import PreferenceServicer, add_preference_service
from engine.replan import Replanner
from engine.server import start_server
from engine.state import ConflictError
from tests.engine.core_support import SETTINGS, due_members, engine_for, registration

T = types_pb2
Prefs = preferences_pb2.RecipientPreferences
RID = "acme/r1"
PROMISED = T.LocalDate(year=2026, month=3, day=12)


@dataclass
class FlakyReplan:
    """The engine's re-planning, failing as many times as asked first (as under a burst of events)."""

    replanner: Replanner
    failures: int = 0
    calls: list[str] = field(default_factory=list)

    async def __call__(self, recipient_id: str) -> int:
        self.calls.append(recipient_id)
        if self.failures:
            self.failures -= 1
            raise ConflictError("parcels kept changing")
        return await self.replanner.replan_recipient(recipient_id)


@dataclass
class Client:
    prefs: preferences_pb2_grpc.PreferenceServiceAsyncStub
    parcels: parcel_pb2_grpc.ParcelServiceAsyncStub
    replan: FlakyReplan

    async def update(self, prefs: Prefs, *paths: str) -> Prefs:
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        return await self.prefs.UpdatePreferences(
            preferences_pb2.UpdatePreferencesRequest(preferences=prefs, update_mask=mask)
        )

    async def notice(self, parcel_id: str, kind: T.NoticeKind.ValueType) -> notice_pb2.NoticeView:
        view = await self.parcels.GetParcel(parcel_pb2.GetParcelRequest(parcel_id=parcel_id))
        return next(n for n in view.notices if n.kind == kind)


@pytest.fixture
async def client(redis: Redis, clock: ManualClock) -> AsyncIterator[Client]:
    engine = engine_for(redis, clock)
    replan = FlakyReplan(engine.replanner)
    servicer = PreferenceServicer(
        redis,
        SETTINGS.shards,
        replan_recipient=replan,
        cancel_recipient_notices=engine.replanner.cancel_recipient_notices,
    )
    settings = Settings(shards=SETTINGS.shards, listen="127.0.0.1:0")
    running = await start_server(
        settings, redis, register=[*engine.register, add_preference_service(servicer)]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Client(
                preferences_pb2_grpc.PreferenceServiceStub(channel),
                parcel_pb2_grpc.ParcelServiceStub(channel),
                replan,
            )
    finally:
        await running.stop(0)


async def register_promised(client: Client, parcel_id: str) -> None:
    reg = registration(parcel_id, recipient_id=RID)
    reg.order.promised_date.CopyFrom(PROMISED)
    await client.parcels.RegisterParcels(parcel_pb2.RegisterParcelsRequest(parcels=[reg]))


async def test_delayed_follows_a_new_time_zone_and_comes_back_when_unmuted(
    client: Client, redis: Redis
) -> None:
    # The merchant registers before the recipient sets a zone: DELAYED is planned in UTC.
    await register_promised(client, "P1")
    assert await due_members(redis, "P1") == {"P1:DELAYED": end_of_day_ms(PROMISED, "UTC")}

    await client.update(Prefs(recipient_id=RID, time_zone="Pacific/Auckland"))
    auckland_ms = end_of_day_ms(PROMISED, "Pacific/Auckland")
    assert await due_members(redis, "P1") == {"P1:DELAYED": auckland_ms}

    await client.update(Prefs(recipient_id=RID, muted_kinds=[T.NOTICE_KIND_DELAYED]), "muted_kinds")
    assert await due_members(redis, "P1") == {}

    await client.update(Prefs(recipient_id=RID), "muted_kinds")
    assert await due_members(redis, "P1") == {"P1:DELAYED": auckland_ms}
    notice = await client.notice("P1", T.NOTICE_KIND_DELAYED)
    assert notice.version == 1
    assert notice.status_reason == ""


async def test_a_retry_after_a_failed_replan_applies_the_new_quiet_hours(
    client: Client, redis: Redis
) -> None:
    await client.update(Prefs(recipient_id=RID, time_zone="UTC"))
    await register_promised(client, "P1")
    # Quiet 00:00-23:00 UTC: the end of the promised day (midnight) waits until 23:00 that day.
    quiet = Prefs(
        recipient_id=RID, quiet_hours=preferences_pb2.QuietHours(start_minute=0, end_minute=23 * 60)
    )
    client.replan.failures = 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.update(quiet, "quiet_hours")
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert await due_members(redis, "P1") == {"P1:DELAYED": end_of_day_ms(PROMISED, "UTC")}

    await client.update(quiet, "quiet_hours")  # the client's retry: nothing left to store
    assert await due_members(redis, "P1") == {"P1:DELAYED": end_of_day_ms(PROMISED, "UTC") + 23 * 3_600_000}
    assert client.replan.calls == [RID, RID, RID]
