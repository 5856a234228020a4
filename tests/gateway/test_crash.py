"""A gateway killed mid-batch with a real SIGKILL: another one finishes the work, nothing is lost and
no key already marked sent goes out again."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from relais.v1 import preferences_pb2

from common import keys
from gateway.idempotency import SENT
from tests.gateway.support import SHARDS, claim_due, make_notice, outbox_left, put_prefs, queue_notice

NOTICES = 120
ROOT = Path(__file__).resolve().parents[2]


def start_worker(redis_url: str, out: Path, consumer: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.crash_worker", redis_url, str(out), consumer],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def attempted(out: Path) -> list[str]:
    log = out / "attempts.log"
    return log.read_text().split() if log.exists() else []


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def sent_keys(redis: Redis) -> set[str]:
    found: set[str] = set()
    for shard in range(SHARDS):
        prefix = keys.idempotency(shard, "")
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            if await redis.get(key) == SENT:
                found.add(key.decode().removeprefix(prefix))
    return found


@pytest.mark.slow
async def test_kill_9_mid_batch_loses_nothing_and_never_resends_a_sent_key(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    await put_prefs(redis, preferences_pb2.RecipientPreferences(recipient_id="r-1", email="crash@example.ch"))
    for i in range(NOTICES):
        await queue_notice(redis, make_notice(f"p-crash-{i}"))

    async def midway() -> bool:
        # Some batches settled (keys marked sent), others still being sent.
        return len(attempted(tmp_path)) >= 40 and len(await sent_keys(redis)) > 0

    async def delivered() -> bool:
        # The engine's dispatcher, which is not running here: a survivor that finds a dead gateway's
        # claim still held puts the notice back in the due set until the claim expires.
        await claim_due(redis, time.time_ns() // 1_000_000)
        return len(list((tmp_path / "sent").iterdir())) >= NOTICES and await outbox_left(redis) == 0

    first = start_worker(redis_url, tmp_path, "doomed")
    try:
        await wait_for(midway, 20, "the first gateway to get going")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    sent_before_kill = await sent_keys(redis)
    assert 0 < len(sent_before_kill) < NOTICES

    second = start_worker(redis_url, tmp_path, "survivor")
    try:
        await wait_for(delivered, 30, "every notice")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=10)

    counts = collections.Counter(attempted(tmp_path))
    expected = {f"p-crash-{i}:SHIPPED:1:email" for i in range(NOTICES)}
    assert set(counts) == expected
    assert len(list((tmp_path / "sent").iterdir())) == NOTICES
    # At most once more, and only for sends in flight at the kill (2 batches of 5 per shard at most).
    resent = {key for key, n in counts.items() if n > 1}
    assert max(counts.values()) <= 2
    assert len(resent) <= 2 * 5 * SHARDS
    assert not resent & sent_before_kill
    assert await sent_keys(redis) == expected
