"""Rendering: every notice kind in every language on every channel, dates in the recipient's zone,
escaping, sanitising, merchant overrides, links only where allowed, SMS length."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from relais.v1 import notice_pb2, types_pb2

from channels.sms_encoding import split
from gateway.render import (
    Rendered,
    Renderer,
    RenderError,
    clean_line,
    fit_sms,
    sms_segments,
    sms_units,
    to_gsm7,
)

PARCEL_ID = "99.60.123456.12345678"
ZURICH = "Europe/Zurich"
# 13:00-15:00 UTC on Tuesday 10 March 2026 (CET, UTC+1) and on Tuesday 14 July 2026 (CEST, UTC+2).
WINTER_S = int(datetime(2026, 3, 10, 13, tzinfo=UTC).timestamp())
SUMMER_S = int(datetime(2026, 7, 14, 13, tzinfo=UTC).timestamp())
HOUR_S = 3600

KINDS = [value for value in types_pb2.NoticeKind.values() if value != types_pb2.NOTICE_KIND_UNSPECIFIED]
CHANNELS = [types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_SMS, types_pb2.CHANNEL_PUSH]
# A word every message of the language contains, and that no other of the four languages uses.
LANGUAGE_WORD = {"fr": "colis", "de": "Paket", "it": "pacco", "en": "parcel"}
CHECK_ADDRESS = {
    "fr": "vérifier votre adresse",
    "de": "prüfen Sie Ihre",
    "it": "Verifichi il suo indirizzo",
    "en": "check your address",
}


# The pickup deadline of ``make_notice`` (Friday 20 March 2026, 18:00 in Zurich) as each language says it.
PICKUP_DEADLINE = {
    "fr": "vendredi 20 mars à 18:00",
    "de": "Freitag, 20. März, 18:00 Uhr",
    "it": "venerdì 20 marzo alle 18:00",
    "en": "18:00 on Friday 20 March",
}
PICKUP_KINDS = [types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, types_pb2.NOTICE_KIND_PICKUP_REMINDER]


def make_notice(
    kind: types_pb2.NoticeKind.ValueType,
    *,
    actionable: bool = True,
    reason: types_pb2.ExceptionReason.ValueType = types_pb2.EXCEPTION_REASON_ADDRESS_PROBLEM,
    slot_start_s: int = WINTER_S,
    pickup_name: str = "Kiosk Bahnhof",
    merchant_id: str = "shop-1",
) -> notice_pb2.Notice:
    """A notice with everything any kind may need: a slot, the slot before it, a pickup point."""
    notice = notice_pb2.Notice(
        notice_id=f"{PARCEL_ID}:{types_pb2.NoticeKind.Name(kind)}",
        version=2,
        kind=kind,
        parcel_id=PARCEL_ID,
        merchant_id=merchant_id,
        recipient_id="r-1",
        carrier="swisspost",
        parcel_status=types_pb2.TRACKING_STATUS_IN_TRANSIT,
        exception_reason=reason,
        paid=actionable,
        actionable=actionable,
    )
    notice.slot.start.seconds = slot_start_s
    notice.slot.end.seconds = slot_start_s + 2 * HOUR_S
    notice.previous_slot.start.seconds = slot_start_s - 3 * HOUR_S
    notice.previous_slot.end.seconds = slot_start_s - HOUR_S
    point = notice.pickup_point
    point.id = "pp-1"
    point.name = pickup_name
    point.address.lines.append("Bahnhofplatz 1")
    point.address.postal_code = "8001"
    point.address.city = "Zürich"
    point.address.country_code = "CH"
    point.opening_hours = "Mo-Fr 08:00-19:00"
    # Friday 20 March 2026, 18:00 in Zurich.
    point.deadline.seconds = int(datetime(2026, 3, 20, 17, tzinfo=UTC).timestamp())
    notice.promised_date.year, notice.promised_date.month, notice.promised_date.day = 2026, 3, 9
    return notice


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def render_all(
    renderer: Renderer, notice: notice_pb2.Notice, locale: str, time_zone: str = ZURICH
) -> list[Rendered]:
    return [
        renderer.render(notice, channel=channel, locale=locale, time_zone=time_zone) for channel in CHANNELS
    ]


def everything(rendered: Rendered) -> str:
    return "\n".join([rendered.subject, rendered.text, rendered.html, *rendered.data.values()])


@pytest.mark.parametrize("lang", list(LANGUAGE_WORD))
@pytest.mark.parametrize("kind", KINDS, ids=[types_pb2.NoticeKind.Name(kind) for kind in KINDS])
def test_every_kind_renders_in_its_language_on_every_channel(
    renderer: Renderer, kind: types_pb2.NoticeKind.ValueType, lang: str
) -> None:
    email, sms, push = render_all(renderer, make_notice(kind), f"{lang}-CH")
    word = LANGUAGE_WORD[lang]
    others = [other for other in LANGUAGE_WORD.values() if other != word]

    assert email.subject
    assert email.text.strip()
    assert email.html.strip()
    assert f'<html lang="{lang}">' in email.html
    assert PARCEL_ID in email.text
    assert PARCEL_ID in email.html
    assert sms.text
    assert not sms.subject
    assert not sms.html
    assert push.subject
    assert push.text
    assert not push.html
    for rendered in (email, sms, push):
        text = f"{rendered.subject} {rendered.text}"
        assert word.lower() in text.lower(), text
        assert not any(other in text for other in others), text
        # Nothing left of the template language, no Python None in a sentence.
        assert "{{" not in everything(rendered)
        assert "{%" not in everything(rendered)
        assert "None" not in text
        assert rendered.data["parcel_id"] == PARCEL_ID
        assert rendered.data["kind"] == types_pb2.NoticeKind.Name(kind).removeprefix("NOTICE_KIND_").lower()
    # Typical data fits one GSM-7 segment in every language.
    assert sms_units(sms.text)[0], sms.text
    assert sms_segments(sms.text) == 1, sms.text


@pytest.mark.parametrize(
    ("slot_start_s", "start", "end"),
    [(WINTER_S, "14:00", "16:00"), (SUMMER_S, "15:00", "17:00")],
    ids=["winter", "summer"],
)
@pytest.mark.parametrize("lang", list(LANGUAGE_WORD))
def test_slot_times_are_in_the_recipients_zone(
    renderer: Renderer, lang: str, slot_start_s: int, start: str, end: str
) -> None:
    notice = make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, slot_start_s=slot_start_s)
    for rendered in render_all(renderer, notice, lang):
        assert start in rendered.text, rendered.text
        assert end in rendered.text, rendered.text
        assert "13:00" not in rendered.text  # the UTC start


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("fr-CH", "le mardi 10 mars, entre 14:00 et 16:00"),
        ("de-CH", "am Dienstag, 10. März, zwischen 14:00 und 16:00 Uhr"),
        ("it-CH", "martedì 10 marzo, tra le 14:00 e le 16:00"),
        ("en", "on Tuesday 10 March, between 14:00 and 16:00"),
        ("en-US", "on Tuesday, March 10, between 2:00 PM and 4:00 PM"),
    ],
)
def test_slot_reads_as_the_locale_writes_it(renderer: Renderer, locale: str, expected: str) -> None:
    email = renderer.render(
        make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED),
        channel=types_pb2.CHANNEL_EMAIL,
        locale=locale,
        time_zone=ZURICH,
    )
    assert expected in email.text


def test_slot_across_midnight_and_across_days(renderer: Renderer) -> None:
    # 13:00-15:00 UTC is 22:00-00:00 in Tokyo: one evening, not two days.
    evening = make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED)
    sms = renderer.render(evening, channel=types_pb2.CHANNEL_SMS, locale="en", time_zone="Asia/Tokyo")
    assert "on Tuesday 10 March, between 22:00 and 00:00" in sms.text

    overnight = make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED)
    overnight.slot.end.seconds = overnight.slot.start.seconds + 14 * HOUR_S
    sms = renderer.render(overnight, channel=types_pb2.CHANNEL_SMS, locale="fr", time_zone=ZURICH)
    assert "du mardi 10 mars à 14:00 au mercredi 11 mars à 04:00" in sms.text


@pytest.mark.parametrize("lang", list(LANGUAGE_WORD))
def test_correction_names_the_old_and_the_new_slot(renderer: Renderer, lang: str) -> None:
    # New slot 14:00-16:00, the one announced before 11:00-13:00 (Zurich).
    for rendered in render_all(renderer, make_notice(types_pb2.NOTICE_KIND_SLOT_CORRECTED), lang):
        for time_of_day in ("14:00", "16:00", "11:00", "13:00"):
            assert time_of_day in rendered.text, (time_of_day, rendered.text)
    email = render_all(renderer, make_notice(types_pb2.NOTICE_KIND_SLOT_CORRECTED), lang)[0]
    assert "11:00" in email.html
    assert "14:00" in email.html


def test_html_escapes_markup_in_a_pickup_point_name(renderer: Renderer) -> None:
    notice = make_notice(
        types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, pickup_name='<script>alert("x")</script> Café & Co'
    )
    email = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="fr", time_zone=ZURICH)
    assert "<script" not in email.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; Café &amp; Co" in email.html
    # Plain text is not HTML: it shows the name as it is, unescaped.
    assert '<script>alert("x")</script> Café & Co' in email.text
    assert "&amp;" not in email.text


@pytest.mark.parametrize("kind", PICKUP_KINDS)
def test_pickup_notices_name_the_point_and_its_deadline(
    renderer: Renderer, kind: types_pb2.NoticeKind.ValueType
) -> None:
    for lang, when in PICKUP_DEADLINE.items():
        for rendered in render_all(renderer, make_notice(kind), lang):
            assert "Kiosk Bahnhof" in rendered.text
            assert when in rendered.text, rendered.text


def bare_point_notice(kind: types_pb2.NoticeKind.ValueType, *, address: bool = False) -> notice_pb2.Notice:
    """A pickup notice whose point has what tracking.proto requires (id and deadline) and, with
    ``address``, its address: no name, no opening hours."""
    notice = make_notice(kind)
    point = notice.pickup_point
    point.name = ""
    point.opening_hours = ""
    if not address:
        point.ClearField("address")
    return notice


# Traces of a value that was missing: a word from Python or Jinja, or punctuation around nothing.
_HOLE_RE = re.compile(r"None|Undefined|\{\{|\s[.,;]|[,:]\s*[.,]|\(\s*\)|  |^[,.]")


def reading(rendered: Rendered, channel: types_pb2.Channel.ValueType) -> list[str]:
    """The lines a recipient reads on the channel (the email's plain text part line by line)."""
    if channel == types_pb2.CHANNEL_EMAIL:
        return [rendered.subject, *(line.strip() for line in rendered.text.splitlines() if line.strip())]
    if channel == types_pb2.CHANNEL_SMS:
        return [rendered.text]
    return [rendered.subject, rendered.text]


@pytest.mark.parametrize("channel", CHANNELS, ids=["email", "sms", "push"])
@pytest.mark.parametrize("lang", list(PICKUP_DEADLINE))
@pytest.mark.parametrize("kind", PICKUP_KINDS, ids=["available", "reminder"])
def test_a_pickup_point_with_only_its_id_and_deadline_is_named_by_its_id(
    renderer: Renderer,
    kind: types_pb2.NoticeKind.ValueType,
    lang: str,
    channel: types_pb2.Channel.ValueType,
) -> None:
    rendered = renderer.render(bare_point_notice(kind), channel=channel, locale=lang, time_zone=ZURICH)
    lines = reading(rendered, channel)
    text = "\n".join(lines)
    assert "pp-1" in text, text
    assert PICKUP_DEADLINE[lang] in text, text
    if channel == types_pb2.CHANNEL_EMAIL:
        assert "pp-1" in rendered.subject, rendered.subject
    for line in lines:
        assert not _HOLE_RE.search(line), line
    if channel == types_pb2.CHANNEL_EMAIL:
        assert "pp-1" in rendered.html
        assert PICKUP_DEADLINE[lang] in rendered.html
        assert not re.search(r"<p[^>]*>\s*</p>|<br>\s*<br>|<br>\s*</p>", rendered.html), rendered.html
        assert "None" not in rendered.html


@pytest.mark.parametrize("lang", list(PICKUP_DEADLINE))
@pytest.mark.parametrize("kind", PICKUP_KINDS, ids=["available", "reminder"])
def test_a_pickup_point_without_a_name_is_named_by_its_address(
    renderer: Renderer, kind: types_pb2.NoticeKind.ValueType, lang: str
) -> None:
    notice = bare_point_notice(kind, address=True)
    for channel, rendered in zip(CHANNELS, render_all(renderer, notice, lang), strict=True):
        lines = reading(rendered, channel)
        text = "\n".join(lines)
        assert "Bahnhofplatz 1, 8001 Zürich" in rendered.text, rendered.text
        assert PICKUP_DEADLINE[lang] in text, text
        for line in lines:
            assert not _HOLE_RE.search(line), line
            # The address names the point: no sentence repeats it after itself.
            assert line.count("Bahnhofplatz 1") <= 1, line


def test_a_pickup_point_that_names_nothing_is_refused(renderer: Renderer) -> None:
    notice = bare_point_notice(types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP)
    notice.pickup_point.id = " \u200b"
    with pytest.raises(RenderError, match=r"^pickup_point"):
        renderer.render(notice, channel=types_pb2.CHANNEL_SMS, locale="fr", time_zone=ZURICH)


def test_single_line_fields_lose_line_breaks_and_odd_characters(renderer: Renderer) -> None:
    hostile = "Kiosk\r\nBcc: someone@example.com\u202e\u200f\x00 Bahnhof"
    notice = make_notice(types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, pickup_name=hostile)
    for lang in LANGUAGE_WORD:
        for rendered in render_all(renderer, notice, lang):
            assert "\r" not in rendered.subject
            assert "\n" not in rendered.subject
            for bad in ("\x00", "\u202e", "\u200f", "\r"):
                assert bad not in everything(rendered)
            # The name stays on one line wherever it appears.
            assert "Kiosk Bcc: someone@example.com Bahnhof" in rendered.subject + rendered.text
    assert clean_line("a\r\nb\tc\x00d\u2028e\u202ef", 100) == "a b c d ef"
    assert clean_line("x" * 50, 10) == "x" * 9 + "…"


@pytest.mark.parametrize("locale", ["es", "es-ES", "", "zz", "not a locale!", "pt_BR"])
def test_unknown_languages_fall_back_to_english(renderer: Renderer, locale: str) -> None:
    email = renderer.render(
        make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED),
        channel=types_pb2.CHANNEL_EMAIL,
        locale=locale,
        time_zone=ZURICH,
    )
    assert email.subject == "Your parcel arrives on Tuesday 10 March, between 14:00 and 16:00"
    assert '<html lang="en">' in email.html


