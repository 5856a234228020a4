"""The run's verdict against a real Redis: what the engine planned (parcel hashes, due sets) against
what the counting sinks received, the drain figure, and the summary that names failing notices."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from redis.asyncio import Redis
from relais.v1 import notice_pb2, state_pb2, types_pb2

from common import keys
from loadtest.audit import Audit, Backlog, DrainWatch, audit, wait_drained
from loadtest.counting_channel import Deliveries
from loadtest.run import QUICK, Outcome, drain_seconds, parse_args, passed, report, summarize

SHARDS = 16


async def _parcel(
    redis: Redis, parcel_id: str, fields: dict[str, str | int], withdrawn: dict[str, int] | None = None
) -> None:
    """A parcel hash with the engine's notice fields, as ``common/lua/apply.lua`` leaves them: a
    withdrawn kind has ``ns:`` and no ``nv:``, its version only in its mark in the state."""
    marks = [
        state_pb2.NoticeMark(
            kind=types_pb2.NoticeKind.Value(f"NOTICE_KIND_{kind}"),
            version=version,
            status=notice_pb2.NOTICE_STATUS_CANCELLED,
        )
        for kind, version in (withdrawn or {}).items()
    ]
    state = state_pb2.ParcelState(notices=marks).SerializeToString()
    mapping: dict[str, str | int | bytes] = {**fields, keys.PARCEL_STATE_FIELD: state}
    mapping |= {f"ns:{kind}": "CANCELLED" for kind in withdrawn or {}}
    pipe = redis.pipeline(transaction=False)
    pipe.hset(keys.parcel(keys.shard_of(parcel_id, SHARDS), parcel_id), mapping=mapping)
    await pipe.execute()


def _sent(*idempotency_keys: str) -> Deliveries:
    return Deliveries(per_key=Counter(idempotency_keys), first_sent_ms=dict.fromkeys(idempotency_keys, 0))


def _verdict(result: Audit, tmp_path: Path) -> tuple[bool, str]:
    """The run's verdict and printed summary for this audit, every event accepted and drained."""
    drained = Backlog(due_now=0, scheduled_later=0, outbox_undelivered=0)
    outcome = Outcome(drained, time.time(), time.time(), result, "api")
    summary = summarize(QUICK, tmp_path, outcome, {})
    summary.update(events_accepted=QUICK.events, events_duplicate=0, events_rejected=0)
    return passed(summary), report(summary)


async def test_every_expected_notice_once_and_nothing_else_passes(redis: Redis, tmp_path: Path) -> None:
    await _parcel(redis, "A1", {"nv:SHIPPED": 1}, withdrawn={"SLOT_ANNOUNCED": 2})
    result = await audit(redis, SHARDS, _sent("A1:SHIPPED:1:email"))
    assert (result.expected, result.delivered, result.withdrawn) == (1, 1, 1)
    assert result.exactly_once
    ok, _ = _verdict(result, tmp_path)
    assert ok


async def test_a_cancelled_notice_that_was_delivered_fails_the_audit(redis: Redis, tmp_path: Path) -> None:
    await _parcel(redis, "C1", {"nv:SHIPPED": 1}, withdrawn={"SLOT_ANNOUNCED": 1})
    result = await audit(redis, SHARDS, _sent("C1:SHIPPED:1:email", "C1:SLOT_ANNOUNCED:1:push:ab12"))
    assert result.withdrawn_delivered == 1
    assert result.withdrawn_delivered_sample == ("C1:SLOT_ANNOUNCED",)
    assert result.unexpected == 0  # it was planned: the first audit let it through
    assert not result.exactly_once
    ok, printed = _verdict(result, tmp_path)
    assert not ok
    assert "FAILED" in printed
    assert "withdrawn yet sent: C1:SLOT_ANNOUNCED" in printed


