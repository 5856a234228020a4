"""The gateway against a real Redis: notices put into the outbox as the scheduler leaves them, preferences
as the engine stores them, time from the ManualClock, the real renderer, scripted channels."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from relais.v1 import notice_pb2, preferences_pb2, state_pb2, types_pb2

from channels.base import EmailAddress, FcmToken, PermanentFailure, PhoneNumber, TransientFailure
from common import keys
from common.clock import ManualClock
from gateway.dlq import list_dead_letters, replay
from gateway.render import Rendered, Renderer
from gateway.worker import BatchStats, Gateway
from tests.conftest import T0_MS
from tests.gateway.support import (
    SHARDS,
    ScriptedChannel,
    age_pending,
    attempts,
    body,
    claim_due,
    due_ms,
    get_prefs,
    hset,
    make_notice,
    outbox_left,
    put_prefs,
    queue_notice,
    settings,
)

HOUR_MS = 3_600_000
SENT = notice_pb2.NOTICE_STATUS_SENT


def prefs(recipient_id: str = "r-1", **fields: object) -> preferences_pb2.RecipientPreferences:
    return preferences_pb2.RecipientPreferences(recipient_id=recipient_id, **fields)  # type: ignore[arg-type]


def channels() -> dict[str, ScriptedChannel]:
    return {name: ScriptedChannel(name) for name in ("email", "sms", "fcm", "webpush")}


async def started(
    redis: Redis, clock: ManualClock, chans: dict[str, ScriptedChannel], **gw: object
) -> Gateway:
    gateway = Gateway(settings(**gw), redis, clock, chans, consumer="test", rng=random.Random(7))
    await gateway.start()
    return gateway


async def test_slot_notice_by_email_in_language_and_zone(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="anna@example.ch", locale="fr-CH", time_zone="Europe/Zurich"))
    # 13:00-15:00 UTC on a March day is 14:00-16:00 in Zurich.
    slot = (T0_MS + 4 * HOUR_MS, T0_MS + 6 * HOUR_MS)
    notice = make_notice("p-1", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot)
    await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert stats.sent == 1
    (message,) = chans["email"].sent
    assert message.to == EmailAddress("anna@example.ch")
    assert "14:00" in message.text
    assert "16:00" in message.text
    assert "mardi" in message.text.lower()
    assert message.idempotency_key == "p-1:SLOT_ANNOUNCED:1:email"
    (attempt,) = await attempts(redis, notice)
    assert attempt.status == SENT
    assert attempt.channel == types_pb2.CHANNEL_EMAIL
    assert attempt.provider == "email"
    assert attempt.provider_message_id == "email-1"
    assert attempt.idempotency_key == "p-1:SLOT_ANNOUNCED:1:email"
    assert await redis.get(keys.idempotency(notice.shard, message.idempotency_key)) == b"sent"
    assert await outbox_left(redis) == 0
    pending = await redis.xpending(keys.outbox(notice.shard), keys.OUTBOX_GROUP)
    assert pending["pending"] == 0


async def test_push_carries_collapse_key_and_expiry_in_german(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans)
    push = preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget(token="tok-1"))
    await put_prefs(redis, prefs(push_targets=[push], locale="de", time_zone="Europe/Zurich"))
    slot = (T0_MS + 4 * HOUR_MS, T0_MS + 6 * HOUR_MS)
    notice = make_notice("p-2", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot)
    await queue_notice(redis, notice)

    await gateway.run_once()

    (message,) = chans["fcm"].sent
    assert message.to == FcmToken("tok-1")
    # One key for the parcel's slot notices: a correction replaces the announcement on the phone.
    assert message.collapse_key == "p-2:slot"
    assert message.expires_at is not None
    assert int(message.expires_at.timestamp() * 1000) == slot[1]
    assert message.locale == "de"
    assert "14:00" in message.text
    assert message.data["parcel_id"] == "p-2"


async def test_a_slot_over_or_a_pickup_deadline_passed_is_not_sent(redis: Redis, clock: ManualClock) -> None:
    """Late after retries or a backlog, such a notice would tell the recipient something untrue."""
    chans = channels()
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="late@example.ch"))
    over = make_notice("p-30", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=(T0_MS - 2 * HOUR_MS, T0_MS))
    gone = make_notice("p-31", types_pb2.NOTICE_KIND_PICKUP_REMINDER, deadline_ms=T0_MS - 1)
    running = make_notice("p-32", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=(T0_MS - HOUR_MS, T0_MS + 1))
    for notice in (over, gone, running):
        await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert (stats.expired, stats.sent) == (2, 1)
    assert [m.idempotency_key for m in chans["email"].sent] == ["p-32:SLOT_ANNOUNCED:1:email"]
    for notice in (over, gone):
        (attempt,) = await attempts(redis, notice)
        assert attempt.status == notice_pb2.NOTICE_STATUS_CANCELLED
        assert "too late" in attempt.error
    assert await outbox_left(redis) == 0


async def test_a_retry_after_the_parcel_was_delivered_tells_only_the_delivery(
    redis: Redis, clock: ManualClock
) -> None:
    """The engine cancels what is still due; a retry it handed over before delivery is the gateway's
    to drop: nothing about a slot or a pickup goes out after delivery (DESIGN.md), only the news of
    the delivery itself."""
    chans = channels()
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="k@example.ch"))
    slot = (T0_MS + HOUR_MS, T0_MS + 3 * HOUR_MS)
    delivered = make_notice("p-40", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot)
    on_the_van = make_notice("p-41", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot)
    picked_up = make_notice(
        "p-42", types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, deadline_ms=T0_MS + 48 * HOUR_MS
    )
    picked_up.pickup_point.id = "PP-1"
    delivery = make_notice("p-43", types_pb2.NOTICE_KIND_DELIVERED)
    for notice, status in (
        (delivered, types_pb2.TRACKING_STATUS_DELIVERED),
        (on_the_van, types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY),
        (picked_up, types_pb2.TRACKING_STATUS_DELIVERED),
        (delivery, types_pb2.TRACKING_STATUS_DELIVERED),
    ):
        notice.attempt = 1  # a retry
        state = state_pb2.ParcelState(status=status).SerializeToString()
        await hset(redis, keys.parcel(notice.shard, notice.parcel_id), keys.PARCEL_STATE_FIELD, state)
        await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert (stats.sent, stats.expired) == (2, 2)
    assert sorted(m.idempotency_key for m in chans["email"].sent) == [
        "p-41:SLOT_ANNOUNCED:1:email",
        "p-43:DELIVERED:1:email",
    ]
    for notice in (delivered, picked_up):
        (attempt,) = await attempts(redis, notice)
        assert attempt.status == notice_pb2.NOTICE_STATUS_CANCELLED
        assert attempt.error == "the parcel was delivered or returned meanwhile"


async def test_a_slot_retry_superseded_by_a_newer_slot_notice_is_not_sent(
    redis: Redis, clock: ManualClock
) -> None:
    """The engine takes a handed-over notice as told: a slot moved while its send was retried gets
    a correction (a corrected recipient, a new announcement) under a newer version, and the retry
    must not follow it with the old slot. A move too small for a correction leaves it to send."""
    chans = channels()
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="k@example.ch"))
    slot = (T0_MS + HOUR_MS, T0_MS + 3 * HOUR_MS)
    announced, corrected = types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, types_pb2.NOTICE_KIND_SLOT_CORRECTED
    cases = {
        # parcel: (the retried notice's kind and version, the marks the engine has planned since)
        "p-50": (announced, 1, [(announced, 1), (corrected, 2)]),  # moved: a correction
        "p-51": (announced, 1, [(announced, 2)]),  # recipient corrected: announced again
        "p-52": (announced, 1, [(announced, 1)]),  # moved under the threshold (slot version 2)
        "p-53": (corrected, 2, [(announced, 1), (corrected, 2)]),  # the newest itself
    }
    for parcel_id, (kind, version, marks) in cases.items():
        previous = slot if kind == corrected else None
        notice = make_notice(parcel_id, kind, version=version, slot_ms=slot, previous_slot_ms=previous)
        notice.attempt = 1  # a retry
        state = state_pb2.ParcelState(
            status=types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY,
            slot=types_pb2.Slot(version=2),
            notices=[state_pb2.NoticeMark(kind=k, version=v) for k, v in marks],
        )
        key = keys.parcel(notice.shard, parcel_id)
        await hset(redis, key, keys.PARCEL_STATE_FIELD, state.SerializeToString())
        await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert (stats.sent, stats.expired) == (2, 2)
    assert sorted(m.idempotency_key for m in chans["email"].sent) == [
        "p-52:SLOT_ANNOUNCED:1:email",
        "p-53:SLOT_CORRECTED:2:email",
    ]
    for parcel_id, newer in (
        ("p-50", "SLOT_CORRECTED notice of slot version 2"),
        ("p-51", "SLOT_ANNOUNCED notice of slot version 2"),
    ):
        (attempt,) = await attempts(redis, make_notice(parcel_id, announced))
        assert attempt.status == notice_pb2.NOTICE_STATUS_CANCELLED
        assert attempt.error == f"superseded by the {newer}"


async def test_dead_push_token_falls_back_to_email_and_leaves_prefs(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    chans["fcm"].script(FcmToken("dead"), *[PermanentFailure("UNREGISTERED", destination_invalid=True)] * 2)
    gateway = await started(redis, clock, chans)
    targets = [
        preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget(token="dead")),
        preferences_pb2.PushTarget(web_push=preferences_pb2.WebPushTarget(endpoint="https://push.example/x")),
    ]
    await put_prefs(redis, prefs(email="b@example.ch", push_targets=targets[:1]))
    await put_prefs(redis, prefs("r-2", push_targets=targets))
    first = make_notice("p-3")
    second = make_notice("p-4", recipient_id="r-2")
    await queue_notice(redis, first)
    await queue_notice(redis, second)

    stats = await gateway.run_once()

    assert stats.sent == 2
    assert [m.to for m in chans["email"].sent] == [EmailAddress("b@example.ch")]
    assert [a.status for a in await attempts(redis, first)] == [notice_pb2.NOTICE_STATUS_FAILED, SENT]
    assert [a.channel for a in await attempts(redis, first)] == [
        types_pb2.CHANNEL_PUSH,
        types_pb2.CHANNEL_EMAIL,
    ]
    assert not (await get_prefs(redis, "r-1")).push_targets
    assert (await get_prefs(redis, "r-1")).email == "b@example.ch"
    # Two devices: the live one took it, the dead one left the preferences.
    assert len(chans["webpush"].sent) == 1
    assert [t.WhichOneof("target") for t in (await get_prefs(redis, "r-2")).push_targets] == ["web_push"]


async def test_sms_only_when_worth_it(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans, sms_value_threshold_minor=20_000)
    await put_prefs(redis, prefs(phone="+41791234567", sms_opt_in=True, time_zone="Europe/Zurich"))
    cheap = make_notice("p-5", value_minor=5_000)
    dear = make_notice("p-6", value_minor=25_000)
    today_slot = make_notice(
        "p-7", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=(T0_MS + 4 * HOUR_MS, T0_MS + 6 * HOUR_MS)
    )
    tomorrow_slot = make_notice(
        "p-8", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=(T0_MS + 28 * HOUR_MS, T0_MS + 30 * HOUR_MS)
    )
    for notice in (cheap, dear, today_slot, tomorrow_slot):
        await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert stats.sent == 2
    assert stats.suppressed == 2
    assert {m.idempotency_key for m in chans["sms"].sent} == {"p-6:SHIPPED:1:sms", "p-7:SLOT_ANNOUNCED:1:sms"}
    assert all(m.to == PhoneNumber("+41791234567") for m in chans["sms"].sent)
    (withheld,) = await attempts(redis, cheap)
    assert withheld.status == notice_pb2.NOTICE_STATUS_SUPPRESSED
    assert withheld.error == "no reachable channel"
    # Two texts billed to the merchant's month (the scripted provider reports no segments: 1 each).
    assert await redis.get(keys.sms_budget("m-1", "2026-03", SHARDS)) == b"2"


async def test_sms_budget_spent_withholds_sms(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans, sms_monthly_budget_segments=3)
    await redis.set(keys.sms_budget("m-1", "2026-03", SHARDS), 3)
    await put_prefs(redis, prefs(phone="+41791234567", sms_opt_in=True))
    await queue_notice(redis, make_notice("p-9", value_minor=1_000_000))
    stats = await gateway.run_once()
    assert stats.suppressed == 1
    assert not chans["sms"].sent


async def test_no_preferences_is_suppressed(redis: Redis, clock: ManualClock) -> None:
    gateway = await started(redis, clock, channels())
    notice = make_notice("p-10", recipient_id="nobody")
    await queue_notice(redis, notice)
    await gateway.run_once()
    (attempt,) = await attempts(redis, notice)
    assert attempt.status == notice_pb2.NOTICE_STATUS_SUPPRESSED
    assert attempt.error == "no preferences"
    assert await outbox_left(redis) == 0


async def test_rate_limit_delays_but_never_drops(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans, provider_rates_per_s={"email": 2.0})
    count = 20
    for i in range(count):
        await put_prefs(redis, prefs(f"r-{i}", email=f"u{i}@example.ch"))
        await queue_notice(redis, make_notice(f"p-rl-{i}", recipient_id=f"r-{i}"))

    first = await gateway.run_once()
    assert first.sent == 2  # the burst: one second's worth
    assert first.limited == count - 2
    sent_at: list[int] = [T0_MS, T0_MS]
    for _ in range(200):
        if len(chans["email"].sent) == count:
            break
        clock.advance_ms(250)
        await claim_due(redis, clock.now_ms())
        before = len(chans["email"].sent)
        await gateway.run_once()
        sent_at += [clock.now_ms()] * (len(chans["email"].sent) - before)

    assert sorted(m.idempotency_key for m in chans["email"].sent) == sorted(
        f"p-rl-{i}:SHIPPED:1:email" for i in range(count)
    )
    # 2 per second after the burst of 2: 20 take 9 more seconds, never faster.
    assert sent_at[-1] - T0_MS >= 9_000
    for i in range(2, count):
        assert sent_at[i] - T0_MS >= (i - 1) * 500


async def test_frequency_cap_spares_slot_notices(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans, recipient_rate_per_h=1.0, recipient_burst=1)
    await put_prefs(redis, prefs(email="c@example.ch"))
    slot = (T0_MS + 4 * HOUR_MS, T0_MS + 6 * HOUR_MS)
    for notice in (
        make_notice("p-11"),
        make_notice("p-12"),
        make_notice("p-13", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot),
        make_notice("p-14", types_pb2.NOTICE_KIND_SLOT_CORRECTED, slot_ms=slot, previous_slot_ms=slot),
    ):
        await queue_notice(redis, notice)
    stats = await gateway.run_once()
    assert stats.sent == 3
    assert stats.limited == 1
    # One of the two ordinary notices waits an hour (which one depends on the order of the shards).
    held = [await due_ms(redis, make_notice(parcel_id)) for parcel_id in ("p-11", "p-12")]
    assert sorted(held, key=str) == [T0_MS + HOUR_MS, None]


async def test_transient_failure_retried_then_sent(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    chans["email"].script(EmailAddress("d@example.ch"), TransientFailure("451 try later"))
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="d@example.ch"))
    notice = make_notice("p-15")
    await queue_notice(redis, notice)

    stats = await gateway.run_once()
    assert stats.retrying == 1
    due = await due_ms(redis, notice)
    # First retry: between half and all of the 10 s base.
    assert due is not None
    assert T0_MS + 5_000 <= due <= T0_MS + 10_000
    assert (await body(redis, notice)).attempt == 1
    # The claim was released: the retry may send.
    assert await redis.get(keys.idempotency(notice.shard, "p-15:SHIPPED:1:email")) is None

    clock.set_ms(due)
    assert await claim_due(redis, clock.now_ms()) == 1
    stats = await gateway.run_once()
    assert stats.sent == 1
    statuses = [a.status for a in await attempts(redis, notice)]
    assert statuses == [notice_pb2.NOTICE_STATUS_RETRYING, SENT]
    assert (await attempts(redis, notice))[0].error == "451 try later"


async def test_out_of_retries_to_dead_letters_then_replayed(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    address = EmailAddress("e@example.ch")
    chans["email"].script(address, *[TransientFailure("timeout")] * 3)
    gateway = await started(redis, clock, chans, max_attempts=3, recipient_rate_per_h=100.0)
    await put_prefs(redis, prefs(email="e@example.ch"))
    notice = make_notice("p-16")
    await queue_notice(redis, notice)

    await gateway.run_once()
    for _ in range(2):
        clock.advance_ms(120_000)
        assert await claim_due(redis, clock.now_ms()) == 1
        await gateway.run_once()

    assert await due_ms(redis, notice) is None
    (letter,) = await list_dead_letters(redis, SHARDS)
    assert letter.notice.notice_id == "p-16:SHIPPED"
    assert letter.notice.attempt == 3
    assert letter.reason == "out of retries: timeout"
    assert (await attempts(redis, notice))[-1].status == notice_pb2.NOTICE_STATUS_DEAD_LETTER

    result = await replay(redis, SHARDS, clock, [letter.id])
    assert (result.replayed, result.superseded, result.missing) == (1, 0, ())
    assert await list_dead_letters(redis, SHARDS) == []
    assert await due_ms(redis, notice) == clock.now_ms()
    assert (await body(redis, notice)).attempt == 0
    await claim_due(redis, clock.now_ms())
    assert (await gateway.run_once()).sent == 1
    assert len(chans["email"].sent) == 4


async def test_permanent_failure_on_every_channel_dead_letters(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    chans["email"].script(EmailAddress("f@example.ch"), PermanentFailure("554 rejected"))
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="f@example.ch"))
    notice = make_notice("p-17")
    await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert (stats.failed, stats.dead_lettered) == (1, 1)
    (letter,) = await list_dead_letters(redis, SHARDS)
    assert list(letter.notice.failed_channels) == [types_pb2.CHANNEL_EMAIL]
    assert [a.status for a in await attempts(redis, notice)] == [
        notice_pb2.NOTICE_STATUS_FAILED,
        notice_pb2.NOTICE_STATUS_DEAD_LETTER,
    ]
    # Replay all: fresh, with every channel allowed again; the provider takes it this time.
    assert (await replay(redis, SHARDS, clock)).replayed == 1
    assert not (await body(redis, notice)).failed_channels
    await claim_due(redis, clock.now_ms())
    assert (await gateway.run_once()).sent == 1


async def test_dead_letters_past_their_retention_go_when_the_next_comes(
    redis: Redis, clock: ManualClock
) -> None:
    chans = channels()
    chans["email"].script(EmailAddress("f@example.ch"), PermanentFailure("554 rejected"))
    gateway = await started(redis, clock, chans, dead_letter_retention_days=14)
    await put_prefs(redis, prefs(email="f@example.ch"))
    notice = make_notice("p-17")
    stream = keys.dead_letters(keys.shard_of(notice.parcel_id, SHARDS))
    # Stream ids are Redis's clock: one letter 15 days old (past retention), one 13 days old.
    seconds, _ = await redis.time()
    now_ms = seconds * 1000
    for age_days in (15, 13):
        entry_id = f"{now_ms - age_days * 86_400_000}-0"
        await redis.xadd(stream, {"n": b"", "reason": f"{age_days} days old", "at": 0}, id=entry_id)
    await queue_notice(redis, notice)

    assert (await gateway.run_once()).dead_lettered == 1

    reasons = [letter.reason for letter in await list_dead_letters(redis, SHARDS)]
    assert reasons == ["13 days old", "every channel failed"]


async def test_replay_of_superseded_notice_drops_it(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    chans["email"].script(EmailAddress("g@example.ch"), PermanentFailure("554 rejected"))
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="g@example.ch"))
    notice = make_notice("p-18")
    await queue_notice(redis, notice)
    await gateway.run_once()
    (letter,) = await list_dead_letters(redis, SHARDS)
    await hset(redis, keys.parcel(notice.shard, "p-18"), "nv:SHIPPED", 2)
    result = await replay(redis, SHARDS, clock, [letter.id, f"{letter.shard}/1-0"])
    assert (result.replayed, result.superseded) == (0, 1)
    assert result.missing == (f"{letter.shard}/1-0",)
    assert await due_ms(redis, notice) is None
    assert await list_dead_letters(redis, SHARDS) == []


async def test_a_key_marked_sent_is_never_sent_again(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="h@example.ch"))
    notice = make_notice("p-19")
    await redis.set(keys.idempotency(notice.shard, "p-19:SHIPPED:1:email"), "sent")
    await queue_notice(redis, notice)
    # The same notice twice in the outbox (a redelivery) and once more later.
    other = make_notice("p-20")
    await queue_notice(redis, other)
    await queue_notice(redis, other)

    stats = await gateway.run_once()
    await queue_notice(redis, other)
    await gateway.run_once()

    assert [m.idempotency_key for m in chans["email"].sent] == ["p-20:SHIPPED:1:email"]
    # Copies are acknowledged without a second record: p-19 and p-20's second copy.
    assert (stats.sent, stats.already_sent, stats.elsewhere) == (1, 2, 0)
    assert len(await attempts(redis, other)) == 1
    assert await attempts(redis, notice) == []
    assert await outbox_left(redis) == 0


async def test_a_claim_held_elsewhere_comes_back_once_its_holder_settled(
    redis: Redis, clock: ManualClock
) -> None:
    """A live holder: it sends and settles; the notice's return is acknowledged, not sent again."""
    chans = channels()
    gateway = await started(redis, clock, chans, send_timeout_s=30.0)
    await put_prefs(redis, prefs(email="i@example.ch"))
    notice = make_notice("p-21")
    key = keys.idempotency(notice.shard, "p-21:SHIPPED:1:email")
    await redis.set(key, "sending", px=60_000)
    await queue_notice(redis, notice)

    stats = await gateway.run_once()

    assert stats.elsewhere == 1
    assert not chans["email"].sent
    # Back when the holder's claim (two send timeouts) has certainly ended.
    assert await due_ms(redis, notice) == clock.now_ms() + 60_000
    await redis.set(key, "sent")
    clock.advance_ms(60_000)
    assert await claim_due(redis, clock.now_ms()) == 1
    stats = await gateway.run_once()
    assert (stats.already_sent, stats.sent) == (1, 0)
    assert not chans["email"].sent
    assert await outbox_left(redis) == 0