def test_region_is_honoured_where_the_language_differs(renderer: Renderer) -> None:
    notice = make_notice(types_pb2.NOTICE_KIND_DELIVERED)
    swiss = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="de-CH", time_zone=ZURICH)
    german = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="de_DE", time_zone=ZURICH)
    assert "Freundliche Grüsse" in swiss.text
    assert "Freundliche Grüße" in german.text


@pytest.mark.parametrize("kind", KINDS, ids=[types_pb2.NoticeKind.Name(kind) for kind in KINDS])
def test_non_actionable_notices_carry_no_link(
    renderer: Renderer, kind: types_pb2.NoticeKind.ValueType
) -> None:
    notice = make_notice(kind, actionable=False)
    for lang in LANGUAGE_WORD:
        for rendered in render_all(renderer, notice, lang):
            content = everything(rendered)
            assert "://" not in content, content
            assert "track.example" not in content
            assert "<a " not in rendered.html
            assert "deep_link" not in rendered.data
            assert CHECK_ADDRESS[lang].lower() not in content.lower()


@pytest.mark.parametrize("lang", list(LANGUAGE_WORD))
def test_an_actionable_address_problem_asks_to_check_the_address(renderer: Renderer, lang: str) -> None:
    email, sms, push = render_all(renderer, make_notice(types_pb2.NOTICE_KIND_EXCEPTION), lang)
    link = f"https://track.example/p/{PARCEL_ID}"
    assert CHECK_ADDRESS[lang].lower() in email.text.lower()
    assert f'href="{link}"' in email.html
    assert link in email.text
    assert link in sms.text
    assert push.data["deep_link"] == f"relais://parcels/{PARCEL_ID}"


