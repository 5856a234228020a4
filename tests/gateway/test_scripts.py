"""The gateway's Lua scripts survive Redis losing them (a restart without its script cache, SCRIPT FLUSH):
the batch that meets NOSCRIPT reloads them and delivers, nothing sent twice."""

from __future__ import annotations

import random

from redis.asyncio import Redis
from relais.v1 import preferences_pb2

from common.clock import ManualClock
from gateway.worker import Gateway
from tests.gateway.support import (
    ScriptedChannel,
    make_notice,
    outbox_left,
    put_prefs,
    queue_notice,
    settings,
)


async def test_scripts_reload_after_redis_lost_them(redis: Redis, clock: ManualClock) -> None:
    email = ScriptedChannel("email")
    gateway = Gateway(settings(), redis, clock, {"email": email}, consumer="t", rng=random.Random(1))
    await gateway.start()
    await put_prefs(redis, preferences_pb2.RecipientPreferences(recipient_id="r-1", email="a@example.ch"))
    await queue_notice(redis, make_notice("s-1"))
    assert (await gateway.run_once()).sent == 1

    await redis.script_flush()
    await queue_notice(redis, make_notice("s-2"))
    stats = await gateway.run_once()

    assert stats.sent == 1
    assert [m.idempotency_key for m in email.sent] == ["s-1:SHIPPED:1:email", "s-2:SHIPPED:1:email"]
    assert await outbox_left(redis) == 0