async def test_a_claim_whose_holder_died_is_sent_once_it_expires(redis: Redis, clock: ManualClock) -> None:
    """A gateway died mid-send: the survivor took its entry over before the claim expired."""
    chans = channels()
    gateway = await started(redis, clock, chans, send_timeout_s=30.0)
    await put_prefs(redis, prefs(email="j@example.ch"))
    notice = make_notice("p-22")
    claim = keys.idempotency(notice.shard, "p-22:SHIPPED:1:email")
    await redis.set(claim, "sending", px=60_000)
    await queue_notice(redis, notice)

    assert (await gateway.run_once()).elsewhere == 1
    # The dead holder's claim expires: Redis drops the key, as its TTL would (no race against a
    # short TTL on a busy machine).
    await redis.delete(claim)
    clock.advance_ms(60_000)  # the notice comes back after two send timeouts
    assert await claim_due(redis, clock.now_ms()) == 1

    assert (await gateway.run_once()).sent == 1
    assert [m.idempotency_key for m in chans["email"].sent] == ["p-22:SHIPPED:1:email"]


async def queue_for_many(redis: Redis, name: str, count: int) -> list[notice_pb2.Notice]:
    """``count`` notices, each to a recipient of its own with an email address, in the outbox."""
    notices = []
    for i in range(count):
        await put_prefs(redis, prefs(f"r-{name}-{i}", email=f"{name}{i}@example.ch"))
        notices.append(make_notice(f"p-{name}-{i}", recipient_id=f"r-{name}-{i}"))
        await queue_notice(redis, notices[-1])
    return notices


