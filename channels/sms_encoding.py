"""SMS text encoding and segmentation (pure; 3GPP TS 23.038 and TS 23.040).

A text that fits the GSM 03.38 alphabet goes as GSM-7: 160 septets in one SMS, 153 per segment when
concatenated (the user data header takes the rest). The extension characters ``^{}\\[~]|€`` and form
feed cost two septets (escape + character) and an escape pair is never split across segments. Any
other character forces UCS-2: 70 UTF-16 units in one SMS, 67 per segment, and a surrogate pair
(an emoji) is never split either. Operators bill per segment, so this decides the cost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# GSM 03.38 basic character set (the escape 0x1B itself excluded: it is not a character to send).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Basic set extension table: each costs the escape septet plus its own.
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

GSM7_SINGLE_SEPTETS = 160
GSM7_SEGMENT_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_SEGMENT_UNITS = 67


class SmsEncoding(enum.Enum):
    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


@dataclass(frozen=True, slots=True)
class SmsParts:
    encoding: SmsEncoding
    # Septets (GSM-7) or UTF-16 code units (UCS-2) of the whole text.
    units: int
    # The text of each segment as it will be billed; one (possibly empty) segment at least.
    segments: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.segments)

    def cost_micros(self, price_per_segment_micros: int) -> int:
        return self.count * price_per_segment_micros


def is_gsm7(text: str) -> bool:
    return all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text)


def _gsm7_units(char: str) -> int:
    return 2 if char in GSM7_EXTENSION else 1


def _ucs2_units(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


def split(text: str) -> SmsParts:
    """Choose the encoding and cut the text into the segments an operator would bill."""
    if is_gsm7(text):
        encoding, units_of = SmsEncoding.GSM7, _gsm7_units
        single, per_segment = GSM7_SINGLE_SEPTETS, GSM7_SEGMENT_SEPTETS
    else:
        encoding, units_of = SmsEncoding.UCS2, _ucs2_units
        single, per_segment = UCS2_SINGLE_UNITS, UCS2_SEGMENT_UNITS
    costs = [units_of(char) for char in text]
    total = sum(costs)
    if total <= single:
        return SmsParts(encoding, total, (text,))
    segments: list[str] = []
    start, used = 0, 0
    for index, cost in enumerate(costs):
        # A two-unit character that does not fit opens the next segment whole.
        if used + cost > per_segment:
            segments.append(text[start:index])
            start, used = index, 0
        used += cost
    segments.append(text[start:])
    return SmsParts(encoding, total, tuple(segments))
