import calendar
import math
import time
from datetime import date
from zoneinfo import ZoneInfo

import pytest

import agentkit

PARIS = "Europe/Paris"
NEW_YORK = "America/New_York"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """Unix time of a UTC wall-clock time, computed independently of the code under test."""
    return float(calendar.timegm((year, month, day, hour, minute, 0)))


def runs(expr: str, after: float, tz: str, count: int) -> list[float]:
    """The next ``count`` runs of ``expr`` after ``after``, each found from the previous one."""
    cron = agentkit.Cron.parse(expr)
    found = []
    for _ in range(count):
        after = cron.next_after(after, tz)
        found.append(after)
    return found


def fields(cron: agentkit.Cron) -> tuple:
    """Everything a Cron matches on, without the source text."""
    return (cron.minutes, cron.hours, cron.days, cron.months, cron.weekdays, cron.either_day)


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", tuple(range(60))),
        ("5", (5,)),
        ("05", (5,)),
        ("1,2,30", (1, 2, 30)),
        ("10-15", (10, 11, 12, 13, 14, 15)),
        ("*/15", (0, 15, 30, 45)),
        ("10-30/10", (10, 20, 30)),
        ("10-35/10", (10, 20, 30)),
        ("5/20", (5, 25, 45)),
        ("58/1", (58, 59)),
        ("*/100", (0,)),
        ("1-3,7,*/20", (0, 1, 2, 3, 7, 20, 40)),
        ("3,1,3", (1, 3)),
    ],
)
def test_minute_field_syntax(text: str, expected: tuple[int, ...]) -> None:
    assert agentkit.Cron.parse(f"{text} * * * *").minutes == expected


def test_other_numeric_fields() -> None:
    cron = agentkit.Cron.parse("0 */6 1/10 */3 *")
    assert cron.hours == (0, 6, 12, 18)
    assert cron.days == (1, 11, 21, 31)
    assert cron.months == (1, 4, 7, 10)
    assert agentkit.Cron.parse("0 22/1 * * *").hours == (22, 23)
    assert agentkit.Cron.parse("* * * * *").days == tuple(range(1, 32))
    assert agentkit.Cron.parse("* * * * *").months == tuple(range(1, 13))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("JAN", (1,)),
        ("jan,Mar", (1, 3)),
        ("Jun-AUG", (6, 7, 8)),
        ("jan/4", (1, 5, 9)),
        ("oct-dec/2", (10, 12)),
        ("feb,11-dec", (2, 11, 12)),
    ],
)
def test_month_names(text: str, expected: tuple[int, ...]) -> None:
    assert agentkit.Cron.parse(f"0 0 1 {text} *").months == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", (0, 1, 2, 3, 4, 5, 6)),
        ("MON-FRI", (1, 2, 3, 4, 5)),
        ("sun,SAT", (0, 6)),
        ("0", (0,)),
        ("7", (0,)),
        ("0,7", (0,)),
        ("5-7", (0, 5, 6)),
        ("*/2", (0, 2, 4, 6)),
        ("*/7", (0,)),
        ("thu/2", (4, 6)),
        ("Wed", (3,)),
    ],
)
def test_day_of_week_names_and_sunday(text: str, expected: tuple[int, ...]) -> None:
    assert agentkit.Cron.parse(f"0 0 * * {text}").weekdays == expected


@pytest.mark.parametrize(
    ("nickname", "equivalent"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
        ("  @hourly\n", "0 * * * *"),
    ],
)
def test_nicknames(nickname: str, equivalent: str) -> None:
    cron = agentkit.Cron.parse(nickname)
    assert cron.expr == nickname
    assert fields(cron) == fields(agentkit.Cron.parse(equivalent))


def test_extra_whitespace_between_fields() -> None:
    assert fields(agentkit.Cron.parse("  0\t12  *  * 1 ")) == fields(
        agentkit.Cron.parse("0 12 * * 1")
    )


