"""Rendering: a notice becomes the words a recipient reads, in their language and time zone.

The wording lives in templates, not here. ``templates/messages/<lang>/<kind>.txt`` is one small
catalogue entry per language and notice kind; its macros hold every channel's sentences side by side
(macros rather than blocks, so they can share helpers such as "why the attempt failed"):

- ``subject`` (email subject, and push title unless ``push_title`` is given), ``lead`` (the one
  sentence that matters), ``details`` (more email paragraphs, separated by blank lines),
  ``highlight`` (lines shown boxed in the email), ``action`` (the label of the link, shown only when
  the notice is actionable), ``sms``, ``push_title``, ``push_body`` (``lead`` when absent).
- ``templates/messages/<lang>/_phrases.txt`` says how a language reads a slot, a deadline, a date
  ("le mardi 10 mars, entre 14:00 et 16:00"), a pickup point ("chez Kiosk Bahnhof", or "au point
  relais pp-1" when the carrier sent only its id), and holds the greeting and sign-off. It reaches
  every catalogue entry as ``p``.
- ``templates/email/message.html`` (on ``email/layout.html``) and ``email/message.txt`` lay an email
  out for every language. Catalogue text is plain text; the HTML layout escapes it as a whole, so no
  variable can inject markup, and no sentence needs writing twice.

A merchant's file ``<override_dir>/<merchant_id>/<same relative path>`` wins over the built-in one
(one Jinja environment per merchant with overrides, a ``ChoiceLoader`` over both; whether a merchant
has a directory is looked up once, so new override directories need a restart). Templates are
compiled once per environment; dates and times are formatted with Babel, cached by local date and by
minute of the day, so a burst of notices costs a few dictionary look-ups, not a Babel call each.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from functools import lru_cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time
from google.protobuf.timestamp_pb2 import Timestamp
from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    select_autoescape,
)
from relais.v1 import notice_pb2, types_pb2

from channels.sms_encoding import GSM7_BASIC, GSM7_EXTENSION, split
from common.errors import RelaisError

BUILTIN_TEMPLATES: Final = Path(__file__).parent / "templates"
LANGUAGES: Final = ("fr", "de", "it", "en")
FALLBACK_LANGUAGE: Final = "en"
DEFAULT_LINK_BASE: Final = "https://track.example"
DEEP_LINK_PREFIX: Final = "relais://parcels/"

# A language without a region is formatted as a European post writes it: English gets day-month
# dates and a 24-hour clock (en_GB), not the US defaults Babel gives plain "en".
_PLAIN_LANGUAGE_LOCALE: Final = {"fr": "fr", "de": "de", "it": "it", "en": "en_GB"}
# "mardi 10 mars", "Dienstag, 10. März", "martedì 10 marzo", "Tuesday 10 March": the full date
# without the year, written the way each language's posts write it.
_DATE_PATTERN: Final = {"fr": "EEEE d MMMM", "de": "EEEE, d. MMMM", "it": "EEEE d MMMM", "en": "EEEE d MMMM"}
_MONTH_FIRST_DATE_PATTERN: Final = "EEEE, MMMM d"

# Caps on data-driven text, so one long pickup point name cannot blow a subject or an SMS up.
_NAME_MAX_CHARS: Final = 60
_ADDRESS_MAX_CHARS: Final = 90
_HOURS_MAX_CHARS: Final = 60
_ID_MAX_CHARS: Final = 64
_SUBJECT_MAX_CHARS: Final = 200
# Bounds on per-input caches, so hostile or varied input cannot grow them without limit.
_CACHE_MAX_ENTRIES: Final = 4096

_KIND_NAMES: Final = {
    value: name.removeprefix("NOTICE_KIND_").lower()
    for name, value in types_pb2.NoticeKind.items()
    if value != types_pb2.NOTICE_KIND_UNSPECIFIED
}
_REASON_NAMES: Final = {
    value: name.removeprefix("EXCEPTION_REASON_").lower() for name, value in types_pb2.ExceptionReason.items()
}
_CHANNELS: Final = frozenset({types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_SMS, types_pb2.CHANNEL_PUSH})
_NEEDS_SLOT: Final = {types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, types_pb2.NOTICE_KIND_SLOT_CORRECTED}
_NEEDS_PICKUP: Final = {types_pb2.NOTICE_KIND_AVAILABLE_FOR_PICKUP, types_pb2.NOTICE_KIND_PICKUP_REMINDER}
_MERCHANT_DIR_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PARAGRAPH_BREAK_RE: Final = re.compile(r"\n[ \t]*\n")
# Unicode categories that never belong in a line of text: controls (NUL, CR, LF), format characters
# (bidi overrides and marks, zero-width joiners), private use, surrogates, unassigned.
_DROPPED_CATEGORIES: Final = frozenset({"Cf", "Co", "Cs", "Cn"})
_SPACE_CATEGORIES: Final = frozenset({"Cc", "Zs", "Zl", "Zp"})


class RenderError(RelaisError, ValueError):
    """A notice cannot be rendered; the message names the missing or malformed field."""


@dataclass(frozen=True)
class Rendered:
    """What a channel sends. Email: all three texts; SMS: ``text``; push: ``subject`` is the title,
    ``text`` the body and ``data`` the app's payload (ids only, never personal data)."""

    subject: str
    text: str
    html: str
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class When:
    """An instant in the recipient's zone, formatted for their locale."""

    date: str
    time: str


