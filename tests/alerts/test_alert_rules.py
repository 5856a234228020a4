"""The alert rules as pure functions: each fires at its threshold and not a millisecond before, falls
quiet when the parcel moves on, and names the next time a check is needed."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from relais.v1 import alerts_pb2, types_pb2

from engine.alert_rules import (
    DAY_MS,
    HOUR_MS,
    AlertConfigError,
    DestinationKind,
    ParcelFacts,
    Thresholds,
    day_end_ms,
    evaluate,
    load_alert_config,
    parse_alert_config,
)
from tests.alerts.support import parcel_facts
from tests.conftest import T0_MS

TH = Thresholds()
S = types_pb2


def facts(status: int = S.TRACKING_STATUS_IN_TRANSIT, **kw: object) -> ParcelFacts:
    return parcel_facts("PX1", status, **kw)


def firing(f: ParcelFacts, now_ms: int, th: Thresholds = TH) -> set[int]:
    return {finding.kind for finding in evaluate(f, now_ms, th).firing}


def test_never_scanned_fires_at_48_hours_and_not_before() -> None:
    f = facts(S.TRACKING_STATUS_INFO_RECEIVED, first_scan_ms=None, last_event_ms=T0_MS)
    due = T0_MS + 48 * HOUR_MS
    before = evaluate(f, due - 1, TH)
    assert alerts_pb2.ALERT_KIND_NEVER_SCANNED in before.quiet
    assert before.next_check_ms == due
    at = evaluate(f, due, TH)
    assert [x.kind for x in at.firing] == [alerts_pb2.ALERT_KIND_NEVER_SCANNED]
    assert at.firing[0].summary == "No carrier scan 48 h after the label was created"
    # Registered but no event at all counts too.
    registered_only = facts(S.TRACKING_STATUS_UNSPECIFIED, first_scan_ms=None, last_event_ms=None)
    assert firing(registered_only, due) == {alerts_pb2.ALERT_KIND_NEVER_SCANNED}


def test_never_scanned_falls_quiet_on_first_scan() -> None:
    f = facts(
        S.TRACKING_STATUS_IN_TRANSIT, first_scan_ms=T0_MS + 50 * HOUR_MS, last_event_ms=T0_MS + 50 * HOUR_MS
    )
    ev = evaluate(f, T0_MS + 50 * HOUR_MS, TH)
    assert alerts_pb2.ALERT_KIND_NEVER_SCANNED in ev.quiet


def test_no_movement_fires_after_three_days_without_event() -> None:
    last = T0_MS + 5 * HOUR_MS
    f = facts(last_event_ms=last, last_facility="Zurich-Mülligen")
    ev = evaluate(f, last + 3 * DAY_MS - 1, TH)
    assert not ev.firing
    assert ev.next_check_ms == last + 3 * DAY_MS
    ev = evaluate(f, last + 3 * DAY_MS, TH)
    assert [(x.kind, x.summary) for x in ev.firing] == [
        (alerts_pb2.ALERT_KIND_NO_MOVEMENT, "No scan for 3 days since Zurich-Mülligen")
    ]
    # A newer scan moves the threshold: quiet again.
    moved = facts(last_event_ms=last + 3 * DAY_MS)
    assert alerts_pb2.ALERT_KIND_NO_MOVEMENT in evaluate(moved, last + 3 * DAY_MS, TH).quiet
    # Not in transit (delivered): no movement is expected.
    done = facts(S.TRACKING_STATUS_DELIVERED, last_event_ms=last)
    assert firing(done, last + 10 * DAY_MS) == set()


def test_address_problem_fires_at_once_for_exception_or_failed_attempt() -> None:
    reason = S.EXCEPTION_REASON_ADDRESS_PROBLEM
    for status, summary in [
        (S.TRACKING_STATUS_EXCEPTION, "Exception: address problem"),
        (S.TRACKING_STATUS_ATTEMPT_FAIL, "Delivery attempt failed: address problem"),
    ]:
        ev = evaluate(facts(status, exception_reason=reason), T0_MS, TH)
        assert [(x.kind, x.summary) for x in ev.firing] == [(alerts_pb2.ALERT_KIND_ADDRESS_PROBLEM, summary)]
    absent = facts(S.TRACKING_STATUS_ATTEMPT_FAIL, exception_reason=S.EXCEPTION_REASON_RECIPIENT_ABSENT)
    assert firing(absent, T0_MS) == set()


def test_waiting_at_pickup_fires_after_wait_or_near_deadline() -> None:
    since = T0_MS
    far_deadline = since + 30 * DAY_MS
    f = facts(S.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup_since_ms=since, pickup_deadline_ms=far_deadline)
    assert evaluate(f, since + 5 * DAY_MS - 1, TH).next_check_ms == since + 5 * DAY_MS
    assert firing(f, since + 5 * DAY_MS - 1) == set()
    assert firing(f, since + 5 * DAY_MS) == {alerts_pb2.ALERT_KIND_WAITING_AT_PICKUP}
    # A deadline three days out: the alert is due two days before it, earlier than the five days.
    near = facts(
        S.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, pickup_since_ms=since, pickup_deadline_ms=since + 3 * DAY_MS
    )
    assert evaluate(near, since, TH).next_check_ms == since + DAY_MS
    assert firing(near, since + DAY_MS - 1) == set()
    ev = evaluate(near, since + DAY_MS, TH)
    assert (
        ev.firing[0].summary
        == "Waiting at the pickup point for 24 h, to be collected by 2026-03-13 09:00 UTC"
    )
    collected = facts(
        S.TRACKING_STATUS_DELIVERED, pickup_since_ms=since, pickup_deadline_ms=since + 3 * DAY_MS
    )
    assert alerts_pb2.ALERT_KIND_WAITING_AT_PICKUP in evaluate(collected, since + 2 * DAY_MS, TH).quiet


def test_returned_fires_while_returning_or_returned() -> None:
    assert firing(facts(S.TRACKING_STATUS_RETURNING_TO_SENDER), T0_MS) == {alerts_pb2.ALERT_KIND_RETURNED}
    assert firing(facts(S.TRACKING_STATUS_RETURNED_TO_SENDER), T0_MS) == {alerts_pb2.ALERT_KIND_RETURNED}


def test_late_fires_when_the_promised_day_is_over() -> None:
    promised = date(2026, 3, 11)
    end = day_end_ms(promised)
    assert end == T0_MS + 39 * HOUR_MS  # 2026-03-12 00:00 UTC
    f = facts(promised_date=promised, last_event_ms=end - HOUR_MS)
    ev = evaluate(f, end - 1, TH)
    assert alerts_pb2.ALERT_KIND_LATE in ev.quiet
    assert ev.next_check_ms == end
    ev = evaluate(f, end, TH)
    assert [(x.kind, x.summary) for x in ev.firing] == [
        (alerts_pb2.ALERT_KIND_LATE, "Promised for 2026-03-11, not delivered")
    ]
    delivered = facts(S.TRACKING_STATUS_DELIVERED, promised_date=promised)
    assert firing(delivered, end + DAY_MS) == set()
    graced = Thresholds(late_grace_ms=6 * HOUR_MS)
    assert firing(f, end + 6 * HOUR_MS - 1, graced) == set()
    assert firing(f, end + 6 * HOUR_MS, graced) == {alerts_pb2.ALERT_KIND_LATE}


def test_next_check_is_the_earliest_pending_rule() -> None:
    f = facts(promised_date=date(2026, 3, 10), last_event_ms=T0_MS)
    ev = evaluate(f, T0_MS, TH)
    assert ev.next_check_ms == day_end_ms(date(2026, 3, 10))  # before no-movement's 3 days
    done = facts(S.TRACKING_STATUS_DELIVERED)
    assert evaluate(done, T0_MS, TH).next_check_ms is None


def test_config_file_overrides_per_merchant(tmp_path: Path) -> None:
    path = tmp_path / "alerts.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {"never_scanned_h": 24},
                "merchants": {
                    "acme": {
                        "thresholds": {"no_movement_h": 120},
                        "teams": {
                            "logistics": {"webhook": "https://hooks.acme.example/relais"},
                            "customer_service": {"email": "service@acme.example"},
                        },
                    }
                },
            }
        )
    )
    config = load_alert_config(path)
    assert config.thresholds_for("other") == Thresholds(never_scanned_ms=24 * HOUR_MS)
    assert config.thresholds_for("acme") == Thresholds(
        never_scanned_ms=24 * HOUR_MS, no_movement_ms=5 * DAY_MS
    )
    dest = config.destination("acme", alerts_pb2.TEAM_LOGISTICS)
    assert dest is not None
    assert dest.kind is DestinationKind.WEBHOOK
    assert config.destination("acme", alerts_pb2.TEAM_ECOMMERCE) is None
    assert load_alert_config(None).thresholds_for("acme") == Thresholds()


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"defaults": {"no_movment_h": 1}}, "defaults.no_movment_h"),
        ({"defaults": {"no_movement_h": -1}}, "defaults.no_movement_h"),
        ({"defaults": {"no_movement_h": 0}}, "no_movement_ms"),
        ({"merchants": {"m": {"teams": {"sales": {"email": "a@b"}}}}}, "merchants.m.teams.sales"),
        ({"merchants": {"m": {"teams": {"logistics": {"fax": "1"}}}}}, "merchants.m.teams.logistics.fax"),
        ({"merchants": {"m": {"teams": {"logistics": {"webhook": "ftp://x"}}}}}, "logistics.webhook"),
    ],
)
def test_config_errors_name_the_place(raw: dict[str, object], names: str) -> None:
    with pytest.raises(AlertConfigError, match=names.replace(".", r"\.")):
        parse_alert_config(raw)