def test_other_exceptions_say_what_happened_without_asking_for_the_address(renderer: Renderer) -> None:
    notice = make_notice(types_pb2.NOTICE_KIND_EXCEPTION, reason=types_pb2.EXCEPTION_REASON_CUSTOMS)
    email = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="de", time_zone=ZURICH)
    assert email.subject == "Ihr Paket ist beim Zoll"
    assert CHECK_ADDRESS["de"] not in email.text


def test_link_base_is_configurable_and_checked() -> None:
    custom = Renderer(link_base="https://parcels.shop.test/")
    sms = custom.render(
        make_notice(types_pb2.NOTICE_KIND_ATTEMPT_FAILED),
        channel=types_pb2.CHANNEL_SMS,
        locale="en",
        time_zone=ZURICH,
    )
    assert f"https://parcels.shop.test/p/{PARCEL_ID}" in sms.text
    for bad in ("javascript:alert(1)", "track.example", "https://x.test/?q=1"):
        with pytest.raises(RenderError, match="link_base"):
            Renderer(link_base=bad)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_merchant_override_wins_over_the_builtin_template(tmp_path: Path) -> None:
    overrides = tmp_path / "overrides"
    write(
        overrides / "shop-1" / "messages" / "fr" / "delivered.txt",
        "{% macro subject() %}Votre commande Maison Dupont est arrivée{% endmacro %}\n"
        "{% macro lead() %}Votre colis {{ parcel_id }} est chez vous. Merci !{% endmacro %}\n"
        "{% macro sms() %}Maison Dupont : colis {{ parcel_id }} livré.{% endmacro %}\n",
    )
    write(
        overrides / "shop-1" / "email" / "layout.html",
        '<html lang="{{ m.lang }}"><body><img alt="Maison Dupont">'
        "{% block content %}{% endblock %}</body></html>",
    )
    # Outside the override root: a merchant id must not reach it.
    write(tmp_path / "evil" / "messages" / "fr" / "delivered.txt", "{% macro subject() %}pwned{% endmacro %}")
    renderer = Renderer(override_dir=overrides)
    notice = make_notice(types_pb2.NOTICE_KIND_DELIVERED, merchant_id="shop-1")

    email = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="fr-CH", time_zone=ZURICH)
    assert email.subject == "Votre commande Maison Dupont est arrivée"
    assert '<img alt="Maison Dupont">' in email.html
    assert "est chez vous" in email.html
    sms = renderer.render(notice, channel=types_pb2.CHANNEL_SMS, locale="fr", time_zone=ZURICH)
    assert sms.text == f"Maison Dupont : colis {PARCEL_ID} livré."
    # What the merchant did not override stays built in: other languages, other kinds.
    german = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="de", time_zone=ZURICH)
    assert german.subject == "Ihr Paket wurde zugestellt"
    assert '<img alt="Maison Dupont">' in german.html

    for merchant_id in ("shop-2", "../evil", "shop-1/../../evil", ".", "", "evil\x00"):
        other = make_notice(types_pb2.NOTICE_KIND_DELIVERED, merchant_id=merchant_id)
        email = renderer.render(other, channel=types_pb2.CHANNEL_EMAIL, locale="fr", time_zone=ZURICH)
        assert email.subject == "Votre colis a été livré", merchant_id


