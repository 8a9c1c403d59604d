import pytest

from connector.outbound.operations import SendOutcome
from connector.outbound.retry import backoff_delay, classify_status, gives_up, is_retryable_status


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
        (429, SendOutcome.RETRY),
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
