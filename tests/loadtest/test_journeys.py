"""The load generator's pure parts: journeys, the fast wire encoding, pacing, budgets and tallies."""

from __future__ import annotations

from collections import Counter

import pytest
from relais.v1 import tracking_pb2, types_pb2

from loadtest.audit import notice_of_key
from loadtest.ingest_client import decode_seq, plan_streams
from loadtest.journeys import STEPS, EventBudget, Group, JourneyFactory, Mix, Shape, split
from loadtest.pacing import Send, StagePlanner, Wait
from loadtest.tally import Tally
from loadtest.wire import encode_stage
from tests.conftest import T0_MS


def _groups(events: int, parcels: int = 50) -> list[Group]:
    factory = JourneyFactory(prefix="T", recipients=10)
    budget = EventBudget(events)
    groups = []
    while (group := budget.take_group(factory, parcels)) is not None:
        groups.append(group)
    return groups


def test_budget_is_exact_and_journeys_are_cut_to_fit() -> None:
    groups = _groups(1001)
    assert sum(len(j.steps) for g in groups for j in g.journeys) == 1001
    assert all(len(g.journeys) <= 50 for g in groups)


def test_same_seed_same_parcels_and_ids_unique() -> None:
    a = [JourneyFactory(prefix="X", recipients=5, seed=3).make() for _ in range(1)]
    b = [JourneyFactory(prefix="X", recipients=5, seed=3).make() for _ in range(1)]
    assert a == b
    factory = JourneyFactory(prefix="X", recipients=5)
    ids = [factory.make().parcel_id for _ in range(500)]
    assert len(set(ids)) == 500


def test_every_shape_starts_with_a_scan_and_ends_delivered() -> None:
    for shape, steps in STEPS.items():
        assert steps[-1].status == types_pb2.TRACKING_STATUS_DELIVERED, shape
        assert steps[0].status != types_pb2.TRACKING_STATUS_INFO_RECEIVED, shape


def test_mix_follows_its_weights() -> None:
    factory = JourneyFactory(prefix="M", recipients=5, mix=Mix(((Shape.PLAIN, 3.0), (Shape.PICKUP, 1.0))))
    shapes = Counter(factory.make().shape for _ in range(4000))
    assert set(shapes) == {Shape.PLAIN, Shape.PICKUP}
    assert 0.70 < shapes[Shape.PLAIN] / 4000 < 0.80


def test_mix_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        Mix(((Shape.PLAIN, -1.0),))


def test_wire_encoding_parses_to_the_built_batch() -> None:
    for group in _groups(600, parcels=40):
        for stage in range(max(len(j.steps) for j in group.journeys)):
            data, count = encode_stage(7, group.journeys, stage, T0_MS)
            built = group.next_batch(7, T0_MS)
            assert tracking_pb2.EventBatch.FromString(data) == built
            assert count == len(built.events)
            assert decode_seq(data) == 7


def test_events_carry_windows_and_pickup_points_where_the_step_says() -> None:
    factory = JourneyFactory(prefix="W", recipients=5, mix=Mix(((Shape.PICKUP, 1.0),)))
    group = EventBudget(100).take_group(factory, 1)
    assert group is not None
    batches = [group.next_batch(n, T0_MS) for n in range(len(group.journeys[0].steps))]
    out = batches[1].events[0]
    assert out.status == types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY
    assert out.delivery_window.start.ToMilliseconds() > T0_MS
    pickup = batches[3].events[0]
    assert pickup.pickup_point.id
    assert pickup.pickup_point.deadline.ToMilliseconds() > T0_MS
    assert all(b.events[0].occurred_at.ToMilliseconds() == T0_MS for b in batches)


def test_streams_keep_each_parcel_on_one_stream_in_order() -> None:
    groups = _groups(800, parcels=30)
    streams = plan_streams(groups, 3, T0_MS)
    assert sum(n for s in streams for _, n in s) == 800
    where: dict[str, int] = {}
    last_stage: dict[str, int] = {}
    for index, stream in enumerate(streams):
        for data, _ in stream:
            for event in tracking_pb2.EventBatch.FromString(data).events:
                assert where.setdefault(event.parcel_id, index) == index
                stage = int(event.event_id.rsplit(":", 1)[1])
                assert stage == last_stage.get(event.parcel_id, -1) + 1
                last_stage[event.parcel_id] = stage


def test_planner_paces_stages_a_gap_apart() -> None:
    factory = JourneyFactory(prefix="P", recipients=5, mix=Mix(((Shape.PLAIN, 1.0),)))
    planner = StagePlanner(factory, EventBudget(9), parcels_per_group=3, gap_s=2.0, max_groups=1)
    first = planner.next(0.0)
    assert isinstance(first, Send)
    assert first.new
    first.group.next_batch(1, T0_MS)
    planner.sent(first.group, 0.0)
    wait = planner.next(0.5)
    assert isinstance(wait, Wait)
    assert wait.seconds == pytest.approx(1.5)
    assert first.planned_s == 0.0
    late = planner.next(3.5)  # the sender was held up 1.5 s: the stage was still due at 2.0
    assert isinstance(late, Send)
    assert late.planned_s == pytest.approx(2.0)
    again = late
    assert not again.new
    assert again.group is first.group
    again.group.next_batch(2, T0_MS)
    planner.sent(again.group, 2.0)
    last = planner.next(4.0)
    assert isinstance(last, Send)
    last.group.next_batch(3, T0_MS)
    planner.sent(last.group, 4.0)
    assert planner.next(10.0) is None


def test_split_spreads_the_rest() -> None:
    assert split(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="fewer than one"):
        split(1, 0)


def test_tally_adds_worker_reports_and_widens_the_span() -> None:
    master, worker = Tally(), Tally(events_accepted=5, first_send_s=10.0, last_ack_s=12.0)
    master.add(worker.take())
    master.add(Tally(events_accepted=3, first_send_s=9.0, last_ack_s=11.0).take())
    assert master.events_accepted == 8
    assert master.event_seconds == pytest.approx(3.0)
    assert master.events_per_s == pytest.approx(8 / 3)
    assert worker.events_accepted == 0
    assert worker.first_send_s == 10.0


def test_notice_of_key_drops_version_channel_and_address_digest() -> None:
    assert notice_of_key("P-1:SHIPPED:1:email") == "P-1:SHIPPED"
    assert notice_of_key("P-1:SLOT_ANNOUNCED:3:push:a1b2c3") == "P-1:SLOT_ANNOUNCED"