async def send_the_rest(
    gateway: Gateway, redis: Redis, clock: ManualClock, chans: dict[str, ScriptedChannel], total: int
) -> int:
    """Rounds of the gateway, each a send timeout later, until ``total`` messages went out; how many."""
    rounds = 0
    while len(chans["email"].sent) < total:
        clock.advance_ms(1_000)  # deferred by one send timeout
        assert await claim_due(redis, clock.now_ms()) > 0
        await gateway.run_once()
        rounds += 1
    return rounds


async def test_a_slow_provider_gets_chunks_and_nothing_goes_out_twice(
    redis: Redis, clock: ManualClock
) -> None:
    """50 ms a message, chunks of 4 (0.2 s each), a 1 s send timeout, so no chunk starts after 0.5 s:
    a batch sends three chunks (started at about 0, 0.2 and 0.4 s, a tenth of a second from the
    cut either way), leaves the rest for later without spending an attempt, and no message is sent
    twice."""
    chans = channels()
    chans["email"].delay_s = 0.05
    gateway = await started(redis, clock, chans, send_timeout_s=1.0, send_chunk=4, limits_enabled=False)
    notices = await queue_for_many(redis, "slow", 24)

    first = await gateway.run_once()
    assert (first.sent, first.deferred_slow, first.retrying) == (12, 12, 0)
    assert await send_the_rest(gateway, redis, clock, chans, len(notices)) == 1

    keys_sent = [m.idempotency_key for m in chans["email"].sent]
    assert sorted(keys_sent) == sorted(f"{n.notice_id}:1:email" for n in notices)
    # No attempt was spent waiting: each notice's one attempt is its send.
    for notice in notices:
        assert [a.status for a in await attempts(redis, notice)] == [SENT]


