"""Hostile text from carriers (pickup point names, addresses, opening hours) goes through the real
renderer and the real email builder: no header injection, no markup, no bidi or control characters
in anything a recipient receives, whatever the channel."""

from __future__ import annotations

import email
import email.policy
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from relais.v1 import notice_pb2, types_pb2

from channels.base import EmailAddress, Message
from channels.email_message import build_email
from gateway.render import Renderer
from tests.conftest import T0_MS

HOUR_MS = 3_600_000
INJECTIONS = [
    "Kiosk\r\nBcc: victim@example.org",
    "Kiosk\nSubject: you won",
    '<script>alert("x")</script><img src=x onerror=alert(1)>',
    "{{ 7*7 }} {% raw %}",
    "\u202eKiosk gnp.exe\u200f\u200b",
    "Kiosk\x00\x1b[31m",
    "Kiosk\u2028Bcc: line-separator@example.org",
]
CHANNELS = (types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_SMS, types_pb2.CHANNEL_PUSH)


def pickup_notice(hostile: str) -> notice_pb2.Notice:
    notice = notice_pb2.Notice(
        notice_id="P1:AVAILABLE_FOR_PICKUP",
        version=1,
        kind=types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP,
        parcel_id="P1",
        merchant_id="acme",
        recipient_id="acme/r1",
        carrier="swisspost",
        paid=True,
        actionable=True,
    )
    point = notice.pickup_point
    point.id, point.name, point.opening_hours = "PP1", hostile, hostile
    point.address.lines.extend([hostile, "Bahnhofstrasse 1"])
    point.address.city, point.address.postal_code, point.address.country_code = hostile, "8001", "CH"
    point.deadline.FromMilliseconds(T0_MS + 72 * HOUR_MS)
    return notice


def bad_characters(text: str) -> list[str]:
    """Controls (other than the line breaks of a multi-line body) and invisible format characters."""
    return [
        ch
        for ch in text
        if unicodedata.category(ch) in {"Cf", "Co", "Cs"}
        or (unicodedata.category(ch) == "Cc" and ch not in "\n\t")
        or ch in "\u2028\u2029"
    ]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_hostile_carrier_text_cannot_inject_headers_or_markup(renderer: Renderer, hostile: str) -> None:
    rendered = renderer.render(
        pickup_notice(hostile), channel=types_pb2.CHANNEL_EMAIL, locale="de-CH", time_zone="Europe/Zurich"
    )
    message = Message(
        idempotency_key="P1:AVAILABLE_FOR_PICKUP:1:email",
        to=EmailAddress("anna@example.ch"),
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
    )
    raw = bytes(
        build_email(
            message, sender=EmailAddress("notices@relais.example"), message_id_domain="relais.example"
        )
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_all("Bcc") is None
    assert parsed.get_all("To") == ["anna@example.ch"]
    assert len(parsed.get_all("Subject") or []) == 1
    for header, value in parsed.items():
        assert not bad_characters(str(value)), header
    html = rendered.html
    assert "<script" not in html
    assert "<img" not in html
    if "<script>" in hostile:
        assert "&lt;script&gt;" in html  # shown, as text
    if "{{" in hostile:
        assert "{{ 7*7 }}" in rendered.text  # template syntax in data is shown, never evaluated
    for part in (rendered.subject, rendered.text, html):
        assert not bad_characters(part)


@settings(max_examples=60, deadline=None, database=None)
@given(hostile=st.text(min_size=1, max_size=60), channel=st.sampled_from(CHANNELS))
def test_any_text_renders_to_clean_output_on_every_channel(
    hostile: str, channel: types_pb2.Channel.ValueType
) -> None:
    rendered = Renderer().render(
        pickup_notice(hostile),
        channel=channel,
        locale="fr",
        time_zone="Europe/Paris",
    )
    for part in (rendered.subject, rendered.text, rendered.html, *rendered.data.values()):
        assert not bad_characters(part)
    assert "\r" not in rendered.subject
    assert "\n" not in rendered.subject
