"""The alert rules as pure functions: a parcel's facts, the time and the thresholds in, the rules that
fire, the rules that are quiet and the next time a quiet rule could fire out. No Redis, no clock.

A rule *fires* while its condition holds; the store opens an alert when a rule starts firing (at most
one open per parcel and rule) and resolves it when the rule falls quiet, i.e. when the parcel moved
on (a scan arrived, it was collected or delivered). Rules that fire with the mere passing of time
give the time at which they would, so the engine schedules one check timer per parcel instead of
scanning all parcels.

Per-merchant thresholds and each team's digest destination come from a JSON file
(``RELAIS_ALERTS_CONFIG``)::

    {
      "defaults": {"never_scanned_h": 48, "no_movement_h": 72, "pickup_wait_h": 120,
                   "pickup_deadline_lead_h": 48, "late_grace_h": 0},
      "merchants": {
        "acme": {
          "thresholds": {"no_movement_h": 120},
          "teams": {"logistics": {"webhook": "https://hooks.acme.example/relais"},
                    "customer_service": {"email": "service@acme.example"}}
        }
      }
    }

Every key is optional; a merchant's thresholds override the defaults field by field.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from relais.v1 import alerts_pb2, types_pb2

AlertKind: TypeAlias = alerts_pb2.AlertKind.ValueType
Team: TypeAlias = alerts_pb2.Team.ValueType
Status: TypeAlias = types_pb2.TrackingStatus.ValueType

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

TEAM_OF: Mapping[AlertKind, Team] = {
    alerts_pb2.ALERT_KIND_NEVER_SCANNED: alerts_pb2.TEAM_LOGISTICS,
    alerts_pb2.ALERT_KIND_NO_MOVEMENT: alerts_pb2.TEAM_LOGISTICS,
    alerts_pb2.ALERT_KIND_ADDRESS_PROBLEM: alerts_pb2.TEAM_CUSTOMER_SERVICE,
    alerts_pb2.ALERT_KIND_WAITING_AT_PICKUP: alerts_pb2.TEAM_CUSTOMER_SERVICE,
    alerts_pb2.ALERT_KIND_RETURNED: alerts_pb2.TEAM_ECOMMERCE,
    alerts_pb2.ALERT_KIND_LATE: alerts_pb2.TEAM_CUSTOMER_SERVICE,
}
ALL_KINDS: tuple[AlertKind, ...] = tuple(TEAM_OF)

# "In transit" for the no-movement rule: the parcel is in the carrier's hands and should be moving.
MOVING = frozenset({types_pb2.TRACKING_STATUS_IN_TRANSIT, types_pb2.TRACKING_STATUS_OUT_FOR_DELIVERY})
NOT_YET_SCANNED = frozenset({types_pb2.TRACKING_STATUS_UNSPECIFIED, types_pb2.TRACKING_STATUS_INFO_RECEIVED})
RETURNING = frozenset(
    {types_pb2.TRACKING_STATUS_RETURNING_TO_SENDER, types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER}
)
# Once here, a parcel can no longer be late: it arrived (delivered or waiting to be collected) or the
# promise no longer applies (on its way back, tracking expired).
ARRIVED_OR_OVER = frozenset(
    {
        types_pb2.TRACKING_STATUS_DELIVERED,
        types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP,
        types_pb2.TRACKING_STATUS_EXPIRED,
        *RETURNING,
    }
)
TROUBLE = frozenset({types_pb2.TRACKING_STATUS_EXCEPTION, types_pb2.TRACKING_STATUS_ATTEMPT_FAIL})


def kind_name(kind: AlertKind) -> str:
    """``ALERT_KIND_NO_MOVEMENT`` -> ``NO_MOVEMENT``: the form used in alert ids and Redis keys."""
    return alerts_pb2.AlertKind.Name(kind).removeprefix("ALERT_KIND_")


def kind_from_name(name: str) -> AlertKind | None:
    try:
        return alerts_pb2.AlertKind.Value("ALERT_KIND_" + name)
    except ValueError:
        return None


def team_name(team: Team) -> str:
    return alerts_pb2.Team.Name(team).removeprefix("TEAM_")


# Not frozen: one is built per parcel of every batch, and a frozen dataclass of this size takes ~4x as
# long to build (each field set through ``object.__setattr__``). Nothing changes one once built.
@dataclass(slots=True)
class ParcelFacts:
    """What the rules need to know of a parcel. Times are unix ms of the carrier's ``occurred_at``
    (``created_ms`` is relais' own). ``engine.facts.facts_from_state`` maps the engine's state."""

    parcel_id: str
    merchant_id: str
    # Status of the latest event by occurred_at; UNSPECIFIED while no event arrived.
    status: Status
    exception_reason: types_pb2.ExceptionReason.ValueType = types_pb2.EXCEPTION_REASON_UNSPECIFIED
    # When relais first heard of the parcel (registration or first event): the never-scanned clock.
    created_ms: int = 0
    # The first carrier scan (any event past INFO_RECEIVED); None while never scanned.
    first_scan_ms: int | None = None
    last_event_ms: int | None = None
    # Where the latest scan happened (a facility name, business data), for the summary.
    last_facility: str = ""
    # Since when it waits at the pickup point, and until when it can be collected.
    pickup_since_ms: int | None = None
    pickup_deadline_ms: int | None = None
    promised_date: date | None = None
    # For the daily counters: the first scan (a label alone, INFO_RECEIVED, is not shipped: the
    # SHIPPED notice waits for a scan too), the delivery, every failed attempt and every exception
    # but those repeating the one before (event id, reason, occurred ms).
    shipped_ms: int | None = None
    delivered_ms: int | None = None
    trouble_events: tuple[TroubleEvent, ...] = ()


@dataclass(frozen=True)
class TroubleEvent:
    event_id: str
    reason: types_pb2.ExceptionReason.ValueType
    occurred_ms: int


@dataclass(frozen=True)
class Thresholds:
    never_scanned_ms: int = 48 * HOUR_MS
    no_movement_ms: int = 3 * DAY_MS
    # Waiting at a pickup point: alert after this long, or this long before its deadline.
    pickup_wait_ms: int = 5 * DAY_MS
    pickup_deadline_lead_ms: int = 2 * DAY_MS
    # Late: the promised day (UTC) is over by this much.
    late_grace_ms: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0 or (value == 0 and f.name != "late_grace_ms"):
                raise ValueError(f"threshold {f.name}={value!r} must be a positive number of milliseconds")


@dataclass(frozen=True)
class Finding:
    """A rule whose condition holds now."""

    kind: AlertKind
    summary: str


@dataclass(slots=True)  # one per parcel of every batch: see ParcelFacts
class Evaluation:
    firing: tuple[Finding, ...]
    quiet: frozenset[AlertKind]
    # Earliest time a quiet rule would fire if nothing else happens; None: no timer needed.
    next_check_ms: int | None


@dataclass(slots=True)  # see ParcelFacts
class _Outcome:
    firing: bool
    summary: str = ""
    due_ms: int | None = None


# A rule that does not apply and needs no timer: one shared outcome, not one per parcel per rule.
_NOTHING = _Outcome(False)


def _duration(ms: int) -> str:
    hours = ms // HOUR_MS
    if hours < 72:
        return f"{hours} h"
    return f"{hours // 24} days"


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _never_scanned(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.first_scan_ms is not None or f.status not in NOT_YET_SCANNED:
        return _NOTHING
    due_ms = f.created_ms + th.never_scanned_ms
    if now_ms < due_ms:
        return _Outcome(False, due_ms=due_ms)
    return _Outcome(True, f"No carrier scan {_duration(now_ms - f.created_ms)} after the label was created")


def _no_movement(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.status not in MOVING or f.last_event_ms is None:
        return _NOTHING
    due_ms = f.last_event_ms + th.no_movement_ms
    if now_ms < due_ms:
        return _Outcome(False, due_ms=due_ms)
    where = f" since {f.last_facility}" if f.last_facility else ""
    return _Outcome(True, f"No scan for {_duration(now_ms - f.last_event_ms)}{where}")


def _address_problem(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.status not in TROUBLE or f.exception_reason != types_pb2.EXCEPTION_REASON_ADDRESS_PROBLEM:
        return _NOTHING
    what = "Delivery attempt failed" if f.status == types_pb2.TRACKING_STATUS_ATTEMPT_FAIL else "Exception"
    return _Outcome(True, f"{what}: address problem")


def _waiting_at_pickup(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.status != types_pb2.TRACKING_STATUS_AVAILABLE_FOR_PICKUP:
        return _NOTHING
    since_ms = f.pickup_since_ms if f.pickup_since_ms is not None else f.last_event_ms
    candidates = []
    if since_ms is not None:
        candidates.append(since_ms + th.pickup_wait_ms)
    if f.pickup_deadline_ms is not None:
        candidates.append(f.pickup_deadline_ms - th.pickup_deadline_lead_ms)
    if not candidates:
        return _NOTHING
    due_ms = min(candidates)
    if now_ms < due_ms:
        return _Outcome(False, due_ms=due_ms)
    parts = []
    if since_ms is not None:
        parts.append(f"Waiting at the pickup point for {_duration(max(0, now_ms - since_ms))}")
    if f.pickup_deadline_ms is not None:
        parts.append(f"to be collected by {_day(f.pickup_deadline_ms)}")
    return _Outcome(True, ", ".join(parts))


def _returned(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.status == types_pb2.TRACKING_STATUS_RETURNING_TO_SENDER:
        return _Outcome(True, "Returning to the sender")
    if f.status == types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER:
        return _Outcome(True, "Returned to the sender")
    return _NOTHING


@functools.lru_cache(maxsize=1024)
def day_end_ms(day: date) -> int:
    """The first instant after ``day`` (UTC)."""
    return int(datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC).timestamp() * 1000)


def _late(f: ParcelFacts, now_ms: int, th: Thresholds) -> _Outcome:
    if f.promised_date is None or f.status in ARRIVED_OR_OVER:
        return _NOTHING
    due_ms = day_end_ms(f.promised_date) + th.late_grace_ms
    if now_ms < due_ms:
        return _Outcome(False, due_ms=due_ms)
    return _Outcome(True, f"Promised for {f.promised_date.isoformat()}, not delivered")


_RULES: Mapping[AlertKind, Callable[[ParcelFacts, int, Thresholds], _Outcome]] = {
    alerts_pb2.ALERT_KIND_NEVER_SCANNED: _never_scanned,
    alerts_pb2.ALERT_KIND_NO_MOVEMENT: _no_movement,
    alerts_pb2.ALERT_KIND_ADDRESS_PROBLEM: _address_problem,
    alerts_pb2.ALERT_KIND_WAITING_AT_PICKUP: _waiting_at_pickup,
    alerts_pb2.ALERT_KIND_RETURNED: _returned,
    alerts_pb2.ALERT_KIND_LATE: _late,
}


# Every rule quiet: most parcels, most of the time (one set shared, not one built per parcel).
_ALL_QUIET: frozenset[AlertKind] = frozenset(_RULES)


def evaluate(facts: ParcelFacts, now_ms: int, thresholds: Thresholds) -> Evaluation:
    """Every rule on one parcel."""
    firing: list[Finding] = []
    due: int | None = None
    for kind, rule in _RULES.items():
        outcome = rule(facts, now_ms, thresholds)
        if outcome.firing:
            firing.append(Finding(kind, outcome.summary))
        elif outcome.due_ms is not None and (due is None or outcome.due_ms < due):
            due = outcome.due_ms
    if not firing:
        return Evaluation((), _ALL_QUIET, due)
    fired = {finding.kind for finding in firing}
    return Evaluation(tuple(firing), _ALL_QUIET - fired, due)


# --- configuration ---------------------------------------------------------------------------------


class DestinationKind(enum.Enum):
    WEBHOOK = "webhook"
    EMAIL = "email"


@dataclass(frozen=True)
class TeamDestination:
    """Where a merchant team's digests go: a webhook URL or an email address (business data)."""

    kind: DestinationKind
    address: str


@dataclass(frozen=True)
class AlertConfig:
    defaults: Thresholds = field(default_factory=Thresholds)
    thresholds: Mapping[str, Thresholds] = field(default_factory=dict)
    destinations: Mapping[tuple[str, Team], TeamDestination] = field(default_factory=dict)

    def thresholds_for(self, merchant_id: str) -> Thresholds:
        return self.thresholds.get(merchant_id, self.defaults)

    def destination(self, merchant_id: str, team: Team) -> TeamDestination | None:
        return self.destinations.get((merchant_id, team))


_THRESHOLD_FIELDS = {
    "never_scanned_h": "never_scanned_ms",
    "no_movement_h": "no_movement_ms",
    "pickup_wait_h": "pickup_wait_ms",
    "pickup_deadline_lead_h": "pickup_deadline_lead_ms",
    "late_grace_h": "late_grace_ms",
}
_TEAMS = {
    "logistics": alerts_pb2.TEAM_LOGISTICS,
    "customer_service": alerts_pb2.TEAM_CUSTOMER_SERVICE,
    "ecommerce": alerts_pb2.TEAM_ECOMMERCE,
}


class AlertConfigError(ValueError):
    """The alerts configuration is malformed; the message names the place."""


def _thresholds(base: Thresholds, raw: Any, where: str) -> Thresholds:
    if not isinstance(raw, dict):
        raise AlertConfigError(f"{where} must be an object")
    changes: dict[str, int] = {}
    for name, value in raw.items():
        target = _THRESHOLD_FIELDS.get(name)
        if target is None:
            raise AlertConfigError(
                f"{where}.{name} is not a threshold (known: {', '.join(_THRESHOLD_FIELDS)})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise AlertConfigError(f"{where}.{name}={value!r} must be a number of hours")
        changes[target] = round(value * HOUR_MS)
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise AlertConfigError(f"{where}: {exc}") from None


def _valid_address(kind: DestinationKind, address: str) -> bool:
    if kind is DestinationKind.WEBHOOK:
        return address.startswith(("http://", "https://"))
    return "@" in address and not any(c.isspace() for c in address)


def _destinations(merchant_id: str, raw: Any, where: str) -> dict[tuple[str, Team], TeamDestination]:
    if not isinstance(raw, dict):
        raise AlertConfigError(f"{where} must be an object")
    out: dict[tuple[str, Team], TeamDestination] = {}
    for name, spec in raw.items():
        team = _TEAMS.get(name)
        if team is None:
            raise AlertConfigError(f"{where}.{name} is not a team (known: {', '.join(_TEAMS)})")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise AlertConfigError(f'{where}.{name} must be {{"webhook": url}} or {{"email": address}}')
        ((kind, address),) = spec.items()
        try:
            dest_kind = DestinationKind(kind)
        except ValueError:
            raise AlertConfigError(f"{where}.{name}.{kind} is not webhook or email") from None
        if not isinstance(address, str) or not _valid_address(dest_kind, address):
            raise AlertConfigError(f"{where}.{name}.{kind} is not a valid {kind} address")
        out[(merchant_id, team)] = TeamDestination(dest_kind, address)
    return out


def parse_alert_config(raw: Any) -> AlertConfig:
    if not isinstance(raw, dict):
        raise AlertConfigError("the alerts configuration must be a JSON object")
    defaults = _thresholds(Thresholds(), raw.get("defaults", {}), "defaults")
    merchants = raw.get("merchants", {})
    if not isinstance(merchants, dict):
        raise AlertConfigError("merchants must be an object")
    thresholds: dict[str, Thresholds] = {}
    destinations: dict[tuple[str, Team], TeamDestination] = {}
    for merchant_id, entry in merchants.items():
        where = f"merchants.{merchant_id}"
        if not isinstance(entry, dict):
            raise AlertConfigError(f"{where} must be an object")
        if "thresholds" in entry:
            thresholds[merchant_id] = _thresholds(defaults, entry["thresholds"], where + ".thresholds")
        destinations |= _destinations(merchant_id, entry.get("teams", {}), where + ".teams")
    return AlertConfig(defaults=defaults, thresholds=thresholds, destinations=destinations)


def load_alert_config(path: Path | None) -> AlertConfig:
    """The configuration from ``RELAIS_ALERTS_CONFIG``; defaults and no digests when unset."""
    if path is None:
        return AlertConfig()
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlertConfigError(f"RELAIS_ALERTS_CONFIG={path}: {exc}") from None
    return parse_alert_config(raw)