def test_cron_is_immutable_and_comparable() -> None:
    cron = agentkit.Cron.parse("0 0 * * *")
    assert cron == agentkit.Cron.parse("0 0 * * *")
    assert hash(cron) == hash(agentkit.Cron.parse("0 0 * * *"))
    with pytest.raises(AttributeError):
        cron.minutes = (1,)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("* * * * * *", "expected 5 fields"),
        ("hello", "expected 5 fields"),
        ("61 * * * *", "minute value 61 is out of range 0-59"),
        ("99999999999999999999 * * * *", "minute value 99999999999999999999 is out of range"),
        ("* 24 * * *", "hour value 24 is out of range 0-23"),
        ("* * 0 * *", "day-of-month value 0 is out of range 1-31"),
        ("* * 32 * *", "day-of-month value 32 is out of range 1-31"),
        ("* * * 0 *", "month value 0 is out of range 1-12"),
        ("* * * 13 *", "month value 13 is out of range 1-12"),
        ("* * * * 8", "day-of-week value 8 is out of range 0-7"),
        ("0 0-30 * * *", "hour value 30 is out of range 0-23"),
        ("*/0 * * * *", "minute step '0' is not allowed: it must be a number of at least 1"),
        ("* 1-5/0 * * *", "hour step '0' is not allowed"),
        ("*/x * * * *", "minute step 'x' is not allowed"),
        ("*/ * * * *", "minute step '' is not allowed"),
        ("*/-1 * * * *", "minute step '-1' is not allowed"),
        ("30-10 * * * *", "minute range '30-10' is reversed"),
        ("* * * DEC-JAN *", "month range 'DEC-JAN' is reversed"),
        ("* * * * SAT-SUN", "day-of-week range 'SAT-SUN' is reversed"),
        ("* * * FOO *", "month value 'FOO' is not a number or name"),
        ("* * * JANUARY *", "month value 'JANUARY' is not a number or name"),
        ("* * * * FUN", "day-of-week value 'FUN' is not a number or name"),
        ("* * * * JAN", "day-of-week value 'JAN' is not a number or name"),
        ("* * * MON *", "month value 'MON' is not a number or name"),
        ("JAN * * * *", "minute value 'JAN' is not a number"),
        ("* * MON * *", "day-of-month value 'MON' is not a number"),
        ("1,,2 * * * *", "minute '1,,2' has an empty list item"),
        ("1, * * * *", "minute '1,' has an empty list item"),
        ("-1 * * * *", "minute '-1' is missing a value"),
        ("1- * * * *", "minute '1-' is missing a value"),
        ("1-2-3 * * * *", "minute value '2-3' is not a number"),
        ("** * * * *", "minute value '**' is not a number"),
        ("1.5 * * * *", "minute value '1.5' is not a number"),
        ("\uff11 * * * *", "minute value '\uff11' is not a number"),
        ("@reboot", "unknown nickname '@reboot'"),
        ("@daily 5", "unknown nickname '@daily 5'"),
        ("@", "unknown nickname '@'"),
    ],
)
def test_bad_expressions(expr: str, message: str) -> None:
    with pytest.raises(agentkit.BadInput) as caught:
        agentkit.Cron.parse(expr)
    assert str(caught.value).startswith(f"bad cron expression {expr!r}: ")
    assert message in str(caught.value)


def test_bad_expression_exact_message() -> None:
    with pytest.raises(agentkit.BadInput) as caught:
        agentkit.Cron.parse("61 * * * *")
    assert str(caught.value) == (
        "bad cron expression '61 * * * *': minute value 61 is out of range 0-59"
    )


def test_bad_input_is_a_value_error_and_agentkit_error() -> None:
    with pytest.raises(ValueError):
        agentkit.Cron.parse("nope")
    assert issubclass(agentkit.BadInput, agentkit.AgentKitError)


@pytest.mark.parametrize("expr", [None, 5, b"* * * * *"])
def test_non_string_expression(expr: object) -> None:
    with pytest.raises(agentkit.BadInput, match="expected a string"):
        agentkit.Cron.parse(expr)  # type: ignore[arg-type]


# --- time zones and timestamps ---------------------------------------------------------------


def test_zone_returns_zoneinfo() -> None:
    assert agentkit.zone(PARIS) == ZoneInfo(PARIS)


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "../etc", "/etc/passwd", "", "Europe/../UTC", "America", "UTC\0"]
)
def test_unknown_time_zones(name: str) -> None:
    with pytest.raises(agentkit.BadInput, match="unknown time zone"):
        agentkit.zone(name)
    with pytest.raises(agentkit.BadInput, match="unknown time zone"):
        agentkit.Cron.parse("* * * * *").next_after(0.0, name)


def test_time_zone_of_wrong_type() -> None:
    with pytest.raises(agentkit.BadInput, match="bad time zone 42"):
        agentkit.zone(42)  # type: ignore[arg-type]


def test_next_after_accepts_zoneinfo() -> None:
    cron = agentkit.Cron.parse("0 12 * * *")
    assert cron.next_after(utc(2026, 7, 1), ZoneInfo(PARIS)) == utc(2026, 7, 1, 10)


