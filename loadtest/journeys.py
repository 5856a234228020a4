"""Synthetic but realistic parcel journeys: what carriers stream and merchants register.

A journey is a fixed sequence of steps for one parcel (label → scans → out for delivery with a window
→ delivered), with a share of moved slots, failed attempts, pickups and address problems. Steps are
pure descriptions; ``to_event`` stamps one with the time it is sent, so a parcel's events always go
out in order and never in the future. Everything is seeded: the same seed gives the same parcels.
"""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from relais.v1 import parcel_pb2, preferences_pb2, tracking_pb2, types_pb2

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

CARRIERS = ("swisspost", "dhl-de", "laposte", "bpost")
FACILITIES = (
    ("Zürich-Mülligen", "Zürich", "8048", "CH"),
    ("Härkingen", "Härkingen", "4624", "CH"),
    ("Leipzig Hub", "Leipzig", "04435", "DE"),
    ("Roissy PIC", "Roissy", "95700", "FR"),
)
LOCALES = ("fr", "de", "it", "en", "fr-CH", "de-CH")


class Shape(enum.Enum):
    """The kinds of journey, each with the steps a carrier reports."""

    PLAIN = "plain"
    SAME_DAY = "same_day"
    SLOT_MOVED = "slot_moved"
    FAILED_ATTEMPT = "failed_attempt"
    PICKUP = "pickup"
    ADDRESS_PROBLEM = "address_problem"


@dataclass(frozen=True, slots=True)
class Step:
    """One carrier event, relative to when it is sent: windows and deadlines as offsets."""

    status: types_pb2.TrackingStatus.ValueType
    substatus: str
    window_start_offset_ms: int | None = None
    window_length_ms: int = 2 * HOUR_MS
    exception_reason: types_pb2.ExceptionReason.ValueType = types_pb2.EXCEPTION_REASON_UNSPECIFIED
    pickup_deadline_offset_ms: int | None = None


_S = types_pb2
_SCAN = Step(_S.TRACKING_STATUS_IN_TRANSIT, "HUB_SCAN")
_OUT = Step(_S.TRACKING_STATUS_OUT_FOR_DELIVERY, "ON_VAN", window_start_offset_ms=2 * HOUR_MS)
# A move of one hour: well over the 15-minute threshold, so a correction if the first went out.
_OUT_MOVED = Step(_S.TRACKING_STATUS_OUT_FOR_DELIVERY, "ETA_UPDATE", window_start_offset_ms=3 * HOUR_MS)
_OUT_NEXT_DAY = Step(_S.TRACKING_STATUS_OUT_FOR_DELIVERY, "ON_VAN", window_start_offset_ms=DAY_MS)
_ABSENT = Step(
    _S.TRACKING_STATUS_ATTEMPT_FAIL, "NOBODY_HOME", exception_reason=_S.EXCEPTION_REASON_RECIPIENT_ABSENT
)
_ADDRESS = Step(
    _S.TRACKING_STATUS_EXCEPTION, "ADDR_UNKNOWN", exception_reason=_S.EXCEPTION_REASON_ADDRESS_PROBLEM
)
_PICKUP = Step(_S.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, "AT_SHOP", pickup_deadline_offset_ms=7 * DAY_MS)
_DELIVERED = Step(_S.TRACKING_STATUS_DELIVERED, "DELIVERED")

# The label itself is the merchant's registration, so journeys start at the first carrier scan:
# every event then moves the recipient's story on (first scan: shipped; window: slot; ...).
STEPS: dict[Shape, tuple[Step, ...]] = {
    Shape.PLAIN: (_SCAN, _OUT, _DELIVERED),
    Shape.SAME_DAY: (_OUT, _DELIVERED),
    Shape.SLOT_MOVED: (_SCAN, _OUT, _OUT_MOVED, _DELIVERED),
    Shape.FAILED_ATTEMPT: (_SCAN, _OUT, _ABSENT, _OUT_NEXT_DAY, _DELIVERED),
    Shape.PICKUP: (_SCAN, _OUT, _ABSENT, _PICKUP, _DELIVERED),
    Shape.ADDRESS_PROBLEM: (_SCAN, _ADDRESS, _SCAN, _OUT, _DELIVERED),
}