@dataclass(frozen=True)
class Window:
    """A delivery slot in the recipient's zone. ``end_date`` is set only when the slot ends on a
    later day than it starts (the catalogue then names both days)."""

    date: str
    start: str
    end: str
    end_date: str


@dataclass(frozen=True)
class Place:
    """A pickup point as the catalogue shows it: single-line, sanitised fields. Only ``id`` is sure
    to be set (all tracking.proto requires of a point is its id and deadline): the catalogue names a
    point by its name, else its address, else its id (``_phrases.txt``: ``at``, ``place_lines``)."""

    id: str
    name: str
    address: str
    opening_hours: str
    deadline: When | None


@dataclass(frozen=True)
class EmailParts:
    """The rendered sentences an email layout arranges (``m`` in ``email/*`` templates)."""

    lang: str
    parcel_id: str
    subject: str
    lead: str
    paragraphs: tuple[str, ...]
    highlight: tuple[str, ...]
    action: str
    link: str
    greeting: str
    signoff: str
    tracking: str
    footer: str


@dataclass(frozen=True)
class _Language:
    code: str  # the catalogue used: fr, de, it, en
    locale_id: str  # Babel locale for formatting, e.g. "fr_CH"
    region: str  # "CH", or "" when the locale named none
    date_pattern: str


def clean_line(value: str, max_chars: int) -> str:
    """One line of display text from untrusted data: NFC, no control or format characters (CR, LF,
    NUL, bidi marks), runs of whitespace as one space, at most ``max_chars`` characters."""
    # isprintable() is False for every "Other" and "Separator" character but the ASCII space: the
    # common case (clean NFC text) skips the per-character walk.
    if not (value.isprintable() and unicodedata.is_normalized("NFC", value)):
        kept: list[str] = []
        for char in unicodedata.normalize("NFC", value):
            category = unicodedata.category(char)
            if category in _SPACE_CATEGORIES:
                kept.append(" ")
            elif category not in _DROPPED_CATEGORIES:
                kept.append(char)
        value = "".join(kept)
    value = " ".join(value.split())
    if len(value) > max_chars:
        value = value[: max_chars - 1].rstrip() + "…"
    return value


# --- SMS text ---------------------------------------------------------------------------------------