def test_sms_never_costs_more_than_two_segments(renderer: Renderer) -> None:
    # A long name in a script GSM-7 cannot write forces UCS-2 (70 characters a segment).
    notice = make_notice(types_pb2.NOTICE_KIND_PICKUP_REMINDER, pickup_name="東京駅前郵便局 " * 20)
    for lang in LANGUAGE_WORD:
        sms = renderer.render(notice, channel=types_pb2.CHANNEL_SMS, locale=lang, time_zone=ZURICH)
        assert not sms_units(sms.text)[0]
        assert sms_segments(sms.text) <= 2, sms.text
    long_latin = make_notice(types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, pickup_name="Bäckerei Müller " * 20)
    for lang in LANGUAGE_WORD:
        sms = renderer.render(long_latin, channel=types_pb2.CHANNEL_SMS, locale=lang, time_zone=ZURICH)
        assert sms_units(sms.text)[0], sms.text
        assert sms_segments(sms.text) <= 2, sms.text


def test_gsm7_counting_and_substitution() -> None:
    assert sms_segments("a" * 160) == 1
    assert sms_segments("a" * 161) == 2
    assert sms_segments("a" * 306) == 2
    assert sms_segments("a" * 307) == 3
    assert sms_units("€[") == (True, 4)  # extension characters cost an escape each
    assert sms_segments("é" * 160) == 1  # é is in the GSM-7 basic set
    # 306 septets, but the escaped € cannot straddle two segments: three, as the provider bills.
    straddling = "a" * 152 + "€" + "a" * 152
    assert sms_segments(straddling) == split(straddling).count == 3
    assert sms_segments("ê" * 70) == 1  # ê is not: UCS-2, 70 a segment
    assert sms_segments("ê" * 71) == 2
    typographic = "être reçu \u2013 l\u2019adresse\u2026 \u00abok\u00bb\u202fsi"
    assert to_gsm7(typographic) == 'etre recu - l\'adresse... "ok" si'
    assert to_gsm7("Grüsse à Zürich, città") == "Grüsse à Zürich, città"
    cut = fit_sms("€" * 400)
    assert sms_segments(cut) == 2
    assert cut.endswith("...")


