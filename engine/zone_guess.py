"""The time zone a recipient most likely lives in, for preferences that name none.

Quiet hours, the end of a promised day and every time a message shows are read in the recipient's
zone; UTC would put a Swiss recipient's 14:00-16:00 slot at 13:00-15:00. So a missing zone is taken
from what the preferences do say, most precise first: the phone number (its area, through
``phonenumbers``' time-zone data), then the region, then the locale's region (``fr-CH``,
``sr-Latn-RS``, ``de-756``). A country stands for one zone only when all of its zones keep the same
time (Germany's Berlin and Büsingen); a country whose zones differ (the United States) tells
nothing, and the zone stays UTC until the recipient sets one.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from zoneinfo import ZoneInfo

import phonenumbers
from babel.core import get_global
from phonenumbers import timezone as phone_timezones

FALLBACK = "UTC"


@cache
def _zones_by_country() -> dict[str, tuple[str, ...]]:
    """zone.tab of the tzdata package: each country's zones, its principal one first."""
    table = importlib.resources.files("tzdata").joinpath("zoneinfo", "zone.tab").read_text()
    zones: dict[str, list[str]] = {}
    for line in table.splitlines():
        if line and not line.startswith("#"):
            country, _coordinates, name, *_comment = line.split("\t")
            zones.setdefault(country, []).append(name)
    return {country: tuple(names) for country, names in zones.items()}


@cache
def country_zone(region: str) -> str | None:
    """The zone of a country whose zones all keep the same time (winter and summer), else None."""
    names = _zones_by_country().get(region.upper())
    if not names:
        return None
    year = datetime.now(UTC).year
    instants = (datetime(year, 1, 15, tzinfo=UTC), datetime(year, 7, 15, tzinfo=UTC))
    clocks = {tuple(instant.astimezone(ZoneInfo(name)).utcoffset() for instant in instants) for name in names}
    return names[0] if len(clocks) == 1 else None


def phone_zone(e164: str) -> str | None:
    """The zone of a phone number's area when it has exactly one (a mobile number: its country's)."""
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:
        return None
    zones = phone_timezones.time_zones_for_number(number)
    if len(zones) == 1 and zones[0] in known_zones():
        return zones[0]
    return country_zone(phonenumbers.region_code_for_number(number) or "")


@cache
def known_zones() -> frozenset[str]:
    """The IANA zone names, from the tzdata package's list (read once). Not ``available_timezones()``:
    it also lists whatever files the host's zoneinfo directory holds ("localtime", "posixrules",
    "posix/..." on some systems), and ZoneInfo alone would load any of them. "Factory" is tzdata's
    placeholder for a machine whose zone was never set, not a place."""
    names = importlib.resources.files("tzdata").joinpath("zones").read_text().split()
    return frozenset(names) - {"Factory"}


@cache
def _numeric_regions() -> dict[str, str]:
    """UN M.49 country codes ("756") to ISO 3166 ones ("CH"), from CLDR; groups of countries ("419",
    Latin America; "200", the former Czechoslovakia) are left out: they tell no zone."""
    aliases: Mapping[str, list[str]] = get_global("territory_aliases")
    return {
        code: names[0]
        for code, names in aliases.items()
        if code.isdigit() and len(names) == 1 and names[0].isalpha()
    }


def locale_region(locale: str) -> str:
    """The region of a BCP 47 tag, language[-script][-region][-variant...] ("sr-Latn-RS" → "RS"), as
    an ISO 3166 code; "" when it names none or a group of countries."""
    subtags = locale.split("-")[1:3]
    # A script is four letters; a variant of four starts with a digit ("de-1996").
    if subtags and len(subtags[0]) == 4 and subtags[0].isalpha():
        del subtags[0]
    region = subtags[0] if subtags else ""
    if len(region) == 2 and region.isalpha():
        return region
    if len(region) == 3 and region.isdigit():
        return _numeric_regions().get(region, "")
    return ""


def guess_zone(*, phone: str, region: str, locale: str) -> str:
    """The zone for preferences without one: from the phone, the region, the locale, else UTC."""
    locale_country = locale_region(locale)
    return (
        (phone and phone_zone(phone))
        or (region and country_zone(region))
        or (locale_country and country_zone(locale_country))
        or FALLBACK
    )
