from datetime import UTC, datetime

import pytest

from connector.rules.delivery import (
    SendOutcome,
    backoff_delay,
    classify_status,
    gives_up,
    is_retryable_status,
    parse_retry_after,
    throttle_pause,
)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (200, False),
        (400, False),
        (401, False),
        (404, False),
        (413, False),
        (428, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (599, True),
        (600, False),
    ],
)
def test_is_retryable_status_only_429_and_5xx(status, retryable):
    assert is_retryable_status(status) is retryable


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, SendOutcome.OK),
        (201, SendOutcome.OK),
        (204, SendOutcome.OK),
        (299, SendOutcome.OK),
        (301, SendOutcome.FAIL),
        (400, SendOutcome.FAIL),
        (401, SendOutcome.UNAUTHORIZED),
        (403, SendOutcome.FAIL),
        (404, SendOutcome.FAIL),
        (422, SendOutcome.FAIL),
        (429, SendOutcome.THROTTLED),
        (500, SendOutcome.RETRY),
        (503, SendOutcome.RETRY),
    ],
)
def test_classify_status_maps_each_class(status, outcome):
    assert classify_status(status) is outcome


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "ceiling"),
    [
        (1, 2.0, 900.0, 2.0),
        (2, 2.0, 900.0, 4.0),
        (3, 2.0, 900.0, 8.0),
        (9, 2.0, 900.0, 512.0),
        (10, 2.0, 900.0, 900.0),
        (50, 2.0, 900.0, 900.0),
        (10_000, 2.0, 900.0, 900.0),
        (1, 0.0, 900.0, 0.0),
        (3, 1.5, 5.0, 5.0),
    ],
)
def test_backoff_delay_upper_bound_is_capped_exponential(attempt, base, cap, ceiling):
    assert backoff_delay(attempt, base, cap, rand=lambda: 1.0) == pytest.approx(ceiling)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.999])
def test_backoff_delay_full_jitter_scales_the_whole_range(fraction):
    assert backoff_delay(4, 2.0, 900.0, rand=lambda: fraction) == pytest.approx(16.0 * fraction)


def test_backoff_delay_stays_within_range_with_real_randomness():
    delays = [backoff_delay(5, 2.0, 900.0) for _ in range(500)]
    assert all(0.0 <= d <= 32.0 for d in delays)
    # Full jitter spreads over the whole range rather than clustering near the top.
    assert min(delays) < 8.0
    assert max(delays) > 24.0


def test_backoff_delay_rejects_attempt_zero():
    with pytest.raises(ValueError):
        backoff_delay(0, 2.0, 900.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("3", 3.0),
        (" 0.5 ", 0.5),
        ("-4", 0.0),
        ("soon", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_parse_retry_after_reads_seconds_or_an_http_date(header, expected):
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


@pytest.mark.parametrize(
    ("retry_after", "consecutive", "expected"),
    [
        (None, 1, 2.0),
        (None, 2, 4.0),
        (None, 4, 16.0),
        (None, 20, 60.0),
        (None, 10_000, 60.0),
        (5.0, 1, 5.0),
        (5.0, 7, 5.0),
        (600.0, 1, 60.0),
        (0.0, 3, 0.0),
    ],
)
def test_throttle_pause_honours_retry_after_else_doubles_up_to_the_cap(
    retry_after, consecutive, expected
):
    assert throttle_pause(retry_after, consecutive, 2.0, 60.0) == expected


def test_throttle_pause_rejects_consecutive_zero():
    with pytest.raises(ValueError):
        throttle_pause(None, 0, 2.0, 60.0)


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "expected"),
    [
        (0, 10, False),
        (1, 10, False),
        (9, 10, False),
        (10, 10, True),
        (11, 10, True),
        (1, 1, True),
    ],
)
def test_gives_up_after_max_attempts(attempts, max_attempts, expected):
    assert gives_up(attempts, max_attempts) is expected
