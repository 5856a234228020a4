"""GSM-7 / UCS-2 detection and segment counting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.sms_encoding import GSM7_BASIC, GSM7_EXTENSION, SmsEncoding, split


@pytest.mark.parametrize(
    ("text", "encoding", "units", "count"),
    [
        ("", SmsEncoding.GSM7, 0, 1),
        ("Your parcel arrives Tuesday 14:00-16:00.", SmsEncoding.GSM7, 40, 1),
        ("Paket für Sie: Zürich, Ölweg 5 ÄÖÜäöüß é à", SmsEncoding.GSM7, 42, 1),
        ("a" * 160, SmsEncoding.GSM7, 160, 1),
        ("a" * 161, SmsEncoding.GSM7, 161, 2),
        ("a" * 306, SmsEncoding.GSM7, 306, 2),
        ("a" * 307, SmsEncoding.GSM7, 307, 3),
        ("€" * 80, SmsEncoding.GSM7, 160, 1),
        ("€" * 81, SmsEncoding.GSM7, 162, 2),
        ("{}[]~|^\\\f", SmsEncoding.GSM7, 18, 1),
        ("Colis: arrivée ç", SmsEncoding.UCS2, 16, 1),  # lower-case ç is not GSM-7
        ("Посылка", SmsEncoding.UCS2, 7, 1),
        ("ä" * 69 + "ł", SmsEncoding.UCS2, 70, 1),
        ("ł" * 71, SmsEncoding.UCS2, 71, 2),
        ("ł" * 134, SmsEncoding.UCS2, 134, 2),
        ("ł" * 135, SmsEncoding.UCS2, 135, 3),
        ("📦" * 35, SmsEncoding.UCS2, 70, 1),
        ("📦" * 36, SmsEncoding.UCS2, 72, 2),
    ],
)
def test_encoding_units_and_segments(text: str, encoding: SmsEncoding, units: int, count: int) -> None:
    parts = split(text)
    assert (parts.encoding, parts.units, parts.count) == (encoding, units, count)
    assert "".join(parts.segments) == text


def test_an_escape_pair_never_straddles_a_segment_boundary() -> None:
    # 152 plain septets then '€' (2 septets): 154 > 153, so the euro opens the second segment.
    parts = split("a" * 152 + "€" + "b" * 10)
    assert parts.encoding is SmsEncoding.GSM7
    assert parts.segments == ("a" * 152, "€" + "b" * 10)


def test_a_surrogate_pair_never_straddles_a_segment_boundary() -> None:
    parts = split("ł" * 66 + "📦" + "ł" * 10)
    assert parts.segments == ("ł" * 66, "📦" + "ł" * 10)


def test_cost_is_per_segment() -> None:
    assert split("a" * 161).cost_micros(75_000) == 150_000


gsm_text = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=700)


@given(gsm_text)
def test_gsm7_segments_respect_the_septet_budget(text: str) -> None:
    parts = split(text)
    assert parts.encoding is SmsEncoding.GSM7
    assert "".join(parts.segments) == text
    budget = 160 if parts.count == 1 else 153
    for segment in parts.segments:
        assert sum(2 if c in GSM7_EXTENSION else 1 for c in segment) <= budget


@given(st.text(min_size=1, max_size=400).filter(lambda t: any(c not in GSM7_BASIC for c in t)))
def test_ucs2_segments_respect_the_unit_budget(text: str) -> None:
    parts = split(text)
    assert "".join(parts.segments) == text
    if parts.encoding is SmsEncoding.UCS2:
        budget = 70 if parts.count == 1 else 67
        for segment in parts.segments:
            assert len(segment.encode("utf-16-le")) // 2 <= budget