# Typography that has a plain GSM equivalent. Everything else outside GSM-7 is tried through its
# Unicode decomposition (ê -> e, ç -> c) before it is left alone (and the SMS goes out as UCS-2).
_GSM_SUBSTITUTES: Final = {
    **dict.fromkeys("\u2018\u2019\u201a\u2032", "'"),  # typographic single quotes, prime
    **dict.fromkeys("\u201c\u201d\u201e\u00ab\u00bb", '"'),  # typographic double quotes, guillemets
    **dict.fromkeys("\u2010\u2011\u2013\u2014", "-"),  # hyphens, en and em dash
    "\u2026": "...",  # ellipsis
    "\u0153": "oe",
    "\u0152": "OE",
    "\t": " ",
}
SMS_MAX_SEGMENTS: Final = 2


_NOT_GSM7_RE: Final = re.compile("[^" + re.escape("".join(sorted(GSM7_BASIC | GSM7_EXTENSION))) + "]")
_GSM7_EXTENSION_RE: Final = re.compile("[" + re.escape("".join(sorted(GSM7_EXTENSION))) + "]")


def _gsm7_substitute(match: re.Match[str]) -> str:
    char = match.group()
    if char in _GSM_SUBSTITUTES:
        return _GSM_SUBSTITUTES[char]
    if unicodedata.category(char) == "Zs":
        return " "
    base = unicodedata.normalize("NFKD", char)[:1]
    return base if base in GSM7_BASIC else char


def to_gsm7(text: str) -> str:
    """Replace what has a GSM-7 spelling, so an SMS costs one segment where the language allows."""
    if _NOT_GSM7_RE.search(text) is None:
        return text
    return _NOT_GSM7_RE.sub(_gsm7_substitute, text)


def sms_units(text: str) -> tuple[bool, int]:
    """(True, length in septets) for GSM-7 text, else (False, length in UTF-16 code units): UCS-2."""
    if _NOT_GSM7_RE.search(text) is None:
        return True, len(text) + len(_GSM7_EXTENSION_RE.findall(text))
    return False, len(text.encode("utf-16-le")) // 2


def sms_segments(text: str) -> int:
    """How many segments an SMS of this text costs: the SMS channel's own count
    (``channels.sms_encoding.split``: GSM 03.38 / UCS-2 concatenation, an extension character never
    split across two segments), so what rendering fits is what the provider bills."""
    return split(text).count


def fit_sms(text: str, max_segments: int = SMS_MAX_SEGMENTS) -> str:
    """The text on one line in GSM-7 where possible, cut with "..." if it would cost more segments."""
    text = to_gsm7(" ".join(text.split()))
    if sms_segments(text) <= max_segments:
        return text
    # Rare (a very long name in a UCS-2 message): drop characters until "..." fits.
    while text and sms_segments(text + "...") > max_segments:
        text = text[:-1]
    return text.rstrip() + "..."


# --- formatting -------------------------------------------------------------------------------------