def test_bad_input_names_the_field(renderer: Renderer) -> None:
    def render(notice: notice_pb2.Notice, **overrides: object) -> Rendered:
        options: dict[str, object] = {"channel": types_pb2.CHANNEL_EMAIL, "locale": "fr", "time_zone": ZURICH}
        options.update(overrides)
        return renderer.render(notice, **options)  # type: ignore[arg-type]

    with pytest.raises(RenderError, match=r"^kind"):
        render(notice_pb2.Notice(parcel_id=PARCEL_ID))
    no_slot = make_notice(types_pb2.NOTICE_KIND_SLOT_ANNOUNCED)
    no_slot.ClearField("slot")
    with pytest.raises(RenderError, match=r"^slot"):
        render(no_slot)
    no_previous = make_notice(types_pb2.NOTICE_KIND_SLOT_CORRECTED)
    no_previous.ClearField("previous_slot")
    with pytest.raises(RenderError, match=r"^previous_slot"):
        render(no_previous)
    no_point = make_notice(types_pb2.NOTICE_KIND_PICKUP_REMINDER)
    no_point.ClearField("pickup_point")
    with pytest.raises(RenderError, match=r"^pickup_point"):
        render(no_point)
    with pytest.raises(RenderError, match=r"^time_zone"):
        render(make_notice(types_pb2.NOTICE_KIND_SHIPPED), time_zone="Mars/Olympus_Mons")
    with pytest.raises(RenderError, match=r"^channel"):
        render(make_notice(types_pb2.NOTICE_KIND_SHIPPED), channel=types_pb2.CHANNEL_UNSPECIFIED)
    bad_date = make_notice(types_pb2.NOTICE_KIND_DELAYED)
    bad_date.promised_date.month = 13
    with pytest.raises(RenderError, match=r"^promised_date"):
        render(bad_date)


