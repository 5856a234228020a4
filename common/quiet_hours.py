"""Quiet hours: when a notice may go out, in the recipient's own wall-clock time.

Quiet hours are a window of local wall-clock minutes ``[start, end)`` after local midnight, possibly
crossing midnight (``(1320, 420)`` is 22:00 to 07:00). Whether an instant is quiet depends only on the
wall clock it shows in the recipient's IANA time zone, so a 22:00-07:00 window ends at 07:00 local time on
a night that is 8 hours long (spring forward) and on one that is 10 hours long (fall back).

Wall-clock oddities around daylight-saving changes, read the way a person would:

- a wall time that does not exist (skipped by spring forward, e.g. 02:30 in Paris on the last Sunday of
  March) is passed at the moment of the jump: a window ending at 02:30 ends at 03:00 summer time;
- a wall time that happens twice (fall back) is reached first at its earlier occurrence (``fold=0``); if
  the clock then falls back into the window, that stretch is quiet again.

Both functions are pure and take time zones by name; ``zoneinfo`` caches the zones.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MINUTES_PER_DAY = 24 * 60
_MS_PER_S = 1000
_MS_PER_MINUTE = 60 * _MS_PER_S
_MS_PER_DAY = MINUTES_PER_DAY * _MS_PER_MINUTE
# The longest quiet stretch is a window of 1439 minutes lengthened by a DST change; looking this far
# either side of an instant always finds the change points that bound it.
_HORIZON_DAYS = 2
_HORIZON_MS = _HORIZON_DAYS * 24 * 3600 * _MS_PER_S


def zone(time_zone: str) -> ZoneInfo:
    """The IANA zone named ``time_zone`` (empty means UTC); ``ValueError`` names the argument."""
    try:
        return ZoneInfo(time_zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("time_zone is not an IANA time zone") from None


def _window(quiet: tuple[int, int] | None) -> tuple[int, int] | None:
    """The window, or None when there are no quiet hours (None, or start == end)."""
    if quiet is None:
        return None
    start, end = quiet
    if not (0 <= start < MINUTES_PER_DAY and 0 <= end < MINUTES_PER_DAY):
        raise ValueError("quiet hours minutes must be 0 to 1439")
    return None if start == end else (start, end)


def _local(at_ms: int, tz: ZoneInfo) -> datetime:
    # Wall minutes depend on whole seconds only, so integer seconds avoid float rounding.
    return datetime.fromtimestamp(at_ms // _MS_PER_S, tz)


def _minute_quiet(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # crosses midnight


def _quiet(at_ms: int, window: tuple[int, int], tz: ZoneInfo) -> bool:
    local = _local(at_ms, tz)
    return _minute_quiet(local.hour * 60 + local.minute, window)


def is_quiet(at_ms: int, quiet: tuple[int, int] | None, time_zone: str) -> bool:
    """Whether ``at_ms`` (unix ms) falls in the quiet hours, read on the wall clock of ``time_zone``."""
    window = _window(quiet)
    return window is not None and _quiet(at_ms, window, zone(time_zone))


def _offset_s(at_ms: int, tz: ZoneInfo) -> float:
    offset = _local(at_ms, tz).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


def _transition_ms(low_ms: int, high_ms: int, tz: ZoneInfo) -> int | None:
    """The first instant in ``(low_ms, high_ms]`` with another UTC offset than ``low_ms``, if any.

    Zones change offset at most once in a couple of days, so a bisection over whole seconds finds it.
    """
    before = _offset_s(low_ms, tz)
    if _offset_s(high_ms, tz) == before:
        return None
    low_s, high_s = low_ms // _MS_PER_S, -(-high_ms // _MS_PER_S)
    while high_s - low_s > 1:
        mid_s = (low_s + high_s) // 2
        if _offset_s(mid_s * _MS_PER_S, tz) == before:
            low_s = mid_s
        else:
            high_s = mid_s
    return high_s * _MS_PER_S


def _wall_ms(day: date, minute: int, fold: int, tz: ZoneInfo) -> int | None:
    """The instant showing ``minute`` on ``day``, or None when that wall time does not exist."""
    wall = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=tz, fold=fold)
    at_ms = round(wall.timestamp()) * _MS_PER_S
    back = _local(at_ms, tz)
    if (back.date(), back.hour * 60 + back.minute) != (day, minute):
        return None  # skipped by a spring-forward jump: the transition itself is the change point
    return at_ms


def _change_points(at_ms: int, window: tuple[int, int], tz: ZoneInfo) -> list[int]:
    """Every instant near ``at_ms`` where quietness may flip, sorted.

    Quietness only flips where the wall clock reaches the window's start or end, or where it jumps
    (an offset transition).
    """
    today = _local(at_ms, tz).date()
    points: set[int] = set()
    for days in range(-_HORIZON_DAYS, _HORIZON_DAYS + 1):
        day = today + timedelta(days=days)
        for minute in window:
            for fold in (0, 1):
                point = _wall_ms(day, minute, fold, tz)
                if point is not None:
                    points.add(point)
    for low, high in ((at_ms - _HORIZON_MS, at_ms), (at_ms, at_ms + _HORIZON_MS)):
        jump = _transition_ms(low, high, tz)
        if jump is not None:
            points.add(jump)
    return sorted(points)


def _steady_offset_ms(at_ms: int, tz: ZoneInfo) -> int | None:
    """The UTC offset around ``at_ms`` when it does not change within the horizon either side.

    Then local time is UTC plus a constant and the window's edges are plain arithmetic: the fast
    path, taken everywhere but in the days around a DST change (planning calls this per notice).
    """
    offset = _offset_s(at_ms, tz)
    if _offset_s(at_ms - _HORIZON_MS, tz) != offset or _offset_s(at_ms + _HORIZON_MS, tz) != offset:
        return None
    return int(offset) * _MS_PER_S


def _wall_edge_ms(at_ms: int, offset_ms: int, minute: int, *, after: bool) -> int:
    """The instant ``minute`` is next shown after ``at_ms`` (or last shown at or before it)."""
    local_ms = at_ms + offset_ms
    edge_ms = local_ms - local_ms % _MS_PER_DAY + minute * _MS_PER_MINUTE
    if after and edge_ms <= local_ms:
        edge_ms += _MS_PER_DAY
    elif not after and edge_ms > local_ms:
        edge_ms -= _MS_PER_DAY
    return edge_ms - offset_ms


def _quiet_end_ms(at_ms: int, window: tuple[int, int], tz: ZoneInfo) -> int:
    """The first instant after quiet ``at_ms`` that is not quiet."""
    offset_ms = _steady_offset_ms(at_ms, tz)
    if offset_ms is not None:
        return _wall_edge_ms(at_ms, offset_ms, window[1], after=True)
    for point in _change_points(at_ms, window, tz):
        if point > at_ms and not _quiet(point, window, tz):
            return point
    raise AssertionError("a quiet window always ends within the horizon")


def _quiet_start_ms(at_ms: int, window: tuple[int, int], tz: ZoneInfo) -> int:
    """The instant the quiet stretch holding quiet ``at_ms`` began."""
    offset_ms = _steady_offset_ms(at_ms, tz)
    if offset_ms is not None:
        return _wall_edge_ms(at_ms, offset_ms, window[0], after=False)
    for point in reversed(_change_points(at_ms, window, tz)):
        if point <= at_ms and _quiet(point, window, tz) and not _quiet(point - 1, window, tz):
            return point
    raise AssertionError("a quiet window always starts within the horizon")


def allowed_send_ms(
    desired_ms: int,
    now_ms: int,
    quiet: tuple[int, int] | None,
    time_zone: str,
    deadline_ms: int | None,
) -> int:
    """When a notice wanted at ``desired_ms`` may go out, all instants in unix milliseconds.

    The rule:

    1. Start from ``max(desired_ms, now_ms)``: nothing is sent in the past.
    2. If that instant is in quiet hours, hold it to the end of the quiet stretch (the first instant
       whose local wall clock is outside ``quiet``).
    3. Never past the deadline: if the instant from step 2 is ``>= deadline_ms``, go earlier instead, to
       the latest instant before the deadline that is outside quiet hours (typically the last
       millisecond before quiet hours began) provided it is ``>= now_ms``; otherwise ``now_ms`` - the
       notice then goes out in quiet hours and the gateway may pick a quieter channel. A deadline
       already passed (``deadline_ms <= now_ms``) therefore gives ``now_ms``.

    ``quiet`` is ``(start_minute, end_minute)`` after local midnight in ``time_zone`` (IANA name,
    empty for UTC); None or ``start == end`` means no quiet hours. ``ValueError`` for minutes outside
    0-1439 or an unknown zone.
    """
    window = _window(quiet)
    tz = zone(time_zone)
    send_ms = max(desired_ms, now_ms)
    if window is not None and _quiet(send_ms, window, tz):
        send_ms = _quiet_end_ms(send_ms, window, tz)
    if deadline_ms is None or send_ms < deadline_ms:
        return send_ms
    if deadline_ms <= now_ms:
        return now_ms
    latest_ms = deadline_ms - 1
    if window is not None and _quiet(latest_ms, window, tz):
        latest_ms = _quiet_start_ms(latest_ms, window, tz) - 1
    return latest_ms if latest_ms >= now_ms else now_ms