class _Formats:
    """Babel formatting behind caches: windows and instants per zone and locale, and below them a
    local date per locale and a minute of the day per locale."""

    def __init__(self) -> None:
        self.date = lru_cache(maxsize=_CACHE_MAX_ENTRIES)(self._date)
        self.time = lru_cache(maxsize=_CACHE_MAX_ENTRIES)(self._time)
        self.zone = lru_cache(maxsize=256)(self._zone)
        self._when_cached = lru_cache(maxsize=_CACHE_MAX_ENTRIES)(self._when)
        self._window_cached = lru_cache(maxsize=_CACHE_MAX_ENTRIES)(self._window)

    @staticmethod
    def _date(day: date, pattern: str, locale_id: str) -> str:
        return format_date(day, pattern, locale=locale_id)

    @staticmethod
    def _time(hour: int, minute: int, locale_id: str) -> str:
        return format_time(time(hour, minute), "short", locale=locale_id)

    @staticmethod
    def _zone(name: str) -> ZoneInfo:
        try:
            return ZoneInfo(name or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            raise RenderError(f"time_zone: unknown time zone {name[:64]!r}") from None

    def when(self, stamp: Timestamp, zone: ZoneInfo, lang: _Language) -> When:
        return self._when_cached(stamp.seconds, zone, lang)

    def window(self, span: types_pb2.TimeWindow, zone: ZoneInfo, lang: _Language) -> Window:
        # Slots sit on a grid (carriers plan in quarter and half hours): one cached Window serves
        # every parcel of a tour.
        return self._window_cached(span.start.seconds, span.end.seconds, zone, lang)

    def _when(self, seconds: int, zone: ZoneInfo, lang: _Language) -> When:
        moment = datetime.fromtimestamp(seconds, tz=UTC).astimezone(zone)
        return When(
            date=self.date(moment.date(), lang.date_pattern, lang.locale_id),
            time=self.time(moment.hour, moment.minute, lang.locale_id),
        )

    def _window(self, start_s: int, end_s: int, zone: ZoneInfo, lang: _Language) -> Window:
        start = datetime.fromtimestamp(start_s, tz=UTC).astimezone(zone)
        end = datetime.fromtimestamp(end_s, tz=UTC).astimezone(zone)
        start_day = start.date()
        # A slot ending at midnight reads "between 22:00 and 00:00", not as a two-day slot.
        same_day = end.date() == start_day or (
            end.date().toordinal() == start_day.toordinal() + 1 and (end.hour, end.minute) == (0, 0)
        )
        return Window(
            date=self.date(start_day, lang.date_pattern, lang.locale_id),
            start=self.time(start.hour, start.minute, lang.locale_id),
            end=self.time(end.hour, end.minute, lang.locale_id),
            end_date="" if same_day else self.date(end.date(), lang.date_pattern, lang.locale_id),
        )


def _parse_language(tag: str) -> _Language:
    """'fr-CH' -> French catalogue, fr_CH formatting; anything we do not write -> English (en_GB)."""
    try:
        locale = Locale.parse(tag.strip().replace("-", "_")) if tag.strip() else None
    except (UnknownLocaleError, ValueError, TypeError):
        primary = tag.strip().replace("-", "_").partition("_")[0].lower()
        locale = Locale.parse(primary) if primary in LANGUAGES else None
    if locale is None or locale.language not in LANGUAGES:
        locale = Locale.parse(_PLAIN_LANGUAGE_LOCALE[FALLBACK_LANGUAGE])
    elif locale.territory is None:
        locale = Locale.parse(_PLAIN_LANGUAGE_LOCALE[locale.language])
    code = locale.language
    pattern = _DATE_PATTERN[code]
    if code == "en" and locale.date_formats["full"].pattern.startswith("EEEE, MMMM"):
        pattern = _MONTH_FIRST_DATE_PATTERN
    return _Language(code=code, locale_id=str(locale), region=locale.territory or "", date_pattern=pattern)


# --- templates --------------------------------------------------------------------------------------


class _Catalogue:
    """One Jinja environment (the built-in templates, or a merchant's overrides over them) and the
    templates it compiled, looked up once per (kind, language)."""

    def __init__(self, search_path: list[Path]) -> None:
        self.env = Environment(
            loader=ChoiceLoader([FileSystemLoader(path) for path in search_path]),
            autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml"), default=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            # Templates never change under a running gateway: skip the per-render staleness check.
            auto_reload=False,
            cache_size=1000,
        )
        self._messages: dict[tuple[str, str], Template] = {}
        self._phrases: dict[str, Any] = {}
        self.email_html = self.env.get_template("email/message.html")
        self.email_text = self.env.get_template("email/message.txt")

    def compile_all(self) -> None:
        """Every language's phrases and catalogue entries, compiled now rather than at first use."""
        for lang in LANGUAGES:
            self.phrases(lang)
            for kind in _KIND_NAMES.values():
                self.message(kind, lang)

    def message(self, kind: str, lang: str) -> Template:
        key = (kind, lang)
        template = self._messages.get(key)
        if template is None:
            template = self._messages[key] = self.env.get_template(f"messages/{lang}/{kind}.txt")
        return template

    def phrases(self, lang: str) -> Any:
        """The language's ``_phrases.txt`` as a module: its macros and constants, built once."""
        module = self._phrases.get(lang)
        if module is None:
            module = self._phrases[lang] = self.env.get_template(f"messages/{lang}/_phrases.txt").module
        return module


def _part(entry: Any, name: str) -> str:
    """One sentence macro of a catalogue entry, rendered; "" when the entry does not define it."""
    macro = getattr(entry, name, None)
    return "" if macro is None else str(macro()).strip()


def _paragraphs(text: str) -> tuple[str, ...]:
    return tuple(" ".join(part.split()) for part in _PARAGRAPH_BREAK_RE.split(text) if part.strip())


# --- reuse ------------------------------------------------------------------------------------------

_SMS: Final = types_pb2.CHANNEL_SMS
# An id of these characters, at most _ID_MAX_CHARS long, reads the same after everything a message
# does to it (clean_line, HTML escaping, URL quoting, GSM-7, whitespace folding). A message is then
# rendered once per set of facts with a stand-in id as long as the longest such id, and each parcel's
# copy is the stand-in replaced by its id: a burst of notices costs a few string replacements, not a
# run of the templates each (~90 us per email). Merchants' overrides are always rendered in full: who
# knows what their templates do with an id.
_PLAIN_ID_RE: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{_ID_MAX_CHARS}}}")
_STAND_IN_ID: Final = "Zq7" + "x" * (_ID_MAX_CHARS - 6) + "7qZ"
# Sets of facts kept (kind, channel, locale, zone, slot, ...): a day's slots on a grid times the
# languages and kinds fit many times over; an email is a few kB.
_STENCILS_MAX_ENTRIES: Final = 8192


