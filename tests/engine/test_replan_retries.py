"""A re-plan keeps what the gateway learnt sending a notice: the engine core and the real gateway on one
Redis, the scheduler's claim as specified, scripted channels.

The gateway writes a notice it failed to send back into the parcel hash with one more attempt, the
channels that rejected the recipient and a later due time (backoff). A preference change or a
re-registration plans the parcel's pending notices again; the same promise (kind and version) to the
same recipient keeps those, or a failing provider would get unlimited attempts."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable

import pytest
from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, tracking_pb2, types_pb2

from channels.base import EmailAddress, PermanentFailure, TransientFailure, WebPushSubscription
from common import keys
from common.clock import ManualClock
from engine.planner import Audience
from engine.state import body_field
from gateway.worker import Gateway
from tests.conftest import T0_MS
from tests.engine.core_support import Core, engine_for, event, hget, registration
from tests.gateway.support import ScriptedChannel, claim_due, put_prefs, settings

T = types_pb2
RID = "acme/r1"
CONFIG = settings()
ENDPOINT = "https://push.example/r1"


def prefs(recipient_id: str = RID, **fields: object) -> preferences_pb2.RecipientPreferences:
    push = preferences_pb2.PushTarget(web_push=preferences_pb2.WebPushTarget(endpoint=ENDPOINT))
    return preferences_pb2.RecipientPreferences(
        recipient_id=recipient_id,
        email="r1@example.ch",
        push_targets=[push],
        **fields,  # type: ignore[arg-type]
    )


async def register(engine: Core, reg: parcel_pb2.ParcelRegistration) -> None:
    request = parcel_pb2.RegisterParcelsRequest(parcels=[reg])
    await engine.parcels.RegisterParcels(request, None)  # type: ignore[arg-type]


async def shipped(redis: Redis) -> tuple[notice_pb2.Notice, int | None]:
    """P1's SHIPPED body as stored, and its score in the due set."""
    shard = keys.shard_of("P1", CONFIG.shards)
    raw = await hget(redis, keys.parcel(shard, "P1"), body_field("SHIPPED"))
    score = await redis.zscore(keys.due(shard), "P1:SHIPPED")
    return notice_pb2.Notice.FromString(raw or b""), None if score is None else int(score)


async def failed_once(redis: Redis, clock: ManualClock) -> tuple[Core, Gateway, int]:
    """P1's SHIPPED, push rejected for good and email failing for now: back in the due set with an
    attempt spent, push among its failed channels; returns the time of its retry."""
    engine = engine_for(redis, clock, CONFIG)
    await put_prefs(redis, prefs())
    await register(engine, registration("P1", recipient_id=RID))
    scan = event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=[scan]))
    assert await claim_due(redis, clock.now_ms()) == 1
    chans = {name: ScriptedChannel(name) for name in ("email", "sms", "fcm", "webpush")}
    chans["webpush"].script(WebPushSubscription(ENDPOINT, "", ""), PermanentFailure("403 forbidden"))
    chans["email"].script(EmailAddress("r1@example.ch"), TransientFailure("451 try later"))
    gateway = Gateway(CONFIG, redis, clock, chans, consumer="test", rng=random.Random(7))
    await gateway.start()
    stats = await gateway.run_once()
    assert (stats.failed, stats.retrying) == (1, 1)
    body, retry_ms = await shipped(redis)
    assert (body.attempt, list(body.failed_channels)) == (1, [T.CHANNEL_PUSH])
    assert retry_ms is not None
    assert retry_ms > clock.now_ms()
    assert body.due_at.ToMilliseconds() == retry_ms
    return engine, gateway, retry_ms


async def new_preferences(redis: Redis, engine: Core) -> None:
    await put_prefs(redis, prefs(time_zone="Europe/Zurich"))
    assert await engine.replanner.replan_recipient(RID) == 1


