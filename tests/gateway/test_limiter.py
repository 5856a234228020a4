"""The GCRA limiter against a real Redis, time from the ManualClock."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from common.clock import ManualClock
from gateway.limiter import Limit, LimitBatch, Limiter, Rate


async def test_burst_then_rate(redis: Redis, clock: ManualClock) -> None:
    limiter = Limiter(redis)
    shared = (Limit("provider", "sms", Rate(rate_per_s=10, burst=5)),)
    waits = await limiter.check(clock.now_ms(), LimitBatch().extend([(shared, None)] * 8))
    assert waits[:5] == [0] * 5
    # Beyond the burst each waits one more emission interval (100 ms) than the one before.
    assert waits[5:] == [100, 100, 100]
    clock.advance_ms(100)
    assert await limiter.check(clock.now_ms(), LimitBatch().extend([(shared, None)] * 2)) == [0, 100]


@pytest.mark.parametrize(("rate_per_s", "burst"), [(100.0, 25), (3.0, 2), (250.0, 60)])
async def test_sixty_seconds_never_exceed_rate_by_more_than_two_percent(
    redis: Redis, clock: ManualClock, rate_per_s: float, burst: int
) -> None:
    # Offered twice the rate in steps no longer than the burst absorbs ((burst - 1) intervals), so a
    # late request never wastes a slot and the count is the limiter's alone.
    step_ms = int((burst - 1) * 1000 / rate_per_s)
    limiter = Limiter(redis)
    shared = (Limit("merchant", f"m-{rate_per_s}", Rate(rate_per_s=rate_per_s, burst=burst)),)
    start_ms = clock.now_ms()
    allowed = 0
    offered_per_step = int(rate_per_s * step_ms / 1000 * 2) + 1
    while clock.now_ms() < start_ms + 60_000:
        waits = await limiter.check(clock.now_ms(), LimitBatch().extend([(shared, None)] * offered_per_step))
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
    provider = (Limit("provider", "fcm", Rate(rate_per_s=1000, burst=1000)),)
    hourly = Rate(rate_per_s=1 / 3600, burst=1)
    now = clock.now_ms()
    batch = LimitBatch("recipient", hourly).extend([(provider, "r1"), (provider, "r1"), (provider, None)])
    waits = await limiter.check(now, batch)
    assert waits[0] == 0
    assert waits[1] == 3_600_000  # the recipient cap holds it for an hour
    assert waits[2] == 0
    # The refused entry did not use the provider's budget: 1000 - 2 charged so far.
    assert (await limiter.check(now, LimitBatch().extend([(provider, None)] * 998))).count(0) == 998
    assert (await limiter.check(now, LimitBatch().extend([(provider, None)])))[0] > 0


async def test_a_batch_mixes_combinations_and_personal_limits(redis: Redis, clock: ManualClock) -> None:
    """Entries naming different providers, a shared merchant and thousands of recipients, some twice:
    each limit counts only the entries that name it, wherever they sit in the batch."""
    limiter = Limiter(redis)
    merchant = Limit("merchant", "m1", Rate(rate_per_s=1000, burst=3002))
    fcm = (Limit("provider", "fcm", Rate(rate_per_s=1000, burst=5000)), merchant)
    sms = (Limit("provider", "sms", Rate(rate_per_s=10, burst=2)), merchant)
    both = (*fcm[:1], *sms)
    burst_two = Rate(rate_per_s=1 / 3600, burst=2)
    now = clock.now_ms()
    entries: list[tuple[tuple[Limit, ...], str | None]] = [(fcm, f"r{i}") for i in range(1500)]
    entries += [(fcm, f"r{i}") for i in range(1500)]  # each recipient's second: within the burst of two
    entries += [(fcm, "r0"), (sms, None), (sms, "new1"), (sms, None), (both, "new2")]
    waits = await limiter.check(now, LimitBatch("recipient", burst_two).extend(entries))
    assert waits[:3000] == [0] * 3000
    assert waits[3000] == 3_600_000  # r0's third send: one interval of its cap
    assert waits[3001:3003] == [0, 0]  # the sms provider's burst of two
    assert waits[3003] == 100  # the sms provider: one interval
    assert waits[3004] == 100  # needs sms too, so it waits as long, and charges nobody
    # The merchant was charged by exactly the 3002 entries allowed: its burst is used up by 1 ms.
    assert await limiter.check(now, LimitBatch().extend([((merchant,), None)])) == [1]
    # new2 was not charged by its refused entry: it still has its two sends.
    again = LimitBatch("recipient", burst_two).extend([((Limit("provider", "x", Rate(1, 5)),), "new2")] * 3)
    assert await limiter.check(now, again) == [0, 0, 3_600_000]


def test_personal_limits_need_the_batch_rate() -> None:
    with pytest.raises(ValueError, match="personal rate"):
        LimitBatch().add((), "r1")


def test_rate_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        Rate(rate_per_s=0, burst=1)