@pytest.mark.parametrize("after", [math.nan, math.inf, -math.inf, True, "0", None, 1e20, -1e20])
def test_bad_timestamps(after: object) -> None:
    with pytest.raises(agentkit.BadInput, match="bad timestamp"):
        agentkit.Cron.parse("* * * * *").next_after(after, "UTC")  # type: ignore[arg-type]


def test_supported_timestamp_range() -> None:
    cron = agentkit.Cron.parse("0 0 1 1 *")
    assert cron.next_after(utc(9598, 6, 1), "UTC") == utc(9599, 1, 1)
    assert cron.next_after(utc(2, 1, 1), "UTC") == utc(3, 1, 1)
    for after in (utc(9599, 1, 1), utc(1, 6, 1)):
        with pytest.raises(agentkit.BadInput, match="only years 2-9598 are supported"):
            cron.next_after(after, "UTC")


# --- basic evaluation ------------------------------------------------------------------------


def test_strictly_after() -> None:
    cron = agentkit.Cron.parse("*/15 * * * *")
    run = utc(2026, 5, 4, 10, 15)
    assert cron.next_after(run, "UTC") == utc(2026, 5, 4, 10, 30)
    assert cron.next_after(run - 0.5, "UTC") == run
    assert cron.next_after(run + 0.001, "UTC") == utc(2026, 5, 4, 10, 30)
    assert cron.next_after(int(run), "UTC") == utc(2026, 5, 4, 10, 30)


def test_every_minute() -> None:
    assert runs("* * * * *", utc(2026, 5, 4, 23, 58) + 30, "UTC", 3) == [
        utc(2026, 5, 4, 23, 59),
        utc(2026, 5, 5, 0, 0),
        utc(2026, 5, 5, 0, 1),
    ]


def test_lists_ranges_and_steps_together() -> None:
    assert runs("0,30 9-17/4 * * MON-FRI", utc(2026, 5, 8, 12), "UTC", 6) == [
        utc(2026, 5, 8, 13, 0),  # Friday
        utc(2026, 5, 8, 13, 30),
        utc(2026, 5, 8, 17, 0),
        utc(2026, 5, 8, 17, 30),
        utc(2026, 5, 11, 9, 0),  # Monday
        utc(2026, 5, 11, 9, 30),
    ]


def test_result_is_in_the_given_zone() -> None:
    after = utc(2026, 1, 15)
    assert agentkit.Cron.parse("0 9 * * *").next_after(after, PARIS) == utc(2026, 1, 15, 8)
    assert agentkit.Cron.parse("0 9 * * *").next_after(after, NEW_YORK) == utc(2026, 1, 15, 14)
    assert agentkit.Cron.parse("0 9 * * *").next_after(after, "Asia/Kolkata") == utc(
        2026, 1, 15, 3, 30
    )


def test_local_date_differs_from_utc_date() -> None:
    # 2026-01-15 23:30 UTC is already 2026-01-16 in Tokyo.
    cron = agentkit.Cron.parse("0 9 16 1 *")
    assert cron.next_after(utc(2026, 1, 15, 23, 30), "Asia/Tokyo") == utc(2026, 1, 16, 0)


def test_month_and_year_rollover() -> None:
    assert runs("0 0 1 * *", utc(2026, 12, 15), "UTC", 2) == [utc(2027, 1, 1), utc(2027, 2, 1)]
    assert runs("*/20 * * * *", utc(2026, 12, 31, 23, 40), "UTC", 2) == [
        utc(2027, 1, 1, 0, 0),
        utc(2027, 1, 1, 0, 20),
    ]
    assert runs("59 23 31 12 *", utc(2026, 12, 31, 23, 59), "UTC", 1) == [utc(2027, 12, 31, 23, 59)]
    assert runs("0 0 31 * *", utc(2026, 1, 31), "UTC", 3) == [
        utc(2026, 3, 31),
        utc(2026, 5, 31),
        utc(2026, 7, 31),
    ]
    assert runs("0 0 1 JAN,JUL *", utc(2026, 7, 1), "UTC", 2) == [utc(2027, 1, 1), utc(2027, 7, 1)]


def test_leap_years() -> None:
    assert runs("0 0 29 2 *", utc(2025, 1, 1), "UTC", 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]
    # 2100 is not a leap year: an eight-year gap.
    assert runs("0 0 29 2 *", utc(2096, 3, 1), "UTC", 1) == [utc(2104, 2, 29)]
    assert runs("0 12 28-29 2 *", utc(2027, 2, 28), "UTC", 3) == [
        utc(2027, 2, 28, 12),
        utc(2028, 2, 28, 12),
        utc(2028, 2, 29, 12),
    ]


