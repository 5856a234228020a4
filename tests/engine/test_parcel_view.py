"""GetParcel's notices as the gateway left them: the engine core and the real gateway on one Redis,
the scheduler's claim as specified, scripted channels."""

from __future__ import annotations

import random

from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, tracking_pb2, types_pb2

from common.clock import ManualClock
from engine.validation import set_stamp_ms
from gateway.worker import Gateway
from tests.conftest import T0_MS
from tests.engine.core_support import HOUR_MS, engine_for, event, registration
from tests.gateway.support import ScriptedChannel, claim_due, put_prefs, settings

T = types_pb2


async def test_notices_held_back_or_suppressed_by_the_gateway(redis: Redis, clock: ManualClock) -> None:
    """A notice the gateway put back under the recipient's rate limit is RETRYING at its new time,
    not SCHEDULED at a time already past; one it suppressed says why in ``status_reason``."""
    config = settings(recipient_rate_per_h=1.0, recipient_burst=1)
    engine = engine_for(redis, clock, config)
    await put_prefs(redis, preferences_pb2.RecipientPreferences(recipient_id="acme/r1", email="a@example.ch"))
    parcels = [registration("P1"), registration("P2"), registration("P3", recipient_id="acme/nobody")]
    request = parcel_pb2.RegisterParcelsRequest(parcels=parcels)
    await engine.parcels.RegisterParcels(request, None)  # type: ignore[arg-type]
    scans = [event(f"e-{p.parcel_id}", p.parcel_id, T.TRACKING_STATUS_IN_TRANSIT, T0_MS) for p in parcels]
    assert (await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=scans))).accepted == 3
    assert await claim_due(redis, clock.now_ms()) == 3
    chans = {name: ScriptedChannel(name) for name in ("email", "sms", "fcm", "webpush")}
    gateway = Gateway(config, redis, clock, chans, consumer="test", rng=random.Random(7))
    await gateway.start()
    stats = await gateway.run_once()
    assert (stats.sent, stats.limited) == (1, 1)

    shipped = {}
    for parcel in parcels:
        view = await engine.parcels.get_parcel(parcel.parcel_id)
        assert view is not None
        (shipped[parcel.parcel_id],) = [n for n in view.notices if n.kind == T.NOTICE_KIND_SHIPPED]
    held = [n for n in shipped.values() if n.status == notice_pb2.NOTICE_STATUS_RETRYING]
    sent = [n for n in shipped.values() if n.status == notice_pb2.NOTICE_STATUS_SENT]
    assert len(held) == len(sent) == 1
    later = notice_pb2.NoticeView()
    set_stamp_ms(later.scheduled_at, T0_MS + HOUR_MS)  # the next send the hourly limit allows
    assert held[0].scheduled_at == later.scheduled_at
    assert not held[0].attempts  # put back unsent: no attempt spent
    suppressed = shipped["P3"]
    assert suppressed.status == notice_pb2.NOTICE_STATUS_SUPPRESSED
    assert suppressed.status_reason == "no preferences"
    assert sent[0].status_reason == ""
