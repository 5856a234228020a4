"""What the gateway sends shows in the merchants' daily counters (AlertService.GetStats reads them)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from redis.asyncio import Redis
from relais.v1 import preferences_pb2, types_pb2

from channels.base import Accepted, PhoneNumber
from common.clock import ManualClock
from engine.stats import StatsReader
from gateway.worker import Gateway
from tests.conftest import T0_MS
from tests.gateway.support import SHARDS, ScriptedChannel, make_notice, put_prefs, queue_notice, settings

HOUR_MS = 3_600_000


def counts(labeled: object) -> dict[str, int]:
    return {c.label: c.count for c in labeled}  # type: ignore[attr-defined]


async def test_notices_sent_by_kind_and_channel_with_sms_segments_and_cost(
    redis: Redis, clock: ManualClock
) -> None:
    chans = {name: ScriptedChannel(name) for name in ("email", "sms", "fcm", "webpush")}
    # The provider bills the text as 2 segments at 0.075 CHF each.
    chans["sms"].script(
        PhoneNumber("+41791234567"), Accepted("sm-1", segments=2, cost_micros=150_000, currency="CHF")
    )
    gateway = Gateway(settings(), redis, clock, chans, consumer="test", rng=random.Random(7))
    await gateway.start()
    await put_prefs(redis, preferences_pb2.RecipientPreferences(recipient_id="r-1", email="a@example.ch"))
    await put_prefs(
        redis,
        preferences_pb2.RecipientPreferences(
            recipient_id="r-2",
            phone="+41791234567",
            sms_opt_in=True,
            channel_order=[types_pb2.CHANNEL_SMS],
        ),
    )
    slot = (T0_MS + 4 * HOUR_MS, T0_MS + 6 * HOUR_MS)
    for notice in (
        make_notice("c-1"),
        make_notice("c-2"),
        make_notice("c-3", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot),
        make_notice("c-4", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, recipient_id="r-2", slot_ms=slot),
        make_notice("c-5", merchant_id="m-2"),
    ):
        await queue_notice(redis, notice)

    stats = await gateway.run_once()
    assert stats.sent == 5

    day = datetime.fromtimestamp(T0_MS / 1000, tz=UTC).date()
    (m1,) = await StatsReader(redis, SHARDS).daily("m-1", day, day)
    assert counts(m1.notices_sent) == {"SHIPPED/email": 2, "SLOT_ANNOUNCED/email": 1, "SLOT_ANNOUNCED/sms": 1}
    assert m1.sms_segments == 2
    assert (m1.sms_cost.currency_code, m1.sms_cost.amount_minor) == ("CHF", 15)
    (everyone,) = await StatsReader(redis, SHARDS).daily("", day, day)
    assert counts(everyone.notices_sent)["SHIPPED/email"] == 3


async def test_texts_of_one_batch_add_up_their_segments_and_cost(redis: Redis, clock: ManualClock) -> None:
    """Sends are counted per group of the same merchant, kind, channel and price: three texts of one
    batch count three times what one does."""
    sms = ScriptedChannel("sms")
    sms.script(
        PhoneNumber("+41791234567"), *[Accepted("sm", segments=2, cost_micros=150_000, currency="CHF")] * 3
    )
    gateway = Gateway(settings(), redis, clock, {"sms": sms}, consumer="test", rng=random.Random(7))
    await gateway.start()
    prefs = preferences_pb2.RecipientPreferences(
        recipient_id="r-2", phone="+41791234567", sms_opt_in=True, channel_order=[types_pb2.CHANNEL_SMS]
    )
    await put_prefs(redis, prefs)
    for parcel_id in ("t-1", "t-2", "t-3"):
        await queue_notice(redis, make_notice(parcel_id, recipient_id="r-2", value_minor=50_000))

    assert (await gateway.run_once()).sent == 3

    day = datetime.fromtimestamp(T0_MS / 1000, tz=UTC).date()
    (m1,) = await StatsReader(redis, SHARDS).daily("m-1", day, day)
    assert counts(m1.notices_sent) == {"SHIPPED/sms": 3}
    assert m1.sms_segments == 6
    assert (m1.sms_cost.currency_code, m1.sms_cost.amount_minor) == ("CHF", 45)