def test_long_gap_beyond_eight_years() -> None:
    # February 29 that is a Sunday ('*/7' starts with '*', so both day fields must match).
    assert date(2088, 2, 29).weekday() == 6 and date(2128, 2, 29).weekday() == 6
    started = time.perf_counter()
    assert runs("0 0 29 2 */7", utc(2088, 3, 1), "UTC", 1) == [utc(2128, 2, 29)]
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 2,4,6,9,11 *"])
def test_impossible_expressions_never_match(expr: str) -> None:
    started = time.perf_counter()
    with pytest.raises(agentkit.BadInput) as caught:
        agentkit.Cron.parse(expr).next_after(utc(2026, 1, 1), PARIS)
    assert str(caught.value).startswith(f"bad cron expression {expr!r}: never matches")
    assert time.perf_counter() - started < 2


# --- the Vixie either-day rule ---------------------------------------------------------------


def test_both_days_restricted_either_matches() -> None:
    # The 10th of the month or any Friday; 2026-02-01 is a Sunday.
    cron = agentkit.Cron.parse("0 0 10 * 5")
    assert cron.either_day
    assert runs("0 0 10 * FRI", utc(2026, 2, 1), "UTC", 7) == [
        utc(2026, 2, 6),
        utc(2026, 2, 10),
        utc(2026, 2, 13),
        utc(2026, 2, 20),
        utc(2026, 2, 27),
        utc(2026, 3, 6),
        utc(2026, 3, 10),
    ]


def test_star_day_of_month_only_day_of_week_counts() -> None:
    assert not agentkit.Cron.parse("0 0 * * 5").either_day
    assert runs("0 0 * * 5", utc(2026, 2, 1), "UTC", 2) == [utc(2026, 2, 6), utc(2026, 2, 13)]


def test_star_day_of_week_only_day_of_month_counts() -> None:
    assert not agentkit.Cron.parse("0 0 10 * *").either_day
    assert runs("0 0 10 * *", utc(2026, 2, 1), "UTC", 2) == [utc(2026, 2, 10), utc(2026, 3, 10)]


def test_star_step_field_makes_both_fields_count() -> None:
    # '*/2' starts with '*': odd days of the month that are also Fridays (2026-04-01 is a Wed).
    assert not agentkit.Cron.parse("0 0 */2 * 5").either_day
    assert runs("0 0 */2 * 5", utc(2026, 2, 1), "UTC", 5) == [
        utc(2026, 2, 13),
        utc(2026, 2, 27),
        utc(2026, 3, 13),
        utc(2026, 3, 27),
        utc(2026, 4, 3),
    ]
    assert runs("0 0 10 * */1", utc(2026, 2, 1), "UTC", 2) == [utc(2026, 2, 10), utc(2026, 3, 10)]


# --- daylight saving time --------------------------------------------------------------------


def test_paris_daily_0230_across_spring_change() -> None:
    # 2026-03-29 02:00 CET becomes 03:00 CEST (01:00 UTC): 02:30 does not exist.
    assert runs("30 2 * * *", utc(2026, 3, 27, 12), PARIS, 4) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, first instant after the gap
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]


def test_paris_daily_0230_across_autumn_change() -> None:
    # 2026-10-25 03:00 CEST becomes 02:00 CET (01:00 UTC): 02:30 exists twice.
    assert runs("30 2 * * *", utc(2026, 10, 23, 12), PARIS, 3) == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # first 02:30, CEST; not again at 01:30 UTC
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]
    cron = agentkit.Cron.parse("30 2 * * *")
    assert cron.next_after(utc(2026, 10, 25, 1, 0), PARIS) == utc(2026, 10, 26, 1, 30)