def _finish(texts: tuple[str, str, str], data: dict[str, str], *, sms: bool) -> Rendered:
    subject, text, html = texts
    return Rendered(subject=subject, text=fit_sms(text) if sms else text, html=html, data=data)


@dataclass(frozen=True, slots=True)
class _Stencil:
    """A message rendered for the stand-in id, cut where the id stands: filling a parcel's id in is
    a join, not a search through the email's HTML for every notice."""

    subject: tuple[str, ...]
    text: tuple[str, ...]
    html: tuple[str, ...]

    @classmethod
    def cut(cls, texts: tuple[str, str, str]) -> _Stencil:
        subject, text, html = (tuple(part.split(_STAND_IN_ID)) for part in texts)
        return cls(subject, text, html)

    def fill(self, parcel_id: str, data: dict[str, str], *, sms: bool) -> Rendered:
        texts = (parcel_id.join(self.subject), parcel_id.join(self.text), parcel_id.join(self.html))
        return _finish(texts, data, sms=sms)


def _facts_key(
    notice: notice_pb2.Notice, kind: str, channel: types_pb2.Channel.ValueType, locale: str, time_zone: str
) -> tuple[Any, ...]:
    """Everything but the parcel id that the templates see (``Renderer._facts``), from the notice."""
    slot = (notice.slot.start.seconds, notice.slot.end.seconds) if notice.HasField("slot") else None
    previous = notice.previous_slot
    promised = notice.promised_date
    return (
        kind,
        channel,
        locale,
        time_zone,
        notice.actionable,
        notice.exception_reason,
        notice.parcel_status == types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER,
        slot,
        (previous.start.seconds, previous.end.seconds) if notice.HasField("previous_slot") else None,
        notice.pickup_point.SerializeToString(deterministic=True)
        if notice.HasField("pickup_point")
        else None,
        notice.deadline.seconds if notice.HasField("deadline") else None,
        (promised.year, promised.month, promised.day) if notice.HasField("promised_date") else None,
    )


