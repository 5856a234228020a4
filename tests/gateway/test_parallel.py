"""Gateway processes side by side, as an operator runs one per core: they drain one outbox together
and every notice goes out exactly once (the benchmark's ``drain_with_gateways``, real processes)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis
from relais.v1 import preferences_pb2

from loadtest.counting_channel import read_deliveries
from loadtest.gateway_bench import drain_with_gateways
from tests.gateway.support import SHARDS, make_notice, outbox_left, put_prefs, queue_notice

NOTICES = 600


async def test_two_gateway_processes_send_every_notice_once(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    for n in range(10):
        await put_prefs(
            redis, preferences_pb2.RecipientPreferences(recipient_id=f"r-{n}", email=f"r{n}@example.test")
        )
    for n in range(NOTICES):
        await queue_notice(redis, make_notice(f"par-{n}", recipient_id=f"r-{n % 10}"))

    drained = await drain_with_gateways(redis_url, SHARDS, tmp_path, limits=True, processes=2)

    assert (drained.sent, drained.processes) == (NOTICES, 2)
    deliveries = read_deliveries(tmp_path)
    assert len(deliveries.per_key) == NOTICES
    assert not deliveries.duplicated
    assert await outbox_left(redis) == 0
    assert 0 <= drained.first_to_last_send_s < drained.seconds
