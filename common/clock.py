"""The one clock. Engine and gateway take time from a ``Clock`` so tests can control it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf import timestamp_pb2


class Clock(Protocol):
    def now_ms(self) -> int:
        """Unix time in milliseconds, UTC."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to: for tests."""

    def __init__(self, start_ms: int) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def set_ms(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def advance_ms(self, delta_ms: int) -> None:
        self._now_ms += delta_ms


def to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def from_datetime(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def stamp_ms(stamp: timestamp_pb2.Timestamp) -> int:
    """``stamp`` in unix ms, without ``ToMilliseconds``'s range check on every call: this runs per event
    (validation, timeline order, counters, alert facts) and per notice the gateway sends."""
    return stamp.seconds * 1000 + stamp.nanos // 1_000_000
