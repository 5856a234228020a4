"""The harness's own parts against real servers: the echo baseline, the streaming client, the
counting channel and its reader, Redis round-trip counting."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from channels.base import Accepted, EmailAddress, Message
from loadtest.counting_channel import CountingChannel, read_deliveries
from loadtest.echo_server import start_echo
from loadtest.ingest_client import plan_streams, stream_batches
from loadtest.journeys import EventBudget, JourneyFactory
from loadtest.redis_stats import RoundTrips, command_stats, counting_client
from tests.conftest import T0_MS


async def test_echo_server_acks_every_event_of_the_streamed_batches() -> None:
    server, port = await start_echo()
    try:
        factory = JourneyFactory(prefix="E", recipients=3)
        budget = EventBudget(900)
        groups = []
        while (group := budget.take_group(factory, 40)) is not None:
            groups.append(group)
        streams = plan_streams(groups, 2, T0_MS)
        result = await stream_batches(f"127.0.0.1:{port}", streams, window=3)
    finally:
        await server.stop(0)
    assert result.events == result.accepted == 900
    assert result.rejected == 0
    assert result.seconds > 0
    assert len(result.ack_ms) == sum(len(s) for s in streams)  # one ack per batch


async def test_counting_channel_records_each_send_and_reader_counts_duplicates(tmp_path: Path) -> None:
    channel = CountingChannel.from_options({"dir": str(tmp_path)})
    to = EmailAddress("lt-r-1@example.test")
    first = [Message(idempotency_key=f"P{n}:SHIPPED:1:email", to=to, subject="s", text="t") for n in range(3)]
    results = await channel.send(first)
    await channel.send(first[:1])
    await channel.aclose()
    assert all(isinstance(r, Accepted) for r in results)
    assert channel.sent == 4
    deliveries = read_deliveries(tmp_path)
    assert deliveries.total == 4
    assert deliveries.duplicated == {"P0:SHIPPED:1:email": 2}
    assert set(deliveries.first_sent_ms) == {f"P{n}:SHIPPED:1:email" for n in range(3)}


async def test_round_trips_count_a_pipeline_once(redis: Redis, redis_url: str) -> None:
    trips = RoundTrips()
    client = counting_client(redis_url, trips)
    try:
        await client.ping()
        before = await command_stats(redis)
        trips.count = 0
        pipe = client.pipeline(transaction=False)
        for n in range(10):
            pipe.set(f"relais:test:{{0}}:{n}", n)
        await pipe.execute()
        delta = (await command_stats(redis)).minus(before)
    finally:
        await client.aclose()
    assert trips.count == 1
    assert delta.calls.get("set") == 10