def test_new_york_daily_0230_across_spring_change() -> None:
    # 2026-03-08 02:00 EST becomes 03:00 EDT (07:00 UTC): 02:30 does not exist.
    assert runs("30 2 * * *", utc(2026, 3, 6, 12), NEW_YORK, 3) == [
        utc(2026, 3, 7, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT, first instant after the gap
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]


def test_new_york_daily_0230_across_autumn_change() -> None:
    # 2026-11-01 02:00 EDT becomes 01:00 EST (06:00 UTC): 02:30 exists once, in EST.
    assert runs("30 2 * * *", utc(2026, 10, 30, 12), NEW_YORK, 3) == [
        utc(2026, 10, 31, 6, 30),  # 02:30 EDT
        utc(2026, 11, 1, 7, 30),  # 02:30 EST
        utc(2026, 11, 2, 7, 30),
    ]


def test_new_york_0130_across_autumn_change_runs_once() -> None:
    # 01:30 exists twice on 2026-11-01: 05:30 UTC (EDT) and 06:30 UTC (EST).
    assert runs("30 1 * * *", utc(2026, 10, 30, 12), NEW_YORK, 3) == [
        utc(2026, 10, 31, 5, 30),
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
    ]
    cron = agentkit.Cron.parse("30 1 * * *")
    assert cron.next_after(utc(2026, 11, 1, 6, 0), NEW_YORK) == utc(2026, 11, 2, 6, 30)


def test_paris_hourly_across_spring_change() -> None:
    found = runs("0 * * * *", utc(2026, 3, 28, 22, 30), PARIS, 5)
    assert found == [
        utc(2026, 3, 28, 23),  # 00:00 CET
        utc(2026, 3, 29, 0),  # 01:00 CET
        utc(2026, 3, 29, 1),  # 02:00 does not exist; 03:00 CEST is the same instant: once
        utc(2026, 3, 29, 2),  # 04:00 CEST
        utc(2026, 3, 29, 3),  # 05:00 CEST
    ]
    assert len(set(found)) == len(found)


def test_paris_hourly_across_autumn_change() -> None:
    found = runs("0 * * * *", utc(2026, 10, 24, 21, 30), PARIS, 5)
    assert found == [
        utc(2026, 10, 24, 22),  # 00:00 CEST
        utc(2026, 10, 24, 23),  # 01:00 CEST
        utc(2026, 10, 25, 0),  # 02:00 CEST, first pass
        # 02:00 CET (01:00 UTC), the repeated hour's second pass, does not run.
        utc(2026, 10, 25, 2),  # 03:00 CET
        utc(2026, 10, 25, 3),  # 04:00 CET
    ]


def test_new_york_hourly_across_spring_change() -> None:
    found = runs("0 * * * *", utc(2026, 3, 8, 4, 30), NEW_YORK, 4)
    assert found == [
        utc(2026, 3, 8, 5),  # 00:00 EST
        utc(2026, 3, 8, 6),  # 01:00 EST
        utc(2026, 3, 8, 7),  # 02:00 does not exist; 03:00 EDT is the same instant: once
        utc(2026, 3, 8, 8),  # 04:00 EDT
    ]


def test_new_york_hourly_across_autumn_change() -> None:
    found = runs("0 * * * *", utc(2026, 11, 1, 3, 30), NEW_YORK, 4)
    assert found == [
        utc(2026, 11, 1, 4),  # 00:00 EDT
        utc(2026, 11, 1, 5),  # 01:00 EDT, first pass
        # 01:00 EST (06:00 UTC), the repeated hour's second pass, does not run.
        utc(2026, 11, 1, 7),  # 02:00 EST
        utc(2026, 11, 1, 8),  # 03:00 EST
    ]
    # Starting inside the second pass finds the next hour, not an earlier wall-clock time.
    cron = agentkit.Cron.parse("0 * * * *")
    assert cron.next_after(utc(2026, 11, 1, 6, 15), NEW_YORK) == utc(2026, 11, 1, 7)


def test_several_times_in_the_gap_run_once() -> None:
    # 02:00, 02:30 and 03:00 all map to 03:00 CEST (01:00 UTC).
    assert runs("*/30 * * * *", utc(2026, 3, 28, 23, 45), PARIS, 4) == [
        utc(2026, 3, 29, 0, 0),
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 29, 1, 0),
        utc(2026, 3, 29, 1, 30),
    ]


def test_half_hour_gap() -> None:
    # Lord Howe Island: 2026-10-04 02:00 (+10:30) becomes 02:30 (+11:00), at 15:30 UTC.
    assert runs("*/15 * * * *", utc(2026, 10, 3, 15), "Australia/Lord_Howe", 4) == [
        utc(2026, 10, 3, 15, 15),  # 01:45
        utc(2026, 10, 3, 15, 30),  # 02:00 and 02:15 do not exist; 02:30 is the same instant
        utc(2026, 10, 3, 15, 45),  # 02:45
        utc(2026, 10, 3, 16, 0),
    ]


def test_skipped_day() -> None:
    # Samoa skipped 2011-12-30: 23:59:59 on the 29th (-10:00) was followed by 00:00 on the 31st.
    assert runs("0 12 * * *", utc(2011, 12, 29, 22), "Pacific/Apia", 2) == [
        utc(2011, 12, 30, 10),  # 12:00 on the missing day: first instant after the gap
        utc(2011, 12, 30, 22),  # 12:00 on the 31st (+14:00)
    ]