class _SlowRenderer:
    """Templates that take 50 ms each (blocking, as heavy rendering does)."""

    def __init__(self) -> None:
        self._inner = Renderer(settings().gateway.templates_dir)

    def render(self, notice: notice_pb2.Notice, **how: Any) -> Rendered:
        time.sleep(0.05)
        return self._inner.render(notice, **how)


async def test_slow_rendering_does_not_leave_a_batch_unsent(redis: Redis, clock: ManualClock) -> None:
    """24 notices at 50 ms of rendering each: 1.2 s, past the half-second cut of a 1 s send timeout.
    Rendered chunk by chunk, the batch's first chunks still go out before the cut (rendered all
    first, none would, batch after batch)."""
    chans = channels()
    gateway = Gateway(
        settings(send_timeout_s=1.0, send_chunk=4, limits_enabled=False),
        redis,
        clock,
        chans,
        renderer=_SlowRenderer(),
        consumer="test",
    )
    await gateway.start()
    notices = await queue_for_many(redis, "render", 24)

    first = await gateway.run_once()
    assert first.sent >= 4
    assert (first.sent + first.deferred_slow, first.retrying) == (24, 0)
    await send_the_rest(gateway, redis, clock, chans, len(notices))
    assert sorted(m.idempotency_key for m in chans["email"].sent) == sorted(
        f"{n.notice_id}:1:email" for n in notices
    )