class Renderer:
    """Renders notices for every channel. Build one per process; it is safe to share between tasks
    (rendering is synchronous and the caches only grow up to their bounds)."""

    def __init__(
        self,
        override_dir: Path | None = None,
        *,
        link_base: str = DEFAULT_LINK_BASE,
        reuse_messages: bool = True,
    ) -> None:
        """``reuse_messages=False`` runs the templates for every notice (tests compare both ways)."""
        parts = urlsplit(link_base)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query or parts.fragment:
            raise RenderError(f"link_base: {link_base!r} is not an http(s) base URL")
        self._link_base = link_base.rstrip("/")
        self._override_dir = override_dir.resolve() if override_dir is not None else None
        self._builtin = _Catalogue([BUILTIN_TEMPLATES])
        self._merchants: dict[str, _Catalogue] = {}
        self._languages: dict[str, _Language] = {}
        self._formats = _Formats()
        self._reuse = reuse_messages
        self._stencils: dict[tuple[Any, ...], _Stencil | None] = {}

    # The public surface ------------------------------------------------------------------------------

    def render(
        self,
        notice: notice_pb2.Notice,
        *,
        channel: types_pb2.Channel.ValueType,
        locale: str,
        time_zone: str,
    ) -> Rendered:
        """The notice's message for one channel, in the language of ``locale`` (a BCP 47 or Babel
        tag such as "fr-CH"; English when it names no language relais writes) with dates and times in
        ``time_zone`` (an IANA name; "" means UTC).

        Raises ``RenderError`` naming the field when the notice lacks what its kind needs, the zone is
        unknown, the channel unspecified, or a merchant's template is broken.
        """
        kind = _KIND_NAMES.get(notice.kind)
        if kind is None:
            raise RenderError(f"kind: cannot render a notice of kind {notice.kind}")
        if channel not in _CHANNELS:
            raise RenderError(f"channel: cannot render for channel {channel}")
        _check_required(notice)
        try:
            catalogue = self._catalogue(notice.merchant_id)
            parcel_id = notice.parcel_id
            if self._reuse and catalogue is self._builtin and _PLAIN_ID_RE.fullmatch(parcel_id):
                stencil = self._stencil(notice, kind, channel, locale, time_zone)
                if stencil is not None:
                    # A plain id needs no quoting in the deep link.
                    return stencil.fill(parcel_id, self._data(notice, kind, parcel_id), sms=channel == _SMS)
            texts = self._texts(
                notice, parcel_id, kind, channel, self._language(locale), time_zone, catalogue
            )
            quoted_id = quote(parcel_id, safe="")
            return _finish(texts, self._data(notice, kind, quoted_id), sms=channel == _SMS)
        except TemplateError as error:
            # A broken template (most likely a merchant's override) names itself, never the data.
            where = getattr(error, "name", None) or f"messages/*/{kind}.txt"
            raise RenderError(f"template: {where} ({type(error).__name__}: {error.message})") from None

    def warm(self) -> None:
        """Compile the built-in templates and load each language's formatting data now: a quarter of
        a second of CPU that would otherwise stall the first batches after a start."""
        self._builtin.compile_all()
        for code in LANGUAGES:
            lang = self._language(code)
            self._formats.date(date(2026, 1, 1), lang.date_pattern, lang.locale_id)
            self._formats.time(12, 0, lang.locale_id)

    # Pieces ------------------------------------------------------------------------------------------

    def _stencil(
        self,
        notice: notice_pb2.Notice,
        kind: str,
        channel: types_pb2.Channel.ValueType,
        locale: str,
        time_zone: str,
    ) -> _Stencil | None:
        """The message of these facts with the stand-in id, rendered once; None when it cannot be
        reused (a subject so long that a longer id would be cut differently)."""
        key = _facts_key(notice, kind, channel, locale, time_zone)
        try:
            return self._stencils[key]
        except KeyError:
            pass
        if len(self._stencils) >= _STENCILS_MAX_ENTRIES:
            self._stencils.clear()
        lang = self._language(locale)
        texts = self._texts(notice, _STAND_IN_ID, kind, channel, lang, time_zone, self._builtin)
        # A cut subject ends exactly at the cap: one shorter than it was not cut, nor is it with any
        # plain id in place of the stand-in (at most as long).
        stencil = _Stencil.cut(texts) if len(texts[0]) < _SUBJECT_MAX_CHARS else None
        self._stencils[key] = stencil
        return stencil

    @staticmethod
    def _data(notice: notice_pb2.Notice, kind: str, quoted_id: str) -> dict[str, str]:
        data = {"parcel_id": notice.parcel_id, "kind": kind, "version": str(notice.version)}
        if notice.actionable:
            data["deep_link"] = DEEP_LINK_PREFIX + quoted_id
        return data

    def _texts(
        self,
        notice: notice_pb2.Notice,
        parcel_id: str,
        kind: str,
        channel: types_pb2.Channel.ValueType,
        lang: _Language,
        time_zone: str,
        catalogue: _Catalogue,
    ) -> tuple[str, str, str]:
        """(subject, text, html) of the notice as the templates write it for ``parcel_id``; an SMS
        text is not fitted to its segments yet."""
        template = catalogue.message(kind, lang.code)
        link = self._link(notice, parcel_id)
        # Running the entry's module only defines its macros; each part renders when asked for. The
        # facts dict, fresh per call, is the whole context (shared): no copy of Jinja's globals.
        entry = template.make_module(
            self._facts(notice, parcel_id, lang, time_zone, link, catalogue), shared=True
        )
        if channel == types_pb2.CHANNEL_SMS:
            return "", _part(entry, "sms"), ""
        if channel == types_pb2.CHANNEL_PUSH:
            title = _part(entry, "push_title") or _part(entry, "subject")
            body = _part(entry, "push_body") or _part(entry, "lead")
            return clean_line(title, _SUBJECT_MAX_CHARS), " ".join(body.split()), ""
        parts = self._email_parts(entry, parcel_id, lang, link, catalogue)
        variables = {"m": parts}
        return (
            parts.subject,
            catalogue.email_text.render(variables).strip() + "\n",
            catalogue.email_html.render(variables),
        )

    # Pieces ------------------------------------------------------------------------------------------

    def _language(self, tag: str) -> _Language:
        lang = self._languages.get(tag)
        if lang is None:
            if len(self._languages) >= _CACHE_MAX_ENTRIES:
                self._languages.clear()
            lang = self._languages[tag] = _parse_language(tag)
        return lang

    def _catalogue(self, merchant_id: str) -> _Catalogue:
        if self._override_dir is None or not merchant_id:
            return self._builtin
        catalogue = self._merchants.get(merchant_id)
        if catalogue is None:
            if len(self._merchants) >= _CACHE_MAX_ENTRIES:
                self._merchants.clear()
            directory = self._merchant_dir(merchant_id)
            catalogue = self._builtin if directory is None else _Catalogue([directory, BUILTIN_TEMPLATES])
            self._merchants[merchant_id] = catalogue
        return catalogue

    def _merchant_dir(self, merchant_id: str) -> Path | None:
        """The merchant's override directory, if it has one. The id must look like an id (no slash, no
        leading dot) and the directory must resolve inside the override root, symlinks included."""
        assert self._override_dir is not None
        if not _MERCHANT_DIR_RE.fullmatch(merchant_id):
            return None
        directory = (self._override_dir / merchant_id).resolve()
        if directory.parent != self._override_dir or not directory.is_dir():
            return None
        return directory

    def _link(self, notice: notice_pb2.Notice, parcel_id: str) -> str:
        # Only actionable notices may carry a link: an unpaid order's notice is information only.
        if not notice.actionable:
            return ""
        return f"{self._link_base}/p/{quote(parcel_id, safe='')}"

    def _facts(
        self,
        notice: notice_pb2.Notice,
        parcel_id: str,
        lang: _Language,
        time_zone: str,
        link: str,
        catalogue: _Catalogue,
    ) -> dict[str, Any]:
        zone = self._formats.zone(time_zone)
        formats = self._formats
        facts: dict[str, Any] = {
            "p": catalogue.phrases(lang.code),
            "region": lang.region,
            "parcel_id": clean_line(parcel_id, _ID_MAX_CHARS),
            "link": link,
            "reason": _REASON_NAMES.get(notice.exception_reason, "other"),
            "returned": notice.parcel_status == types_pb2.TRACKING_STATUS_RETURNED_TO_SENDER,
            "slot": formats.window(notice.slot, zone, lang) if notice.HasField("slot") else None,
            "previous_slot": (
                formats.window(notice.previous_slot, zone, lang) if notice.HasField("previous_slot") else None
            ),
            "pickup": self._place(notice, zone, lang) if notice.HasField("pickup_point") else None,
            "promised_date": "",
        }
        promised = notice.promised_date
        if notice.HasField("promised_date") and promised.year > 0:
            try:
                day = date(promised.year, promised.month, promised.day)
            except ValueError:
                raise RenderError("promised_date: not a calendar date") from None
            facts["promised_date"] = formats.date(day, lang.date_pattern, lang.locale_id)
        return facts

    def _place(self, notice: notice_pb2.Notice, zone: ZoneInfo, lang: _Language) -> Place:
        point = notice.pickup_point
        address = point.address
        town = clean_line(f"{address.postal_code} {address.city}", _ADDRESS_MAX_CHARS)
        lines = [clean_line(line, _ADDRESS_MAX_CHARS) for line in address.lines]
        deadline = point.deadline if point.HasField("deadline") else None
        if deadline is None and notice.HasField("deadline"):
            deadline = notice.deadline
        return Place(
            id=clean_line(point.id, _ID_MAX_CHARS),
            name=clean_line(point.name, _NAME_MAX_CHARS),
            address=clean_line(", ".join(part for part in (*lines, town) if part), _ADDRESS_MAX_CHARS),
            opening_hours=clean_line(point.opening_hours, _HOURS_MAX_CHARS),
            deadline=None if deadline is None else self._formats.when(deadline, zone, lang),
        )

    def _email_parts(
        self, entry: Any, raw_parcel_id: str, lang: _Language, link: str, catalogue: _Catalogue
    ) -> EmailParts:
        phrases = catalogue.phrases(lang.code)
        action = ""
        if link:
            # An entry without an ``action`` macro gets the language's "track your parcel"; one with an
            # empty macro (delivered, returned) gets no button at all.
            action = _part(entry, "action") if hasattr(entry, "action") else str(phrases.track_action)
        parcel_id = clean_line(raw_parcel_id, _ID_MAX_CHARS)
        return EmailParts(
            lang=lang.code,
            parcel_id=parcel_id,
            subject=clean_line(_part(entry, "subject"), _SUBJECT_MAX_CHARS),
            lead=" ".join(_part(entry, "lead").split()),
            paragraphs=_paragraphs(_part(entry, "details")),
            highlight=_lines(_part(entry, "highlight").splitlines()),
            action=clean_line(action, _SUBJECT_MAX_CHARS),
            link=link if action else "",
            greeting=str(phrases.greeting),
            signoff=str(phrases.signoff(lang.region)).strip(),
            tracking=str(phrases.tracking(parcel_id)).strip(),
            footer=str(phrases.footer),
        )


def _lines(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(line for line in (" ".join(raw.split()) for raw in lines) if line)


def _check_required(notice: notice_pb2.Notice) -> None:
    if notice.kind in _NEEDS_SLOT and not notice.HasField("slot"):
        raise RenderError("slot: required for a slot notice")
    if notice.kind == types_pb2.NOTICE_KIND_SLOT_CORRECTED and not notice.HasField("previous_slot"):
        raise RenderError("previous_slot: required for a slot correction")
    if notice.kind in _NEEDS_PICKUP:
        point = notice.pickup_point
        # A name or an address is shown when the carrier gives one, but a notice never waits for it:
        # anything that says which point will do, as long as it still says something once cleaned.
        names = (point.id, point.name, *point.address.lines, point.address.postal_code, point.address.city)
        if not any(clean_line(text, _ID_MAX_CHARS) for text in names):
            raise RenderError("pickup_point.id: required for a pickup notice")
