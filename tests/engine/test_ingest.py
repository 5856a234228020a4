"""Ingest, registration and re-planning against the real Redis fixture (no gRPC here)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from redis.asyncio import Redis
from relais.v1 import notice_pb2, parcel_pb2, preferences_pb2, state_pb2, tracking_pb2, types_pb2

from common import keys
from common.clock import ManualClock
from common.slots import window_ms
from engine.auth import Principal, bind_principal, unbind_principal
from engine.planner import Audience
from engine.state import (
    DAY_MS,
    MAX_TIMELINE_EVENTS,
    ParcelChange,
    body_field,
    load_state,
    version_field,
    withdrawn_field,
)
from tests.conftest import T0_MS
from tests.engine.core_support import (
    HOUR_MS,
    MIN_MS,
    SETTINGS,
    Core,
    claim,
    claim_and_send,
    due_members,
    engine_for,
    event,
    hget,
    hkeys,
    put_preferences,
    registration,
)

T = types_pb2
SLOT = (T0_MS + DAY_MS, T0_MS + DAY_MS + 2 * HOUR_MS)


def batch(seq: int, *events: tracking_pb2.TrackingEvent) -> tracking_pb2.EventBatch:
    return tracking_pb2.EventBatch(seq=seq, events=events)


async def register(engine: Core, *regs: parcel_pb2.ParcelRegistration) -> parcel_pb2.RegisterParcelsResponse:
    # Without gRPC: the servicer only needs a context to abort with, which valid requests never do.
    request = parcel_pb2.RegisterParcelsRequest(parcels=regs)
    return await engine.parcels.RegisterParcels(request, None)  # type: ignore[arg-type]


async def notice_body(redis: Redis, parcel_id: str, kind: str) -> notice_pb2.Notice | None:
    shard = keys.shard_of(parcel_id, SETTINGS.shards)
    raw = await hget(redis, keys.parcel(shard, parcel_id), body_field(kind))
    return None if raw is None else notice_pb2.Notice.FromString(raw)


async def state_of(redis: Redis, parcel_id: str) -> state_pb2.ParcelState:
    shard = keys.shard_of(parcel_id, SETTINGS.shards)
    raw = await hget(redis, keys.parcel(shard, parcel_id), "s")
    assert raw is not None
    return load_state(parcel_id, raw)


async def test_slot_story_end_to_end(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))
    ing = engine.ingestor
    await ing.apply(batch(1, event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS, slot=SLOT)))
    assert set(await due_members(redis, "P1")) == {"P1:SHIPPED", "P1:SLOT_ANNOUNCED"}
    await claim(redis, "P1", "SHIPPED")

    # Moved before it went out: the same notice, new version and slot; nothing else.
    moved = (SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS)
    await ing.apply(batch(2, event("e2", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + 1, slot=moved)))
    assert set(await due_members(redis, "P1")) == {"P1:SLOT_ANNOUNCED"}
    body = await notice_body(redis, "P1", "SLOT_ANNOUNCED")
    assert body is not None
    assert body.version == 2
    assert window_ms(body.slot) == moved
    assert body.shard == (keys.shard_of("P1", SETTINGS.shards))
    shard = keys.shard_of("P1", SETTINGS.shards)
    assert await hget(redis, keys.parcel(shard, "P1"), version_field("SLOT_ANNOUNCED")) == b"2"

    # It went out; moved again: one correction naming both slots, due after the debounce.
    await claim_and_send(redis, "P1", "SLOT_ANNOUNCED", clock)
    clock.advance_ms(MIN_MS)
    later = (SLOT[0] + 6 * HOUR_MS, SLOT[1] + 6 * HOUR_MS)
    await ing.apply(batch(3, event("e3", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + 2, slot=later)))
    due = await due_members(redis, "P1")
    assert due == {"P1:SLOT_CORRECTED": clock.now_ms() + SETTINGS.engine.correction_debounce_s * 1000}
    correction = await notice_body(redis, "P1", "SLOT_CORRECTED")
    assert correction is not None
    assert window_ms(correction.previous_slot) == moved
    assert window_ms(correction.slot) == later

    # It went out; a tiny move sends nothing.
    await claim_and_send(redis, "P1", "SLOT_CORRECTED", clock)
    tiny = (later[0] + 10 * MIN_MS, later[1] + 10 * MIN_MS)
    await ing.apply(batch(4, event("e4", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + 3, slot=tiny)))
    assert await due_members(redis, "P1") == {}

    # A bigger move plans a correction; delivery cancels it before it goes out.
    far = (later[0] + 2 * HOUR_MS, later[1] + 2 * HOUR_MS)
    await ing.apply(batch(5, event("e5", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + 4, slot=far)))
    assert set(await due_members(redis, "P1")) == {"P1:SLOT_CORRECTED"}
    await ing.apply(batch(6, event("e6", "P1", T.TRACKING_STATUS_DELIVERED, T0_MS + 5)))
    assert set(await due_members(redis, "P1")) == {"P1:DELIVERED"}
    assert await notice_body(redis, "P1", "SLOT_CORRECTED") is None
    assert await hget(redis, keys.parcel(shard, "P1"), withdrawn_field("SLOT_CORRECTED")) == b"CANCELLED"


async def test_duplicates_out_of_order_and_bad_events(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    events = [
        event("b", "P2", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS - MIN_MS),
        tracking_pb2.TrackingEvent(event_id="x", parcel_id="P2", carrier="swisspost"),  # no status
        event("a", "P2", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - HOUR_MS),
        event("future", "P2", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + HOUR_MS),
        event("a", "P2", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - HOUR_MS),  # same id again
    ]
    ack = await engine.ingestor.apply(batch(7, *events))
    assert (ack.seq, ack.accepted, ack.duplicates) == (7, 2, 1)
    assert [(r.index, r.field, r.code) for r in ack.rejected] == [
        (1, "status", tracking_pb2.REJECT_CODE_INVALID_ARGUMENT),
        (3, "occurred_at", tracking_pb2.REJECT_CODE_INVALID_ARGUMENT),
    ]
    again = await engine.ingestor.apply(batch(8, events[0], events[2]))
    assert (again.accepted, again.duplicates) == (0, 2)
    state = await state_of(redis, "P2")
    assert state.status == T.TRACKING_STATUS_OUT_FOR_DELIVERY
    assert [e.event.event_id for e in state.timeline] == ["a", "b"]


async def test_unknown_parcel_merged_on_registration(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await engine.ingestor.apply(batch(1, event("e1", "P3", T.TRACKING_STATUS_IN_TRANSIT, T0_MS, slot=SLOT)))
    assert await due_members(redis, "P3") == {}  # nobody to tell yet
    response = await register(engine, registration("P3"))
    assert response.registered == 1
    assert not response.rejected
    assert set(await due_members(redis, "P3")) == {"P3:SHIPPED", "P3:SLOT_ANNOUNCED"}
    state = await state_of(redis, "P3")
    assert state.registered
    assert state.recipient_id == "acme/r1"
    assert len(state.timeline) == 1
    members = await hkeys(redis, keys.recipient_parcels(keys.shard_of("acme/r1", SETTINGS.shards), "acme/r1"))
    assert members == [b"P3"]


async def test_registration_rejects_bad_entries_by_index(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    bad = registration("P4")
    bad.recipient_id = ""
    other = registration("P5", merchant_id="globex")
    await register(engine, registration("P5"))
    response = await register(engine, registration("P4b"), bad, other)
    assert response.registered == 1
    assert [(r.index, r.field) for r in response.rejected] == [(1, "recipient_id"), (2, "parcel_id")]


async def test_pickup_reminder_cancelled_by_pickup(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await register(engine, registration("P6"))
    deadline_ms = T0_MS + 4 * DAY_MS
    pickup = event("e1", "P6", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("PP9", deadline_ms))
    await engine.ingestor.apply(batch(1, pickup))
    due = await due_members(redis, "P6")
    assert due["P6:PICKUP_REMINDER"] == deadline_ms - 24 * HOUR_MS
    await engine.ingestor.apply(batch(2, event("e2", "P6", T.TRACKING_STATUS_DELIVERED, T0_MS + MIN_MS)))
    assert "P6:PICKUP_REMINDER" not in await due_members(redis, "P6")


async def test_unpaid_gets_no_actionable_notice_and_muted_kind_is_not_scheduled(
    redis: Redis, clock: ManualClock
) -> None:
    engine = engine_for(redis, clock)
    prefs = preferences_pb2.RecipientPreferences(recipient_id="acme/r2", muted_kinds=[T.NOTICE_KIND_SHIPPED])
    await put_preferences(redis, prefs)
    await register(engine, registration("P7", recipient_id="acme/r2", paid=False))
    address = event("e1", "P7", T.TRACKING_STATUS_EXCEPTION, T0_MS, reason=T.EXCEPTION_REASON_ADDRESS_PROBLEM)
    await engine.ingestor.apply(
        batch(1, event("e0", "P7", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - 1, slot=SLOT))
    )
    await engine.ingestor.apply(batch(2, address))
    due = await due_members(redis, "P7")
    assert set(due) == {"P7:SLOT_ANNOUNCED"}  # SHIPPED muted, EXCEPTION not for unpaid orders
    body = await notice_body(redis, "P7", "SLOT_ANNOUNCED")
    assert body is not None
    assert not body.actionable
    assert not body.paid


async def test_finished_parcel_expires_after_retention(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await engine.ingestor.apply(batch(1, event("e1", "P8", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)))
    shard = keys.shard_of("P8", SETTINGS.shards)
    idle_ms = await redis.pttl(keys.parcel(shard, "P8"))
    assert idle_ms > SETTINGS.retention_days * DAY_MS  # active parcels only expire when abandoned
    await engine.ingestor.apply(batch(2, event("e2", "P8", T.TRACKING_STATUS_DELIVERED, T0_MS + 1)))
    ttl_ms = await redis.pttl(keys.parcel(shard, "P8"))
    assert SETTINGS.retention_days * DAY_MS - MIN_MS < ttl_ms <= SETTINGS.retention_days * DAY_MS
    assert (await state_of(redis, "P8")).expires_ms == T0_MS + SETTINGS.retention_days * DAY_MS


async def test_idle_expiry_moves_on_at_the_first_write_of_a_day(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    key = keys.parcel(keys.shard_of("P9", SETTINGS.shards), "P9")
    idle_ms = SETTINGS.engine.idle_retention_days * DAY_MS
    await engine.ingestor.apply(batch(1, event("e1", "P9", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)))
    assert idle_ms - MIN_MS < await redis.pttl(key) <= idle_ms
    # As if the expiry had been set long ago: later writes the same day leave it where it is...
    await redis.pexpire(key, HOUR_MS)
    clock.set_ms(T0_MS + HOUR_MS)
    await engine.ingestor.apply(batch(2, event("e2", "P9", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + 1)))
    assert 0 < await redis.pttl(key) <= HOUR_MS
    # ...and the first write of the next UTC day pushes it back by the whole idle retention.
    clock.set_ms(T0_MS + DAY_MS)
    await engine.ingestor.apply(batch(3, event("e3", "P9", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + 2)))
    assert idle_ms - MIN_MS < await redis.pttl(key) <= idle_ms
    assert (await state_of(redis, "P9")).idle_ttl_day == (T0_MS + DAY_MS) // DAY_MS


async def test_due_set_moves_only_for_parcels_that_passed_their_check(
    redis: Redis, clock: ManualClock
) -> None:
    """The apply script makes a shard's due-set moves together at the end (in slices of a few thousand
    values): a conflicting parcel's moves are left out, the others' all made."""
    store = engine_for(redis, clock).store
    a, b = [pid for pid in (f"Q{n}" for n in range(100)) if store.shard(pid) == 0][:2]
    due = keys.due(0)
    await redis.zadd(due, {f"{a}:OLD": 1, f"{b}:OLD": 1})

    def change(pid: str, expected_version: int, adds: int) -> ParcelChange:
        moved = ParcelChange(expected_version=expected_version, ttl_ms=0, sets=[b"v", b"1"])
        for n in range(adds):
            moved.adds += [str(n).encode(), f"{pid}:NEW{n}".encode()]
        moved.rems.append(f"{pid}:OLD".encode())
        return moved

    # ``a`` expects version 7 but is new (0): a conflict. ``b``'s 3,000 adds take two ZADD slices.
    conflicts = await store.write({a: (0, change(a, 7, 1)), b: (0, change(b, 0, 3000))})
    assert conflicts == {a}
    assert await redis.zscore(due, f"{a}:OLD") == 1
    assert await redis.zscore(due, f"{a}:NEW0") is None
    assert await redis.zscore(due, f"{b}:OLD") is None
    assert await redis.zcard(due) == 1 + 3000
    assert await redis.zscore(due, f"{b}:NEW2999") == 2999


async def test_batch_costs_constant_round_trips(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    trips = []
    for size in (1, 50, 400):
        pids = [f"RT{size}-{i}" for i in range(size)]
        await register(engine, *(registration(pid) for pid in pids))
        before = engine.store.round_trips
        info_before = await redis.info("commandstats")
        events = [event(f"{pid}-e", pid, T.TRACKING_STATUS_IN_TRANSIT, T0_MS, slot=SLOT) for pid in pids]
        ack = await engine.ingestor.apply(batch(size, *events))
        assert ack.accepted == size
        trips.append(engine.store.round_trips - before)
        info_after = await redis.info("commandstats")
        evalsha = info_after["cmdstat_evalsha"]["calls"] - info_before["cmdstat_evalsha"]["calls"]
        # One read and one apply call per shard, plus the alert monitor's one call per shard; never per event.
        assert evalsha <= 3 * SETTINGS.shards
    assert trips == [3, 3, 3]  # read parcels, read preferences, write


async def test_replan_and_erase_recipient(redis: Redis, clock: ManualClock) -> None:
    engine = engine_for(redis, clock)
    await register(
        engine, registration("P9", recipient_id="acme/r3"), registration("P10", recipient_id="acme/r3")
    )
    for pid in ("P9", "P10"):
        await engine.ingestor.apply(
            batch(1, event(f"{pid}e", pid, T.TRACKING_STATUS_IN_TRANSIT, T0_MS, slot=SLOT))
        )
    muted = preferences_pb2.RecipientPreferences(recipient_id="acme/r3", muted_kinds=[T.NOTICE_KIND_SHIPPED])
    await put_preferences(redis, muted)
    assert await engine.replanner.replan_recipient("acme/r3") == 4  # two notices pending per parcel
    assert set(await due_members(redis, "P9")) == {"P9:SLOT_ANNOUNCED"}
    assert await engine.replanner.cancel_recipient_notices("acme/r3") == 2
    assert await due_members(redis, "P9") == {}
    assert await due_members(redis, "P10") == {}
    state = await state_of(redis, "P10")
    assert state.recipient_erased
    # Nothing more is planned for them until they set preferences again.
    await redis.delete(keys.preferences(keys.shard_of("acme/r3", SETTINGS.shards), "acme/r3"))
    await engine.ingestor.apply(batch(2, event("P10f", "P10", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS + 1)))
    assert await due_members(redis, "P10") == {}


async def test_settings_are_used(redis: Redis, clock: ManualClock) -> None:
    engine_settings = replace(SETTINGS.engine, correction_debounce_s=600)
    engine = engine_for(redis, clock, replace(SETTINGS, engine=engine_settings))
    assert engine.store.rules.debounce_ms == 600_000


async def test_conflict_retry_plans_with_the_preferences_of_its_own_attempt(
    redis: Redis, clock: ManualClock
) -> None:
    """Another engine process mutes a kind and re-plans the recipient's parcels between this one's
    read of preferences and its write: the write conflicts, and the retry plans with the new
    preferences, not those of the attempt that conflicted (the other process's re-plan already ran,
    so nothing would catch the muted notice later)."""
    ingesting, serving = engine_for(redis, clock), engine_for(redis, clock)
    plain = preferences_pb2.RecipientPreferences(recipient_id="acme/r1", time_zone="UTC")
    await put_preferences(redis, plain)
    await register(ingesting, registration("P1"))
    await ingesting.ingestor.apply(batch(1, event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)))
    read_preferences = ingesting.store.audiences
    reads = 0

    async def then_muted_elsewhere(recipient_ids: Iterable[str]) -> dict[str, Audience | None]:
        nonlocal reads
        reads += 1
        found = await read_preferences(recipient_ids)
        if reads == 1:
            muted = preferences_pb2.RecipientPreferences(
                recipient_id="acme/r1", time_zone="UTC", muted_kinds=[T.NOTICE_KIND_SLOT_ANNOUNCED]
            )
            await put_preferences(redis, muted)
            await serving.replanner.replan_recipient("acme/r1")
        return found

    ingesting.store.audiences = then_muted_elsewhere  # type: ignore[method-assign]
    clock.advance_ms(MIN_MS)
    out = event("e2", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + MIN_MS, slot=SLOT)
    assert (await ingesting.ingestor.apply(batch(2, out))).accepted == 1
    assert reads == 2  # the first attempt conflicted with the other process's re-plan
    assert "P1:SLOT_ANNOUNCED" not in await due_members(redis, "P1")
    marks = {m.kind: m for m in (await state_of(redis, "P1")).notices}
    assert marks[T.NOTICE_KIND_SLOT_ANNOUNCED].status == notice_pb2.NOTICE_STATUS_SUPPRESSED


async def test_a_carrier_cannot_change_another_carriers_parcel(redis: Redis, clock: ManualClock) -> None:
    """Tracking numbers are unique per carrier only: a carrier's key posting for a parcel another
    carrier carries is refused by index (the rest of its batch applies), while an operator's feed may
    bring a hand-over between carriers."""
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))  # carried by swisspost
    await engine.ingestor.apply(batch(1, event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)))
    foreign = event("x1", "P1", T.TRACKING_STATUS_DELIVERED, T0_MS + MIN_MS)
    foreign.carrier = "dhl-de"
    own = event("x2", "Q1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS + MIN_MS)
    own.carrier = "dhl-de"
    invalid = event("x3", "P1", T.TRACKING_STATUS_UNSPECIFIED, T0_MS + MIN_MS)
    invalid.carrier = "dhl-de"
    token = bind_principal(Principal.parse("carrier:dhl-de"))
    try:
        ack = await engine.ingestor.apply(batch(2, foreign, own, invalid))
    finally:
        unbind_principal(token)
    assert ack.accepted == 1
    # Each rejected once, with its first reason: the invalid one is not also another carrier's.
    assert [(r.index, r.code, r.field, r.event_id) for r in ack.rejected] == [
        (0, tracking_pb2.REJECT_CODE_PERMISSION_DENIED, "parcel_id", "x1"),
        (2, tracking_pb2.REJECT_CODE_INVALID_ARGUMENT, "status", "x3"),
    ]
    assert (await state_of(redis, "P1")).status == T.TRACKING_STATUS_IN_TRANSIT
    assert (await state_of(redis, "Q1")).carrier == "dhl-de"  # a parcel nobody carried yet is its own
    token = bind_principal(Principal.parse("operator"))
    try:
        assert (await engine.ingestor.apply(batch(3, foreign))).accepted == 1
    finally:
        unbind_principal(token)
    state = await state_of(redis, "P1")
    assert state.status == T.TRACKING_STATUS_DELIVERED
    assert [e.event.carrier for e in state.timeline] == ["", "dhl-de"]  # "": the parcel's own


async def test_registration_names_the_carrier_of_a_parcel_another_carrier_scanned(
    redis: Redis, clock: ManualClock
) -> None:
    """The merchant's carrier is the parcel's from registration on; the events scanned before it keep
    naming the carrier that sent them."""
    engine = engine_for(redis, clock)
    scan = event("e1", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS)
    scan.carrier = "dhl-de"
    await engine.ingestor.apply(batch(1, scan))
    assert (await register(engine, registration("P1"))).registered == 1
    view = await engine.parcels.get_parcel("P1")
    assert view is not None
    assert view.carrier == "swisspost"
    assert [e.event.carrier for e in view.timeline] == ["dhl-de"]
    await engine.ingestor.apply(batch(2, event("e2", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + 1)))
    view = await engine.parcels.get_parcel("P1")
    assert view is not None
    assert [e.event.carrier for e in view.timeline] == ["dhl-de", "swisspost"]


async def test_a_parcels_timeline_keeps_its_first_and_latest_events(redis: Redis, clock: ManualClock) -> None:
    """A feed looping on one parcel does not grow it without bound: the timeline keeps the first event
    and the latest ones, and the status follows the latest."""
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))
    extra = 25
    events = [
        event(f"e{n}", "P1", T.TRACKING_STATUS_IN_TRANSIT, T0_MS - DAY_MS + n * MIN_MS)
        for n in range(MAX_TIMELINE_EVENTS + extra)
    ]
    events[-1].status = T.TRACKING_STATUS_OUT_FOR_DELIVERY
    ack = await engine.ingestor.apply(batch(1, *events[:100]))
    ack2 = await engine.ingestor.apply(batch(2, *events[100:]))
    assert ack.accepted + ack2.accepted == MAX_TIMELINE_EVENTS + extra
    state = await state_of(redis, "P1")
    kept = [entry.event.event_id for entry in state.timeline]
    assert kept == ["e0", *(f"e{n}" for n in range(extra + 1, MAX_TIMELINE_EVENTS + extra))]
    assert state.status == T.TRACKING_STATUS_OUT_FOR_DELIVERY


async def test_a_new_recipient_gets_the_slot_announced_not_corrected(
    redis: Redis, clock: ManualClock
) -> None:
    """The merchant corrects the recipient after the slot went out to the first one: the new one gets
    the slot announced (under a new version: the first announcement's key is spent), and a later
    move before it went out replaces it, never a correction naming a slot they were not told."""
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))
    await engine.ingestor.apply(
        batch(1, event("e1", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS, slot=SLOT))
    )
    await claim_and_send(redis, "P1", "SLOT_ANNOUNCED", clock)  # went out to acme/r1
    clock.advance_ms(MIN_MS)
    await register(engine, registration("P1", recipient_id="acme/r2"))
    announced = await notice_body(redis, "P1", "SLOT_ANNOUNCED")
    assert announced is not None
    assert (announced.recipient_id, announced.version) == ("acme/r2", 2)
    assert "P1:SLOT_ANNOUNCED" in await due_members(redis, "P1")

    clock.advance_ms(MIN_MS)
    moved = (SLOT[0] + 3 * HOUR_MS, SLOT[1] + 3 * HOUR_MS)
    out = event("e2", "P1", T.TRACKING_STATUS_OUT_FOR_DELIVERY, T0_MS + 2 * MIN_MS, slot=moved)
    await engine.ingestor.apply(batch(2, out))
    assert set(await due_members(redis, "P1")) >= {"P1:SLOT_ANNOUNCED"}
    assert "P1:SLOT_CORRECTED" not in await due_members(redis, "P1")
    announced = await notice_body(redis, "P1", "SLOT_ANNOUNCED")
    assert announced is not None
    assert (announced.recipient_id, announced.version) == ("acme/r2", 3)
    assert window_ms(announced.slot) == moved


async def test_a_new_recipient_is_told_what_still_holds_and_not_silenced_by_an_erasure(
    redis: Redis, clock: ManualClock
) -> None:
    """The merchant corrects the recipient after the first was told the parcel waits at a pickup point
    and then erased their data: the new one is told where to collect it, with its reminder."""
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))
    deadline_ms = T0_MS + 5 * DAY_MS
    waiting = event("e1", "P1", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("PP1", deadline_ms))
    await engine.ingestor.apply(batch(1, waiting))
    await claim(redis, "P1", "AVAILABLE_FOR_PICKUP")  # went out to acme/r1
    await engine.replanner.cancel_recipient_notices("acme/r1")  # acme/r1 erased
    assert await due_members(redis, "P1") == {}

    clock.advance_ms(MIN_MS)
    await register(engine, registration("P1", recipient_id="acme/r2"))
    assert set(await due_members(redis, "P1")) == {"P1:AVAILABLE_FOR_PICKUP", "P1:PICKUP_REMINDER"}
    told = await notice_body(redis, "P1", "AVAILABLE_FOR_PICKUP")
    assert told is not None
    assert (told.recipient_id, told.version) == ("acme/r2", 2)


async def test_a_new_recipient_is_told_of_a_failed_attempt_cancelled_by_an_erasure(
    redis: Redis, clock: ManualClock
) -> None:
    """The old recipient's notice of a failed attempt was still pending when their data was erased:
    the corrected recipient is told, since the parcel still waits for a new delivery."""
    engine = engine_for(redis, clock)
    await register(engine, registration("P1"))
    absent = T.EXCEPTION_REASON_RECIPIENT_ABSENT
    await engine.ingestor.apply(
        batch(1, event("e1", "P1", T.TRACKING_STATUS_ATTEMPT_FAIL, T0_MS, reason=absent))
    )
    assert "P1:ATTEMPT_FAILED" in await due_members(redis, "P1")
    await engine.replanner.cancel_recipient_notices("acme/r1")
    assert await due_members(redis, "P1") == {}
    clock.advance_ms(MIN_MS)
    await register(engine, registration("P1", recipient_id="acme/r2"))
    assert "P1:ATTEMPT_FAILED" in await due_members(redis, "P1")
    told = await notice_body(redis, "P1", "ATTEMPT_FAILED")
    assert told is not None
    assert (told.recipient_id, told.version) == ("acme/r2", 2)
