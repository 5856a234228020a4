"""The GCRA limiter against a real Redis, time from the ManualClock."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from common.clock import ManualClock
from gateway.limiter import Limit, Limiter


async def test_burst_then_rate(redis: Redis, clock: ManualClock) -> None:
    limiter = Limiter(redis)
    limit = Limit("provider", "sms", rate_per_s=10, burst=5)
    waits = await limiter.check(clock.now_ms(), [[limit]] * 8)
    assert waits[:5] == [0] * 5
    # Beyond the burst each waits one more emission interval (100 ms) than the one before.
    assert waits[5:] == [100, 100, 100]
    clock.advance_ms(100)
    assert await limiter.check(clock.now_ms(), [[limit]] * 2) == [0, 100]


@pytest.mark.parametrize(("rate_per_s", "burst"), [(100.0, 25), (3.0, 2), (250.0, 60)])
async def test_sixty_seconds_never_exceed_rate_by_more_than_two_percent(
    redis: Redis, clock: ManualClock, rate_per_s: float, burst: int
) -> None:
    # Offered twice the rate in steps no longer than the burst absorbs ((burst - 1) intervals), so a
    # late request never wastes a slot and the count is the limiter's alone.
    step_ms = int((burst - 1) * 1000 / rate_per_s)
    limiter = Limiter(redis)
    limit = Limit("merchant", f"m-{rate_per_s}", rate_per_s=rate_per_s, burst=burst)
    start_ms = clock.now_ms()
    allowed = 0
    offered_per_step = int(rate_per_s * step_ms / 1000 * 2) + 1
    while clock.now_ms() < start_ms + 60_000:
        waits = await limiter.check(clock.now_ms(), [[limit]] * offered_per_step)
        allowed += waits.count(0)
        clock.advance_ms(step_ms)
    expected = rate_per_s * 60
    assert allowed <= burst + expected
    assert allowed <= expected * 1.02
    assert allowed >= expected * 0.98


async def test_entry_needs_every_limit_and_is_charged_only_when_allowed(
    redis: Redis, clock: ManualClock
) -> None:
    limiter = Limiter(redis)
    provider = Limit("provider", "fcm", rate_per_s=1000, burst=1000)
    recipient = Limit("recipient", "r1", rate_per_s=1 / 3600, burst=1)
    now = clock.now_ms()
    waits = await limiter.check(now, [[provider, recipient], [provider, recipient], [provider]])
    assert waits[0] == 0
    assert waits[1] == 3_600_000  # the recipient cap holds it for an hour
    assert waits[2] == 0
    # The refused entry did not use the provider's budget: 1000 - 2 charged so far.
    assert (await limiter.check(now, [[provider]] * 998)).count(0) == 998
    assert (await limiter.check(now, [[provider]]))[0] > 0


def test_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        Limit("provider", "x", rate_per_s=0, burst=1)