async def test_quiet_hours_hold_until_morning(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans)
    # 09:00 UTC is 10:00 in Zurich; quiet 08:00-12:00 local ends at 11:00 UTC.
    await put_prefs(
        redis,
        prefs(
            email="j@example.ch",
            time_zone="Europe/Zurich",
            quiet_hours=preferences_pb2.QuietHours(start_minute=8 * 60, end_minute=12 * 60),
        ),
    )
    notice = make_notice("p-22")
    await queue_notice(redis, notice)
    stats = await gateway.run_once()
    assert stats.deferred_quiet == 1
    assert await due_ms(redis, notice) == T0_MS + 2 * HOUR_MS
    assert not chans["email"].sent


async def test_quiet_hours_never_hold_past_deadline_and_prefer_email(
    redis: Redis, clock: ManualClock
) -> None:
    chans = channels()
    gateway = await started(redis, clock, chans)
    push = preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget(token="tok-q"))
    await put_prefs(
        redis,
        prefs(
            email="k@example.ch",
            push_targets=[push],
            time_zone="Europe/Zurich",
            quiet_hours=preferences_pb2.QuietHours(start_minute=8 * 60, end_minute=12 * 60),
        ),
    )
    slot = (T0_MS + HOUR_MS, T0_MS + 3 * HOUR_MS)
    notice = make_notice("p-23", types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_ms=slot, deadline_ms=slot[0])
    await queue_notice(redis, notice)
    stats = await gateway.run_once()
    assert stats.sent == 1
    assert not chans["fcm"].sent
    assert [m.to for m in chans["email"].sent] == [EmailAddress("k@example.ch")]


