"""The zone guessed for preferences that name none, and when it is guessed again."""

from __future__ import annotations

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from relais.v1 import preferences_pb2

from engine.preferences import merge, validate
from engine.zone_guess import guess_zone

Prefs = preferences_pb2.RecipientPreferences


@pytest.mark.parametrize(
    ("locale", "zone"),
    [
        ("fr-CH", "Europe/Zurich"),
        ("de-Latn-CH", "Europe/Zurich"),  # a script before the region
        ("sr-Latn-RS", "Europe/Belgrade"),
        ("zh-Hant-TW", "Asia/Taipei"),
        ("de-CH-1996", "Europe/Zurich"),  # a variant after it
        ("de-756", "Europe/Zurich"),  # Switzerland's UN M.49 code
        ("es-419", "UTC"),  # Latin America: many zones
        ("de-1996", "UTC"),  # a variant, no region
        ("sr-Cyrl", "UTC"),  # a script, no region
        ("en", "UTC"),
    ],
)
def test_the_locale_region_is_found_after_a_script(locale: str, zone: str) -> None:
    assert guess_zone(phone="", region="", locale=locale) == zone
    assert validate(Prefs(recipient_id="acme/r1", locale=locale)).time_zone == zone


def updated(stored: Prefs, paths: list[str], **change: str) -> Prefs:
    return validate(merge(stored, Prefs(recipient_id="acme/r1", **change), FieldMask(paths=paths)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "paths", "change", "zone"),
    [
        # Guessed, then the data it is guessed from changes: guessed again.
        ({"locale": "en"}, ["phone"], {"phone": "+41791234567"}, "Europe/Zurich"),
        ({"phone": "+41791234567"}, ["phone"], {"phone": "+33612345678"}, "Europe/Paris"),
        ({"region": "DE"}, ["region"], {"region": "AT"}, "Europe/Vienna"),
        ({"locale": "fr-CH"}, ["locale"], {"locale": "sr-Latn-RS"}, "Europe/Belgrade"),
        ({"phone": "+41791234567"}, ["phone"], {"phone": ""}, "UTC"),
        # Given: kept whatever else changes.
        ({"locale": "en", "time_zone": "Asia/Tokyo"}, ["phone"], {"phone": "+41791234567"}, "Asia/Tokyo"),
        (
            {"phone": "+41791234567", "time_zone": "Europe/Paris"},
            ["phone"],
            {"phone": "+4915112345678"},
            "Europe/Paris",
        ),
        # Given in the same update as the new phone: theirs, even when it equals the old guess.
        ({"locale": "en"}, ["phone", "time_zone"], {"phone": "+41791234567", "time_zone": "UTC"}, "UTC"),
    ],
)
def test_a_guessed_zone_follows_its_data_and_a_given_one_stays(
    first: dict[str, str], paths: list[str], change: dict[str, str], zone: str
) -> None:
    stored = validate(Prefs(recipient_id="acme/r1", **first))  # type: ignore[arg-type]

    assert updated(stored, paths, **change).time_zone == zone
    # A change of anything else keeps the zone as it was.
    assert updated(stored, ["sms_opt_in"]).time_zone == stored.time_zone