async def new_order_facts(redis: Redis, engine: Core) -> None:
    reg = registration("P1", recipient_id=RID)
    reg.order.declared_value.amount_minor = 99_000
    await register(engine, reg)


@pytest.mark.parametrize("replan", [new_preferences, new_order_facts])
async def test_a_replan_keeps_the_attempts_failed_channels_and_backoff_of_a_notice(
    redis: Redis, clock: ManualClock, replan: Callable[[Redis, Core], Awaitable[None]]
) -> None:
    engine, _gateway, retry_ms = await failed_once(redis, clock)
    clock.advance_ms(1_000)  # before the retry is due

    await replan(redis, engine)

    body, due_ms = await shipped(redis)
    assert body.version == 1  # the same promise, planned again
    assert (body.attempt, list(body.failed_channels)) == (1, [T.CHANNEL_PUSH])
    assert due_ms == body.due_at.ToMilliseconds() == retry_ms
    view = await engine.parcels.get_parcel("P1")
    assert view is not None
    (notice,) = [n for n in view.notices if n.kind == T.NOTICE_KIND_SHIPPED]
    assert notice.status == notice_pb2.NOTICE_STATUS_RETRYING
    assert notice.scheduled_at.ToMilliseconds() == retry_ms


async def test_a_corrected_recipient_starts_afresh(redis: Redis, clock: ManualClock) -> None:
    """Another person: the first one's failed channels and attempts say nothing of theirs."""
    engine, _gateway, _retry_ms = await failed_once(redis, clock)
    clock.advance_ms(1_000)
    await put_prefs(redis, prefs("acme/r2"))

    await register(engine, registration("P1", recipient_id="acme/r2"))

    body, due_ms = await shipped(redis)
    assert (body.recipient_id, body.attempt, list(body.failed_channels)) == ("acme/r2", 0, [])
    assert due_ms == body.due_at.ToMilliseconds() == clock.now_ms()


async def test_a_retry_written_back_while_a_replan_runs_is_not_overwritten(
    redis: Redis, clock: ManualClock
) -> None:
    """The gateway writes a failed send back between the re-plan's read and its write: the write
    conflicts and the re-plan reads the body again, rather than writing back the attempt-less body it
    read first."""
    engine = engine_for(redis, clock, CONFIG)
    await put_prefs(redis, prefs())
    await register(engine, registration("P1", recipient_id=RID))
    scan = event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)
    await engine.ingestor.apply(tracking_pb2.EventBatch(seq=1, events=[scan]))
    chans = {name: ScriptedChannel(name) for name in ("email", "sms", "fcm", "webpush")}
    chans["webpush"].script(WebPushSubscription(ENDPOINT, "", ""), PermanentFailure("403 forbidden"))
    chans["email"].script(EmailAddress("r1@example.ch"), TransientFailure("451 try later"))
    gateway = Gateway(CONFIG, redis, clock, chans, consumer="test", rng=random.Random(7))
    await gateway.start()
    read_audiences = engine.store.audiences
    interleaved = 0

    async def gateway_fails_meanwhile(recipient_ids: Iterable[str]) -> dict[str, Audience | None]:
        # Between the re-plan's read and its write (the first time only): claimed, failed, written back.
        nonlocal interleaved
        if not interleaved:
            interleaved += 1
            assert await claim_due(redis, clock.now_ms()) == 1
            assert (await gateway.run_once()).retrying == 1
        return await read_audiences(recipient_ids)

    engine.store.audiences = gateway_fails_meanwhile  # type: ignore[method-assign]
    await put_prefs(redis, prefs(time_zone="Europe/Zurich"))
    await engine.replanner.replan_recipient(RID)

    assert interleaved == 1
    body, due_ms = await shipped(redis)
    assert (body.attempt, list(body.failed_channels)) == (1, [T.CHANNEL_PUSH])
    assert due_ms == body.due_at.ToMilliseconds() > clock.now_ms()