def test_delayed_without_a_promised_date_still_reads_well(renderer: Renderer) -> None:
    notice = make_notice(types_pb2.NOTICE_KIND_DELAYED)
    notice.ClearField("promised_date")
    email = renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="it", time_zone=ZURICH)
    assert "sta impiegando più tempo del previsto" in email.text
    with_date = renderer.render(
        make_notice(types_pb2.NOTICE_KIND_DELAYED),
        channel=types_pb2.CHANNEL_EMAIL,
        locale="it",
        time_zone=ZURICH,
    )
    assert "era previsto per lunedì 9 marzo" in with_date.text


def test_returned_says_whether_the_parcel_is_on_its_way_back_or_back(renderer: Renderer) -> None:
    notice = make_notice(types_pb2.NOTICE_KIND_RETURNED)
    notice.parcel_status = types_pb2.TRACKING_STATUS_RETURNING_TO_SENDER
    on_the_way = renderer.render(notice, channel=types_pb2.CHANNEL_PUSH, locale="en", time_zone=ZURICH)
    notice.parcel_status = types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER
    back = renderer.render(notice, channel=types_pb2.CHANNEL_PUSH, locale="en", time_zone=ZURICH)
    assert "on its way back to the sender" in on_the_way.text
    assert "has been returned to the sender" in back.text


