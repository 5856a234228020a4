"""The zone guessed for preferences that name none, and when it is guessed again."""

from __future__ import annotations

import pytest
from relais.v1 import preferences_pb2

from engine.preferences import validate
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
