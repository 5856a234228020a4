"""Free text of events and registrations: bounded in length, free of control characters, over real
gRPC on loopback and a real Redis.

A bad field rejects only its entry, named by its path, without echoing the value; text that is long
but within the limits, or far from ASCII, is kept as sent.
"""

from __future__ import annotations

import grpc
import pytest
from relais.v1 import tracking_pb2, types_pb2

from engine.state import DAY_MS
from engine.validation import MAX_ADDRESS_LINES, MAX_CODE, MAX_NAME, MAX_OPENING_HOURS
from tests.conftest import T0_MS
from tests.engine import test_services
from tests.engine.core_support import event, registration
from tests.engine.test_input_ranges import Edit, assert_unknown, record, register, reject_one, view

server = test_services.server
channel = test_services.channel

T = types_pb2
ESCAPES = "ok\x00\x1b[2J\x1b]0;pwned\x07"


def _set(path: str, value: str) -> Edit:
    """Sets a text field by its dotted path, the pickup point made a valid one first."""

    def edit(e: tracking_pb2.TrackingEvent) -> None:
        if path.startswith("pickup_point."):
            e.pickup_point.id = "kiosk-1"
            e.pickup_point.deadline.FromMilliseconds(T0_MS + DAY_MS)
        *parents, name = path.split(".")
        message = e
        for parent in parents:
            message = getattr(message, parent)
        setattr(message, name, value)

    return edit


def _lines(*lines: str) -> Edit:
    def edit(e: tracking_pb2.TrackingEvent) -> None:
        e.pickup_point.id = "kiosk-1"
        e.pickup_point.address.lines.extend(lines)

    return edit


BAD_TEXT = [
    pytest.param(_set("location.facility", "F" * 200_000), "location.facility", id="facility-200k"),
    pytest.param(_set("location.facility", "F" * (MAX_NAME + 1)), "location.facility", id="facility-1-over"),
    pytest.param(_set("location.city", "C" * 100_000), "location.city", id="city-100k"),
    pytest.param(
        _set("location.postal_code", "8" * (MAX_CODE + 1)), "location.postal_code", id="postal-code"
    ),
    pytest.param(_set("location.country_code", "CH\r\n"), "location.country_code", id="country-crlf"),
    pytest.param(_set("location.facility", "Hub\u2028Bcc: x"), "location.facility", id="line-separator"),
    pytest.param(_set("location.city", "Z\u009b31m"), "location.city", id="c1-csi"),
    pytest.param(_set("location.city", "Z\x7f"), "location.city", id="del"),
    pytest.param(_set("description", ESCAPES), "description", id="description-escapes"),
    pytest.param(_set("substatus", "\x00\x1b[31m"), "substatus", id="substatus-escapes"),
    pytest.param(_set("description", "two\nlines"), "description", id="description-newline"),
    pytest.param(_set("description", "tab\there"), "description", id="description-tab"),
    pytest.param(_set("pickup_point.id", "P" * 100_000), "pickup_point.id", id="pickup-id-100k"),
    pytest.param(_set("pickup_point.name", "N" * 100_000), "pickup_point.name", id="pickup-name-100k"),
    pytest.param(_set("pickup_point.name", "Kiosk\r\nBcc: x"), "pickup_point.name", id="pickup-name-crlf"),
    pytest.param(
        _set("pickup_point.opening_hours", "O" * (MAX_OPENING_HOURS + 1)),
        "pickup_point.opening_hours",
        id="opening-hours",
    ),
    pytest.param(
        _lines(*["L" * 10] * (MAX_ADDRESS_LINES + 1)), "pickup_point.address.lines", id="address-9-lines"
    ),
    pytest.param(_lines(*["L" * 1000] * 1000), "pickup_point.address.lines", id="address-1000-lines"),
    pytest.param(
        _lines("Bahnhofplatz 1", "c/o", "Halle 3", "L" * (MAX_NAME + 1)),
        "pickup_point.address.lines[3]",
        id="address-line-3-long",
    ),
    pytest.param(
        _lines("Bahnhofplatz 1\n2. Stock"), "pickup_point.address.lines[0]", id="address-line-newline"
    ),
    pytest.param(
        _set("pickup_point.address.city", "\x1b[2J"), "pickup_point.address.city", id="address-city"
    ),
    pytest.param(
        _set("pickup_point.address.postal_code", "8" * (MAX_CODE + 1)),
        "pickup_point.address.postal_code",
        id="address-postal-code",
    ),
    pytest.param(
        _set("pickup_point.address.country_code", "C" * (MAX_CODE + 1)),
        "pickup_point.address.country_code",
        id="address-country-code",
    ),
]


@pytest.mark.parametrize(("edit", "field"), BAD_TEXT)
async def test_bad_text_rejects_only_its_event(channel: grpc.aio.Channel, edit: Edit, field: str) -> None:
    rejected = await reject_one(channel, edit)

    assert rejected.field == field
    assert rejected.reason.startswith(field)
    assert len(rejected.reason) < 200  # a sentence, never the value
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in rejected.reason)


async def test_text_at_the_limits_and_beyond_ascii_is_kept(channel: grpc.aio.Channel) -> None:
    full = event(
        "full", "FULL", T.TRACKING_STATUS_AVAILABLE_FOR_PICKUP, T0_MS, pickup=("P" * MAX_NAME, T0_MS + DAY_MS)
    )
    full.location.facility = "F" * MAX_NAME
    full.location.city = "Zürich-Mülligen"
    full.location.postal_code = "8" * MAX_CODE
    full.description = (
        "Zugestellt\u00a0\u2013 Briefkasten 📦, 👨\u200d👩\u200d👧 zu Hause"  # no-break space, joiners
    )
    full.substatus = "Ü" * 64
    point = full.pickup_point
    point.name = "Kiosk Bahnhof\u00a0SBB"
    point.opening_hours = "H" * MAX_OPENING_HOURS
    point.address.lines.extend(f"{n:<{MAX_NAME}}" for n in range(MAX_ADDRESS_LINES))
    point.address.city = "Genève"

    ack = await record(channel, full)

    assert (ack.accepted, list(ack.rejected)) == (1, [])
    parcel = await view(channel, "FULL")
    assert parcel.timeline[0].event == full
    assert parcel.pickup_point == full.pickup_point


@pytest.mark.parametrize(
    "reference",
    [
        pytest.param("ORD\r\nBcc: victim@evil.example\r\n\x1b[2J<script>x</script>", id="header-injection"),
        pytest.param("ORD-1\x00", id="nul"),
        pytest.param("R" * 65, id="65-characters"),
    ],
)
async def test_a_bad_order_reference_rejects_only_its_registration(
    channel: grpc.aio.Channel, reference: str
) -> None:
    bad = registration("B1")
    bad.order.order_reference = reference
    good = registration("G1")
    good.order.order_reference = "Bestellung Nr.\u00a04711 \u2013 Müller"

    response = await register(channel, good, bad)

    assert response.registered == 1
    assert [(r.index, r.field) for r in response.rejected] == [(1, "order.order_reference")]
    assert "victim" not in response.rejected[0].reason
    assert (await view(channel, "G1")).order.order_reference == good.order.order_reference
    await assert_unknown(channel, "B1")
