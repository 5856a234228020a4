"""Quiet hours in the recipient's wall-clock time, across midnight and both DST changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.quiet_hours import allowed_send_ms, is_quiet

NIGHT = (22 * 60, 7 * 60)  # 22:00-07:00, crosses midnight
LUNCH = (12 * 60, 14 * 60)  # 12:00-14:00, same day
PARIS = "Europe/Paris"


def utc_ms(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)


def test_outside_quiet_hours_keeps_desired_time() -> None:
    desired = utc_ms(2026, 3, 10, 10)  # 11:00 in Paris
    assert allowed_send_ms(desired, utc_ms(2026, 3, 10, 9), NIGHT, PARIS, None) == desired


def test_never_in_the_past() -> None:
    now = utc_ms(2026, 3, 10, 10)
    assert allowed_send_ms(now - 60_000, now, NIGHT, PARIS, None) == now


@pytest.mark.parametrize("quiet", [None, (600, 600)])
def test_no_quiet_hours(quiet: tuple[int, int] | None) -> None:
    desired = utc_ms(2026, 3, 10, 23)
    assert allowed_send_ms(desired, desired, quiet, PARIS, None) == desired
    assert not is_quiet(desired, quiet, PARIS)


def test_window_across_midnight_holds_to_local_morning() -> None:
    # 23:30 Paris (CET, UTC+1) on a plain night: held to 07:00 Paris = 06:00 UTC next day.
    desired = utc_ms(2026, 3, 10, 22, 30)
    assert allowed_send_ms(desired, desired, NIGHT, PARIS, None) == utc_ms(2026, 3, 11, 6)
    # 03:00 Paris, after midnight: same morning.
    early = utc_ms(2026, 3, 11, 2)
    assert allowed_send_ms(early, early, NIGHT, PARIS, None) == utc_ms(2026, 3, 11, 6)


def test_window_within_a_day() -> None:
    desired = utc_ms(2026, 3, 10, 11, 30)  # 12:30 Paris
    assert allowed_send_ms(desired, desired, LUNCH, PARIS, None) == utc_ms(2026, 3, 10, 13)
    assert not is_quiet(utc_ms(2026, 3, 10, 10, 59), LUNCH, PARIS)
    assert is_quiet(utc_ms(2026, 3, 10, 11), LUNCH, PARIS)
    assert not is_quiet(utc_ms(2026, 3, 10, 13), LUNCH, PARIS)


def test_window_boundaries_start_quiet_end_free() -> None:
    assert is_quiet(utc_ms(2026, 3, 10, 21), NIGHT, PARIS)  # 22:00 Paris
    assert not is_quiet(utc_ms(2026, 3, 10, 20, 59), NIGHT, PARIS)
    assert not is_quiet(utc_ms(2026, 3, 11, 6), NIGHT, PARIS)  # 07:00 Paris
    assert is_quiet(utc_ms(2026, 3, 11, 5, 59), NIGHT, PARIS)


def test_spring_forward_night_still_ends_at_seven_local() -> None:
    # Paris 2026-03-29: 02:00 CET jumps to 03:00 CEST. 23:00 CET on the 28th is 22:00 UTC; 07:00
    # CEST on the 29th is 05:00 UTC (an 8-hour night).
    desired = utc_ms(2026, 3, 28, 22)
    assert allowed_send_ms(desired, desired, NIGHT, PARIS, None) == utc_ms(2026, 3, 29, 5)


def test_fall_back_night_still_ends_at_seven_local() -> None:
    # Paris 2026-10-25: 03:00 CEST falls back to 02:00 CET. 23:00 CEST on the 24th is 21:00 UTC;
    # 07:00 CET on the 25th is 06:00 UTC (a 10-hour night).
    desired = utc_ms(2026, 10, 24, 21)
    assert allowed_send_ms(desired, desired, NIGHT, PARIS, None) == utc_ms(2026, 10, 25, 6)


def test_end_in_skipped_hour_ends_at_the_jump() -> None:
    # 22:00-02:30 on the spring-forward night: 02:30 does not exist, so the window ends when the
    # clock jumps to 03:00 CEST (01:00 UTC).
    desired = utc_ms(2026, 3, 28, 23)  # 00:00 CET
    assert allowed_send_ms(desired, desired, (1320, 150), PARIS, None) == utc_ms(2026, 3, 29, 1)


def test_end_in_repeated_hour_ends_at_first_occurrence() -> None:
    # 22:00-02:30 on the fall-back night: 02:30 CEST (00:30 UTC) comes first.
    desired = utc_ms(2026, 10, 24, 22)  # 00:00 CEST
    assert allowed_send_ms(desired, desired, (1320, 150), PARIS, None) == utc_ms(2026, 10, 25, 0, 30)
    # After falling back the clock shows 02:00-02:30 again: quiet once more, until 02:30 CET.
    second = utc_ms(2026, 10, 25, 1, 10)  # 02:10 CET
    assert is_quiet(second, (1320, 150), PARIS)
    assert allowed_send_ms(second, second, (1320, 150), PARIS, None) == utc_ms(2026, 10, 25, 1, 30)


def test_deadline_pulls_before_quiet_hours_began() -> None:
    # Wanted at 23:00 Paris, must arrive before 06:00 Paris: goes out just before 22:00 Paris.
    now = utc_ms(2026, 3, 10, 15)
    desired = utc_ms(2026, 3, 10, 22)
    deadline = utc_ms(2026, 3, 11, 5)
    assert allowed_send_ms(desired, now, NIGHT, PARIS, deadline) == utc_ms(2026, 3, 10, 21) - 1


def test_deadline_after_quiet_hours_does_not_pull() -> None:
    now = utc_ms(2026, 3, 10, 15)
    desired = utc_ms(2026, 3, 10, 22)
    deadline = utc_ms(2026, 3, 11, 8)
    assert allowed_send_ms(desired, now, NIGHT, PARIS, deadline) == utc_ms(2026, 3, 11, 6)


def test_deadline_inside_quiet_hours_already_begun_sends_now() -> None:
    now = utc_ms(2026, 3, 10, 23)  # midnight Paris, quiet
    deadline = utc_ms(2026, 3, 11, 4)
    assert allowed_send_ms(now, now, NIGHT, PARIS, deadline) == now


def test_passed_deadline_sends_now() -> None:
    now = utc_ms(2026, 3, 10, 23)
    assert allowed_send_ms(now, now, NIGHT, PARIS, now - 1) == now


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="time_zone"):
        is_quiet(0, NIGHT, "Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="0 to 1439"):
        is_quiet(0, (0, 1440), PARIS)


ZONES = st.sampled_from(["Europe/Paris", "UTC", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"])
MINUTES = st.integers(min_value=0, max_value=1439)
# 2025-2027, so that both DST changes of several zones are crossed.
INSTANTS = st.integers(min_value=utc_ms(2025, 1, 1, 0), max_value=utc_ms(2027, 12, 31, 0))
SPAN_MS = st.integers(min_value=-2 * 86_400_000, max_value=3 * 86_400_000)


@given(
    now=INSTANTS,
    desired_offset=SPAN_MS,
    deadline_offset=st.none() | SPAN_MS,
    quiet=st.none() | st.tuples(MINUTES, MINUTES),
    time_zone=ZONES,
)
def test_property_allowed_send_time(
    now: int,
    desired_offset: int,
    deadline_offset: int | None,
    quiet: tuple[int, int] | None,
    time_zone: str,
) -> None:
    desired = now + desired_offset
    deadline = None if deadline_offset is None else now + deadline_offset
    natural = allowed_send_ms(desired, now, quiet, time_zone, None)
    # Without a deadline: held only by quiet hours, to the first free instant.
    assert natural >= max(desired, now)
    assert not is_quiet(natural, quiet, time_zone)
    if natural > max(desired, now):
        assert is_quiet(natural - 1, quiet, time_zone)

    result = allowed_send_ms(desired, now, quiet, time_zone, deadline)
    assert result >= now
    if deadline is None or natural < deadline:
        assert result == natural
        return
    # Pulled by the deadline: before it when it lies ahead, outside quiet hours unless sent now,
    # and the latest such instant.
    if deadline > now:
        assert result < deadline
    if result != now:
        assert not is_quiet(result, quiet, time_zone)
        if result + 1 < deadline:
            assert is_quiet(result + 1, quiet, time_zone)