async def test_superseded_retry_is_dropped(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    chans["email"].script(EmailAddress("l@example.ch"), TransientFailure("timeout"))
    gateway = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="l@example.ch"))
    notice = make_notice("p-24", version=1)
    await queue_notice(redis, notice)
    # The engine moved on to version 2 while version 1 was in the outbox.
    await hset(redis, keys.parcel(notice.shard, "p-24"), "nv:SHIPPED", 2)
    stats = await gateway.run_once()
    assert (stats.retrying, stats.superseded) == (1, 1)
    assert await due_ms(redis, notice) is None


async def test_malformed_entry_is_acknowledged_and_dropped(redis: Redis, clock: ManualClock) -> None:
    gateway = await started(redis, clock, channels())
    await redis.xadd(keys.outbox(0), {"n": b"\xff\xff not a notice"})
    await redis.xadd(keys.outbox(1), {"x": b"no body"})
    stats = await gateway.run_once()
    assert stats.sent == 0
    assert await outbox_left(redis) == 0


async def test_crashed_consumers_entries_are_reclaimed(redis: Redis, clock: ManualClock) -> None:
    chans = channels()
    crashed = await started(redis, clock, chans)
    await put_prefs(redis, prefs(email="m@example.ch"))
    await queue_notice(redis, make_notice("p-25"))
    # The first gateway reads the entry and dies before settling it.
    assert len(await crashed.outbox.read(block=False)) == 1
    survivor = Gateway(settings(), redis, clock, chans, consumer="survivor")
    await survivor.start()
    assert (await survivor.run_once()).sent == 0
    # Not yet idle for two send timeouts: a live gateway's entry is not taken over.
    assert (await survivor.run_once(reclaim=True)).sent == 0
    assert await age_pending(redis) == 1
    assert (await survivor.run_once(reclaim=True)).sent == 1
    assert len(chans["email"].sent) == 1
    assert await outbox_left(redis) == 0