@dataclass(frozen=True, slots=True)
class Mix:
    """Shares of each journey shape (weights, need not add up to one)."""

    weights: tuple[tuple[Shape, float], ...] = (
        (Shape.PLAIN, 0.50),
        (Shape.SAME_DAY, 0.10),
        (Shape.SLOT_MOVED, 0.15),
        (Shape.FAILED_ATTEMPT, 0.10),
        (Shape.PICKUP, 0.10),
        (Shape.ADDRESS_PROBLEM, 0.05),
    )

    def __post_init__(self) -> None:
        if not self.weights or any(w < 0 for _, w in self.weights) or sum(w for _, w in self.weights) <= 0:
            raise ValueError("a journey mix needs non-negative weights with a positive sum")

    def pick(self, rng: random.Random) -> Shape:
        shapes, cumulative = _cumulative(self.weights)
        return shapes[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]

    def mean_events(self) -> float:
        total = sum(w for _, w in self.weights)
        return sum(w * len(STEPS[s]) for s, w in self.weights) / total


@functools.cache
def _cumulative(weights: tuple[tuple[Shape, float], ...]) -> tuple[tuple[Shape, ...], tuple[float, ...]]:
    return tuple(s for s, _ in weights), tuple(itertools.accumulate(w for _, w in weights))


@dataclass(frozen=True, slots=True)
class Journey:
    parcel_id: str
    merchant_id: str
    carrier: str
    recipient_id: str
    shape: Shape
    steps: tuple[Step, ...]


@dataclass(slots=True)
class JourneyFactory:
    """Makes journeys for one load generator; ``prefix`` keeps parcel ids unique across processes."""

    prefix: str
    recipients: int
    merchants: int = 50
    mix: Mix = field(default_factory=Mix)
    seed: int = 0
    _rng: random.Random = field(init=False)
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.recipients < 1 or self.merchants < 1:
            raise ValueError("need at least one recipient and one merchant")
        self._rng = random.Random(f"{self.prefix}:{self.seed}")

    def make(self, max_events: int | None = None) -> Journey:
        """The next journey, cut to ``max_events`` steps when an event budget runs out."""
        rng = self._rng
        shape = self.mix.pick(rng)
        steps = STEPS[shape] if max_events is None else STEPS[shape][:max_events]
        parcel_id = f"{self.prefix}-{self._next:09d}"
        self._next += 1
        return Journey(
            parcel_id=parcel_id,
            merchant_id=merchant_id(rng.randrange(self.merchants)),
            carrier=rng.choice(CARRIERS),
            recipient_id=recipient_id(rng.randrange(self.recipients)),
            shape=shape,
            steps=steps,
        )


def recipient_id(n: int) -> str:
    return f"lt-r-{n}"


def merchant_id(n: int) -> str:
    return f"lt-m-{n}"


def _ts(ms: int) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def to_event(journey: Journey, index: int, now_ms: int) -> tracking_pb2.TrackingEvent:
    """The journey's ``index``-th step as the carrier reports it at ``now_ms``."""
    step = journey.steps[index]
    facility, city, postal_code, country = FACILITIES[index % len(FACILITIES)]
    event = tracking_pb2.TrackingEvent(
        event_id=f"{journey.parcel_id}:{index}",
        parcel_id=journey.parcel_id,
        carrier=journey.carrier,
        status=step.status,
        substatus=step.substatus,
        occurred_at=_ts(now_ms),
        location=types_pb2.Location(
            facility=facility, city=city, postal_code=postal_code, country_code=country
        ),
        exception_reason=step.exception_reason,
        description=step.substatus.replace("_", " ").lower(),
    )
    if step.window_start_offset_ms is not None:
        start_ms = now_ms + step.window_start_offset_ms
        event.delivery_window.start.CopyFrom(_ts(start_ms))
        event.delivery_window.end.CopyFrom(_ts(start_ms + step.window_length_ms))
    if step.pickup_deadline_offset_ms is not None:
        event.pickup_point.CopyFrom(
            types_pb2.PickupPoint(
                id=f"PP-{postal_code}",
                name="Kiosk Bahnhof",
                address=types_pb2.Address(
                    lines=["Bahnhofplatz 1"], postal_code="8001", city="Zürich", country_code="CH"
                ),
                deadline=_ts(now_ms + step.pickup_deadline_offset_ms),
                opening_hours="Mo-Fr 08:00-19:00",
            )
        )
    return event