def test_a_broken_merchant_template_names_itself(tmp_path: Path) -> None:
    shipped = Path("messages", "en", "shipped.txt")
    write(tmp_path / "shop-1" / shipped, "{% macro subject() %}{{ oops }{% endmacro %}")  # syntax error
    write(tmp_path / "shop-2" / shipped, "{% macro subject() %}{{ nope }}{% endmacro %}")  # undefined name
    renderer = Renderer(override_dir=tmp_path)
    for merchant_id, expected in (("shop-1", "messages/en/shipped.txt"), ("shop-2", "nope")):
        notice = make_notice(types_pb2.NOTICE_KIND_SHIPPED, merchant_id=merchant_id)
        with pytest.raises(RenderError, match=r"^template: ") as raised:
            renderer.render(notice, channel=types_pb2.CHANNEL_EMAIL, locale="en", time_zone=ZURICH)
        assert expected in str(raised.value)


# A message rendered once per set of facts and reused with each parcel's id must be the very message
# the templates write for that parcel: every kind, channel and language, ids plain or not (those are
# rendered in full), long ids (SMS cut, subject cap), links on and off.
REUSE_IDS = [
    "99.60.123456.12345678",
    "BP-000000001",
    "x",
    "A" * 64,
    "a" * 65,
    "id with spaces",
    '<b>&"quoted"</b>',
    "colis/ü%20",
]


@pytest.mark.parametrize("lang", ["fr-CH", "de", "it", "en", "en-US", "xx"])
def test_reused_messages_equal_fully_rendered_ones(lang: str) -> None:
    reusing, full = Renderer(), Renderer(reuse_messages=False)
    for kind in KINDS:
        for actionable in (True, False):
            for parcel_id in REUSE_IDS:
                notice = make_notice(kind, actionable=actionable)
                notice.parcel_id = parcel_id
                for channel in CHANNELS:
                    expected = full.render(notice, channel=channel, locale=lang, time_zone=ZURICH)
                    got = reusing.render(notice, channel=channel, locale=lang, time_zone=ZURICH)
                    assert got == expected, (kind, channel, parcel_id)
    assert any(stencil is not None for stencil in reusing._stencils.values())


def test_reused_messages_follow_every_fact() -> None:
    """Two notices differing in one fact the templates read never share a message."""
    reusing, full = Renderer(), Renderer(reuse_messages=False)
    base = make_notice(types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP)
    variants = [base]
    for change in (
        lambda n: setattr(n.slot.start, "seconds", WINTER_S + HOUR_S),
        lambda n: setattr(n.previous_slot.end, "seconds", WINTER_S),
        lambda n: setattr(n.pickup_point, "name", "Other kiosk"),
        lambda n: n.pickup_point.ClearField("name"),
        lambda n: n.pickup_point.ClearField("deadline"),
        lambda n: setattr(n, "exception_reason", types_pb2.EXCEPTION_REASON_DAMAGED),
        lambda n: setattr(n, "parcel_status", types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER),
        lambda n: setattr(n.promised_date, "day", 10),
    ):
        notice = notice_pb2.Notice()
        notice.CopyFrom(base)
        change(notice)
        variants.append(notice)
    for kind in KINDS:
        for notice in variants:
            notice.kind = kind
            for zone in (ZURICH, "America/New_York"):
                for channel in CHANNELS:
                    expected = full.render(notice, channel=channel, locale="fr", time_zone=zone)
                    assert reusing.render(notice, channel=channel, locale="fr", time_zone=zone) == expected


def test_a_warmed_renderer_writes_the_same_messages() -> None:
    """``warm`` (what a gateway's loop does before its first batch) compiles every built-in template
    of every language — a broken one fails here — and changes nothing a recipient reads."""
    warmed = Renderer()
    warmed.warm()
    cold = Renderer()
    for lang in ("fr-CH", "de", "it", "en"):
        for kind in KINDS:
            notice = make_notice(kind)
            assert render_all(warmed, notice, lang) == render_all(cold, notice, lang), (lang, kind)
