import asyncio
import heapq
import itertools
import time

import pytest

from connector.outbound.ratelimit import MIN_SHARE_PER_SECOND, TokenBucket, instance_share


class VirtualTime:
    """A clock and a sleep that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (self.now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._waiting and self._waiting[0][0] <= self.now + 1e-9:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.fixture
def vtime() -> VirtualTime:
    return VirtualTime()


def test_token_bucket_reserve_spaces_callers_by_the_rate(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_token_bucket_reserve_allows_a_burst_of_capacity(vtime):
    bucket = TokenBucket(10, capacity=5, clock=vtime.clock, sleep=vtime.sleep)
    waits = [bucket.reserve() for _ in range(7)]
    assert waits[:5] == [0.0] * 5
    assert waits[5:] == pytest.approx([0.1, 0.2])


def test_token_bucket_reserve_refills_no_more_than_capacity_when_idle(vtime):
    bucket = TokenBucket(10, capacity=3, clock=vtime.clock, sleep=vtime.sleep)
    for _ in range(3):
        bucket.reserve()
    vtime.now += 3600
    waits = [bucket.reserve() for _ in range(4)]
    assert waits[:3] == [0.0] * 3
    assert waits[3] == pytest.approx(0.1)


def test_token_bucket_reserve_recovers_one_token_per_interval(vtime):
    bucket = TokenBucket(4, clock=vtime.clock, sleep=vtime.sleep)
    assert bucket.reserve() == 0.0
    vtime.now += 0.25
    assert bucket.reserve() == 0.0
    vtime.now += 0.1
    assert bucket.reserve() == pytest.approx(0.15)


@pytest.mark.parametrize(("rate", "capacity"), [(10.0, 1.0), (10.0, 4.0), (33.0, 2.0)])
async def test_token_bucket_acquire_never_exceeds_rate_in_any_window(vtime, rate, capacity):
    bucket = TokenBucket(rate, capacity=capacity, clock=vtime.clock, sleep=vtime.sleep)
    done: list[float] = []

    async def worker() -> None:
        await bucket.acquire()
        done.append(vtime.now)

    tasks = [asyncio.create_task(worker()) for _ in range(60)]
    await vtime.advance(0)
    while len(done) < 60:
        await vtime.advance(0.005)
    await asyncio.gather(*tasks)

    for i, start in enumerate(done):
        for window in (0.1, 0.5, 1.0, 2.0):
            in_window = sum(1 for t in done[i:] if t < start + window)
            assert in_window <= capacity + window * rate + 1e-6
    # ... and it is not slower than the rate either.
    assert done[-1] - done[0] <= (60 - capacity) / rate + 0.01


async def test_token_bucket_acquire_serves_waiters_first_come_first_served(vtime):
    bucket = TokenBucket(5, clock=vtime.clock, sleep=vtime.sleep)
    order: list[int] = []

    async def worker(n: int) -> None:
        await bucket.acquire()
        order.append(n)

    tasks = [asyncio.create_task(worker(n)) for n in range(20)]
    while len(order) < 20:
        await vtime.advance(0.05)
    await asyncio.gather(*tasks)
    assert order == list(range(20))


async def test_token_bucket_acquire_sleeps_once_per_waiting_caller(vtime):
    bucket = TokenBucket(10, capacity=2, clock=vtime.clock, sleep=vtime.sleep)
    tasks = [asyncio.create_task(bucket.acquire()) for _ in range(10)]
    while not all(t.done() for t in tasks):
        await vtime.advance(0.1)
    # The first two go at once; every other caller sleeps exactly once, never polls.
    assert len(vtime.sleeps) == 8
    assert vtime.sleeps == pytest.approx([0.1 * k for k in range(1, 9)])


async def test_token_bucket_acquire_cancelled_waiter_does_not_block_others(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    first = asyncio.create_task(bucket.acquire())
    cancelled = asyncio.create_task(bucket.acquire())
    last = asyncio.create_task(bucket.acquire())
    await vtime.advance(0)
    cancelled.cancel()
    await vtime.advance(0.25)
    assert first.done() and last.done()
    assert cancelled.cancelled()


async def test_token_bucket_acquire_paces_in_real_time():
    bucket = TokenBucket(50)
    started = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(16)))
    elapsed = time.monotonic() - started
    # 15 intervals of 20 ms after the first token; only a lower bound is safe to assert.
    assert elapsed >= 0.25


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (-1, 1), (10, 0.5)])
def test_token_bucket_rejects_invalid_settings(rate, capacity):
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity=capacity)


def test_token_bucket_set_rate_paces_later_reservations_at_the_new_rate(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    assert bucket.reserve() == 0.0
    vtime.now += 1.0
    bucket.set_rate(20)
    assert bucket.rate_per_second == 20
    waits = [bucket.reserve() for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.05, 0.1, 0.15])


def test_token_bucket_set_rate_lower_stretches_the_backlog_at_once(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.0, 0.1, 0.2])
    # Three slots are handed out (they keep their time); at 5/s they would have taken 0.6 s.
    bucket.set_rate(5)
    assert [bucket.reserve() for _ in range(2)] == pytest.approx([0.6, 0.8])


def test_token_bucket_set_rate_higher_starts_after_the_backlog(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.0, 0.1, 0.2])
    # Waiting callers are not overtaken: the faster pace starts where the backlog ends.
    bucket.set_rate(20)
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.3, 0.35, 0.4])


def test_token_bucket_set_rate_keeps_the_burst_capacity(vtime):
    bucket = TokenBucket(10, capacity=4, clock=vtime.clock, sleep=vtime.sleep)
    bucket.set_rate(2)
    waits = [bucket.reserve() for _ in range(6)]
    assert waits[:4] == [0.0] * 4
    assert waits[4:] == pytest.approx([0.5, 1.0])


@pytest.mark.parametrize(("first", "second"), [(40.0, 20.0), (20.0, 40.0), (10.0, 30.0)])
async def test_token_bucket_acquire_follows_a_rate_change_under_load(vtime, first, second):
    bucket = TokenBucket(first, clock=vtime.clock, sleep=vtime.sleep)
    done: list[float] = []

    async def worker() -> None:
        # Like the sender: a few callers at a time keep the bucket busy.
        for _ in range(30):
            await bucket.acquire()
            done.append(vtime.now)

    tasks = [asyncio.create_task(worker()) for _ in range(4)]
    await vtime.advance(0)
    while vtime.now < 1001.0:
        await vtime.advance(0.005)
    bucket.set_rate(second)
    changed = len(done)
    while not all(t.done() for t in tasks):
        await vtime.advance(0.005)
    await asyncio.gather(*tasks)

    # Before the change: the first rate; after it, the new one (plus the callers that were
    # already waiting, at most one per worker, at the old pace).
    before = [t for t in done[:changed] if t >= 1000.0]
    assert len(before) <= 1 + 1.0 * first + 1e-6
    after = done[changed:]
    span = after[-1] - after[0]
    assert len(after) - 1 <= 4 + span * second + 1e-6
    assert len(after) - 1 >= span * second * 0.9 - 4


@pytest.mark.parametrize("rate", [0, -1, float("nan")])
def test_token_bucket_set_rate_rejects_a_rate_that_is_not_positive(rate):
    bucket = TokenBucket(10)
    with pytest.raises(ValueError):
        bucket.set_rate(rate)
    assert bucket.rate_per_second == 10


async def test_token_bucket_pause_holds_every_later_caller(vtime):
    bucket = TokenBucket(10, capacity=5, clock=vtime.clock, sleep=vtime.sleep)
    assert bucket.reserve() == 0.0
    bucket.pause(2.0)
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == pytest.approx([2.0, 2.1, 2.2])


def test_token_bucket_shorter_pause_does_not_shorten_a_longer_one(vtime):
    bucket = TokenBucket(10, clock=vtime.clock, sleep=vtime.sleep)
    bucket.pause(3.0)
    bucket.pause(1.0)
    assert bucket.reserve() == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("total", "active", "share"),
    [
        (100, 1, 100),
        (100, 2, 50),
        (100, 3, 100 / 3),
        (100, 4, 25),
        (40, 2, 20),
        # The caller itself is sending: never divided by zero or a negative count.
        (100, 0, 100),
        (100, -2, 100),
        # Never below the floor, however many instances there are.
        (0.1, 1000, MIN_SHARE_PER_SECOND),
        (100, 1_000_000, MIN_SHARE_PER_SECOND),
    ],
)
def test_instance_share(total, active, share):
    assert instance_share(total, active) == pytest.approx(share)
