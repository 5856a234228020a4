"""Shared fixtures: a private Redis for the whole run (never the shared one on 6379), a clean
database per test, and a controllable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from common.clock import ManualClock
from common.redis_client import connect
from common.redis_server import EmbeddedRedis

# 2026-03-10 09:00:00 UTC, a Tuesday: a fixed start for every controlled clock.
T0_MS = 1_773_133_200_000


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0_MS)