def registration(journey: Journey, promised: types_pb2.LocalDate) -> parcel_pb2.ParcelRegistration:
    """What the merchant's shop registers when it prints the label: paid, so notices may be actionable.
    ``promised`` should lie a few days ahead, so no DELAYED notice falls due during a run."""
    return parcel_pb2.ParcelRegistration(
        parcel_id=journey.parcel_id,
        merchant_id=journey.merchant_id,
        carrier=journey.carrier,
        recipient_id=journey.recipient_id,
        order=parcel_pb2.OrderFacts(
            paid=True,
            declared_value=types_pb2.Money(currency_code="CHF", amount_minor=4990),
            promised_date=promised,
            order_reference=f"ORD-{journey.parcel_id[-9:]}",
        ),
    )


@dataclass(slots=True)
class Group:
    """Parcels a carrier advances together, one step a batch: a stage of a truck's or a hub's work."""

    journeys: list[Journey]
    stage: int = 0
    not_before_s: float = 0.0

    @property
    def done(self) -> bool:
        return all(self.stage >= len(j.steps) for j in self.journeys)

    def next_batch(self, seq: int, now_ms: int) -> tracking_pb2.EventBatch:
        """The events of the current stage (parcels whose journey is over drop out); advances."""
        stage = self.stage
        events = [to_event(j, stage, now_ms) for j in self.journeys if stage < len(j.steps)]
        self.stage += 1
        return tracking_pb2.EventBatch(seq=seq, events=events)


class EventBudget:
    """How many events a load generator may still send; journeys are cut so the total is exact."""

    def __init__(self, events: int) -> None:
        if events < 0:
            raise ValueError("an event budget cannot be negative")
        self.remaining = events

    def take_group(self, factory: JourneyFactory, parcels: int) -> Group | None:
        """Up to ``parcels`` journeys whose events fit in what is left; None once it is spent."""
        journeys: list[Journey] = []
        while len(journeys) < parcels and self.remaining > 0:
            journey = factory.make(max_events=self.remaining)
            self.remaining -= len(journey.steps)
            journeys.append(journey)
        return Group(journeys) if journeys else None


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers allow (the first ones get the rest)."""
    if parts < 1:
        raise ValueError("cannot split over fewer than one part")
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def iter_batches(
    factory: JourneyFactory, events: int, batch_parcels: int, now_ms: int
) -> Iterator[tracking_pb2.EventBatch]:
    """Every batch for ``events`` events, group after group, stage after stage: for benchmarks that
    stream without pauses. Events in one batch belong to distinct parcels."""
    budget = EventBudget(events)
    seq = 0
    while (group := budget.take_group(factory, batch_parcels)) is not None:
        while not group.done:
            seq += 1
            yield group.next_batch(seq, now_ms)


def registrations(
    journeys: Sequence[Journey], promised: types_pb2.LocalDate
) -> parcel_pb2.RegisterParcelsRequest:
    return parcel_pb2.RegisterParcelsRequest(parcels=[registration(j, promised) for j in journeys])


def promised_date(now_ms: int, days_ahead: int = 3) -> types_pb2.LocalDate:
    """The delivery date a shop promises at checkout: a few days after ``now_ms`` (UTC)."""
    day = datetime.fromtimestamp(now_ms / 1000, tz=UTC).date() + timedelta(days=days_ahead)
    return types_pb2.LocalDate(year=day.year, month=day.month, day=day.day)


def preferences_of(n: int, locale: str) -> preferences_pb2.RecipientPreferences:
    """A load-test recipient: email only, no quiet hours, so notices go out when due."""
    return preferences_pb2.RecipientPreferences(
        recipient_id=recipient_id(n),
        locale=locale,
        time_zone="Europe/Zurich",
        email=f"{recipient_id(n)}@example.test",
        channel_order=[types_pb2.CHANNEL_EMAIL],
    )