class _Brittle(Gateway):
    """A gateway with a bug that one notice triggers: every batch holding it raises."""

    def _plan_one(self, item: Any, batch: Any) -> Any:
        if item.notice.notice_id.startswith("p-poison"):
            raise RuntimeError("a bug this notice triggers")
        return super()._plan_one(item, batch)


async def test_a_notice_that_fails_every_batch_is_isolated_then_dead_lettered(
    redis: Redis, clock: ManualClock
) -> None:
    chans = channels()
    gateway = _Brittle(settings(max_deliveries=4), redis, clock, chans, consumer="test")
    await gateway.start()
    await put_prefs(redis, prefs(email="m@example.ch"))
    for parcel_id in ("p-1", "p-poison", "p-2"):
        await queue_notice(redis, make_notice(parcel_id))

    async def redelivered() -> BatchStats:
        await age_pending(redis)  # past two send timeouts, on the server's clock (XAUTOCLAIM)
        return await gateway.run_once(reclaim=True)

    # Delivery 1, and 2 (reclaimed together: their gateway may just have died): the batch fails.
    with pytest.raises(RuntimeError):
        await gateway.run_once()
    with pytest.raises(RuntimeError):
        await redelivered()
    assert chans["email"].sent == []
    # Delivery 3: each alone. The others go out; the poison stays pending, holding back nothing else.
    await redelivered()
    assert sorted(m.idempotency_key for m in chans["email"].sent) == [
        "p-1:SHIPPED:1:email",
        "p-2:SHIPPED:1:email",
    ]
    assert await list_dead_letters(redis, SHARDS) == []
    await redelivered()  # delivery 4: alone again, fails again
    assert await list_dead_letters(redis, SHARDS) == []
    # Delivery 5 is past the limit of 4: to the dead-letter stream, recorded on the notice, settled.
    await redelivered()
    (letter,) = await list_dead_letters(redis, SHARDS)
    assert letter.notice.notice_id.startswith("p-poison")
    assert "after 4 deliveries" in letter.reason
    (attempt,) = await attempts(redis, letter.notice)
    assert attempt.status == notice_pb2.NOTICE_STATUS_DEAD_LETTER
    assert await outbox_left(redis) == 0
    assert len(chans["email"].sent) == 2