async def test_delivered_not_equal_to_expected_fails_the_audit(redis: Redis, tmp_path: Path) -> None:
    # D1's pickup reminder waits in the due set for later, yet a delivery of it arrived: nothing is
    # missing, duplicated or unplanned, but two deliveries for one expected notice is not a pass.
    await _parcel(redis, "D1", {"nv:SHIPPED": 1, "nv:PICKUP_REMINDER": 1})
    shard = keys.shard_of("D1", SHARDS)
    await redis.zadd(keys.due(shard), {"D1:PICKUP_REMINDER": time.time_ns() // 1_000_000 + 3_600_000})
    result = await audit(redis, SHARDS, _sent("D1:SHIPPED:1:email", "D1:PICKUP_REMINDER:1:sms"))
    assert (result.expected, result.delivered) == (1, 2)
    assert (result.missing, result.unexpected, result.duplicated_notices) == (0, 0, 0)
    assert result.extra_sample == ("D1:PICKUP_REMINDER",)
    assert not result.exactly_once
    ok, printed = _verdict(result, tmp_path)
    assert not ok
    assert "not expected:      D1:PICKUP_REMINDER" in printed


async def test_an_earlier_version_sent_before_a_withdrawal_is_expected(redis: Redis) -> None:
    # SLOT_CORRECTED v1 went out; the slot moved again (v2), and delivery withdrew v2 before it was
    # due. Sending v1 was right: it is expected, delivered once, and the run passes.
    await _parcel(redis, "E1", {"nv:SHIPPED": 1}, withdrawn={"SLOT_CORRECTED": 2})
    result = await audit(redis, SHARDS, _sent("E1:SHIPPED:1:email", "E1:SLOT_CORRECTED:1:email"))
    assert (result.withdrawn_delivered, result.extra, result.unexpected) == (0, 0, 0)
    assert (result.expected, result.delivered) == (2, 2)
    assert result.exactly_once


async def test_drain_is_timed_from_the_last_ack_not_padded_by_the_quiet_period(redis: Redis) -> None:
    last_ack_s = time.time()
    drain = DrainWatch()
    seen, drained_at = await wait_drained(redis, SHARDS, timeout_s=5, quiet_s=0.5, poll_s=0.05, drain=drain)
    assert seen.drained
    assert drained_at is not None
    assert time.time() - drained_at >= 0.5  # confirmed quiet for the period...
    outcome = Outcome(seen, drained_at, time.time(), _empty_audit(), "api")
    figure = drain_seconds(outcome, last_ack_s)
    assert figure is not None
    assert figure < 0.5  # ...which is not part of the figure


def test_drain_watch_restarts_the_stretch_when_work_comes_back() -> None:
    drain = DrainWatch()
    idle, busy = Backlog(0, 0, 0), Backlog(1, 0, 0)
    drain.observe(idle, 10.0)
    drain.observe(busy, 11.0)
    drain.observe(idle, 12.0)
    drain.observe(idle, 13.0)
    assert drain.drained_since_s == 12.0
    outcome = Outcome(idle, 12.0, 14.0, _empty_audit(), "api")
    assert drain_seconds(outcome, 11.5) == pytest.approx(0.5)
    assert drain_seconds(outcome, 12.5) == 0.0  # drained before the last ack: nothing to wait for
    assert drain_seconds(outcome, 0.0) is None  # no ack at all
    never = Outcome(busy, None, 20.0, _empty_audit(), "api")
    assert drain_seconds(never, 11.5) == pytest.approx(8.5)  # never drained: the whole wait


def test_options_parse_as_their_fields_are_declared() -> None:
    profile, _ = parse_args(["--quick", "--spawn-rate", "2.5", "--events", "300"])
    assert profile.spawn_rate == 2.5
    assert profile.events == 300
    with pytest.raises(SystemExit):
        parse_args(["--events", "2.5"])


def _empty_audit() -> Audit:
    return Audit(
        parcels=0,
        planned=0,
        withdrawn=0,
        scheduled_later=0,
        expected=0,
        delivered=0,
        delivered_notices=0,
        missing=0,
        duplicated_keys=0,
        duplicated_notices=0,
        unexpected=0,
        withdrawn_delivered=0,
        extra=0,
        missing_sample=(),
        withdrawn_delivered_sample=(),
        extra_sample=(),
        duplicated_sample=(),
        lag_ms_p50=None,
        lag_ms_p95=None,
        lag_ms_p99=None,
        lag_ms_max=None,
    )
