"""Outbound sync benchmark: N users through the real service against the fake Track API.

Prints figures, asserts nothing. Three kinds of process take part, so that each one's CPU
and peak memory are its own:

- the fake Track API (``tests/fake_customerio.py``), with the configured latency and the
  configured rate limit (it answers 429 beyond it);
- a **load** child that stores N generated users through ``parse_notification`` and
  ``store_messages``, as ``/smart-notifier`` would (measured, but not part of the sync);
- a **sync** child that opens the runtime and runs ``SyncService.run_once`` over them;
- unless ``--skip-baseline``, a **baseline** child: the same kind of requests straight
  through the ``customerio`` package with the same concurrency and token bucket, no
  planner and no database, so the service is compared with a floor measured in the same run.

Run ``python bench/outbound.py --help`` for the options; ``bench/README.md`` says more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import REPO, row
from tests.support import scratch_database

FAKE_SCRIPT = REPO / "tests" / "fake_customerio.py"
# The fake's default workspace credentials: any others get a 401.
FAKE_SITE_ID = "fake-site-id"
FAKE_API_KEY = "fake-api-key"
SEGMENT = {"id": "seg-bench", "name": "Bench"}
ADMIN_PASSWORD = "bench-admin-password"
# The service sends these besides the synchronized attributes (SPEC §5, step 6).
STANDARD_ATTRIBUTES = 4
MAX_ATTRIBUTES_PER_CALL = 30

# Targets from the issue.
TARGET_LIMIT_RATIO = 0.95
TARGET_CORES = 0.2
TARGET_PEAK_MB = 300
# Our reading of "peak memory does not grow with N": ten times the users, at most 15 % more.
TARGET_GROWTH = 1.15

# Without a terminal (CI, a log file) a progress line this often instead of a bar.
PROGRESS_LINE_SECONDS = 10.0


@dataclass(frozen=True)
class Job:
    """What a child process is asked to do, written to a JSON file for it."""

    users: int
    attributes: int
    events: int
    rate_limit: float
    concurrency: int
    batch_size: int
    baseline_requests: int
    database_url: str
    track_host: str
    ca_file: str
    log_file: str
    log_level: str

    @property
    def attribute_names(self) -> list[str]:
        """``attr_00_at``, ``attr_01`` …: every twentieth is a date, so date mapping runs too."""
        return [
            f"attr_{i:02d}_at" if i % 20 == 0 else f"attr_{i:02d}" for i in range(self.attributes)
        ]

    @property
    def event_names(self) -> list[str]:
        return [f"Bench Event {k}" for k in range(self.events)]


# -- generated users -------------------------------------------------------------------------


def _attribute_value(name: str, i: int, n: int) -> Any:
    if name.endswith("_at"):
        return f"2024-{1 + n % 12:02d}-{1 + i % 28:02d}T10:{n % 60:02d}:00Z"
    kind = i % 4
    if kind == 0:
        return f"value {n}-{i}"
    if kind == 1:
        return n * 40 + i
    if kind == 2:
        return n % 7 == i % 7
    return round(n / (i + 1), 3)


def user_message(n: int, attribute_names: list[str], event_names: list[str]) -> dict[str, Any]:
    """The ``n``-th generated user as a Hull-style notification message."""
    user: dict[str, Any] = {
        "id": f"bench-{n:07d}",
        "external_id": f"ext-{n}",
        "email": f"user{n}@bench.example",
        "anonymous_ids": [f"anon-{n}"],
        "created_at": "2023-05-01T12:00:00Z",
        "indexed_at": "2024-05-01T12:00:00Z",
    }
    user.update({name: _attribute_value(name, i, n) for i, name in enumerate(attribute_names)})
    events = [
        {
            "event_id": f"ev-{n}-{k}",
            "event": name,
            "created_at": "2024-03-01 10:00:00 UTC",
            "properties": {"plan": "pro", "amount": n % 100},
            "context": {},
        }
        for k, name in enumerate(event_names)
    ]
    return {"user": user, "segments": [SEGMENT], "events": events}


def requests_per_user(attributes: int, events: int) -> int:
    identify_calls = -(-(attributes + STANDARD_ATTRIBUTES) // MAX_ATTRIBUTES_PER_CALL)
    return identify_calls + events


# -- measurement helpers ---------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def current_rss_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    return None


def fake_control(track_host: str, ca_file: str, method: str, name: str) -> dict[str, Any]:
    """``GET /__fake/stats`` or ``POST /__fake/reset`` (no auth, not counted by the fake)."""
    context = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(
        f"https://{track_host}/__fake/{name}",
        method=method,
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.load(response)


def count_429(stats: dict[str, Any]) -> int:
    return int(stats.get("by_status", {}).get("429", 0))


class Progress:
    """A tqdm bar on a terminal; a line every few seconds otherwise (CI, redirected output)."""

    def __init__(self, label: str, unit: str = "user"):
        self.label = label
        self.unit = unit
        self.total = 0
        self.done = 0
        self.requests = 0
        self._started = time.perf_counter()
        self._last_line = self._started
        self._bar: Any = None

    def start(self, total: int) -> None:
        self.total = total
        self._started = self._last_line = time.perf_counter()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=self.label, unit=self.unit, file=sys.stderr, smoothing=0.05
            )

    def advance(self, count: int = 1, requests: int = 0) -> None:
        self.done += count
        self.requests += requests
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if now - self._last_line >= PROGRESS_LINE_SECONDS:
            self._last_line = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        extra = f", {self.requests / elapsed:.1f} req/s" if self.requests else ""
        print(
            f"  {self.label}: {self.done:,}/{self.total:,} {self.unit}s "
            f"({self.done / elapsed:.1f}/s{extra})",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def log_to_file(path: str, level: str) -> None:
    """The service's structured logs, as ``connector serve`` writes them, into a file: their
    cost is part of the service's CPU, their lines would bury the progress bar."""
    from connector.ops.logs import setup_logging

    setup_logging(level)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]


def build_config(job: Job) -> Any:
    from connector.config import parse_config

    return parse_config(
        {
            "security": {"admin_password": ADMIN_PASSWORD},
            "database": {"url": job.database_url},
            "customerio": {"track_host": job.track_host, "ca_file": job.ca_file},
            "sync": {
                "scheduled": False,
                "rate_limit_per_second": job.rate_limit,
                "concurrency": job.concurrency,
            },
            "connector": {
                "site_id": FAKE_SITE_ID,
                "api_key": FAKE_API_KEY,
                "synchronized_segments": [SEGMENT["id"]],
                "synchronized_attributes": job.attribute_names,
                "events_filter": job.event_names,
                "max_attributes_per_call": MAX_ATTRIBUTES_PER_CALL,
            },
        }
    )


# -- the children ----------------------------------------------------------------------------


async def load_users(job: Job) -> dict[str, Any]:
    """Store ``job.users`` generated users, ``job.batch_size`` per ``store_messages`` call."""
    from connector.notifications.parse import parse_notification
    from connector.notifications.store import store_messages
    from connector.runtime import open_runtime

    names, events = job.attribute_names, job.event_names
    progress = Progress("load")
    async with open_runtime(build_config(job)) as runtime:
        progress.start(job.users)
        wall, cpu = time.perf_counter(), time.process_time()
        changed = 0
        for start in range(0, job.users, job.batch_size):
            stop = min(start + job.batch_size, job.users)
            body = {
                "notification_id": f"bench-{start}",
                "channel": "user:update",
                "messages": [user_message(n, names, events) for n in range(start, stop)],
            }
            parsed = parse_notification(body)
            result = await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)
            changed += result.changed
            progress.advance(stop - start)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        progress.close()
    return {
        "users": job.users,
        "pending": changed,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


async def sync_users(job: Job) -> dict[str, Any]:
    """One ``SyncService.run_once`` over every pending user, with its CPU and memory."""
    from connector.runtime import open_runtime

    progress = Progress("sync")
    async with open_runtime(build_config(job)) as runtime:
        rss_before = current_rss_mb()
        before = fake_control(job.track_host, job.ca_file, "GET", "stats")
        wall, cpu = time.perf_counter(), time.process_time()
        summary = await runtime.sync.run_once(
            "bench",
            progress=lambda _plan, outcome: progress.advance(1, outcome.api_calls),
            on_start=progress.start,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = fake_control(job.track_host, job.ca_file, "GET", "stats")
        progress.close()
    return {
        "summary": summary.as_dict(),
        "users": summary.users,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fake_requests": after["total"] - before["total"],
        "fake_429": count_429(after) - count_429(before),
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def _identify_chunks(n: int, job: Job) -> list[dict[str, Any]]:
    """The identify bodies the service sends for user ``n``, already mapped."""
    user = user_message(n, job.attribute_names, [])["user"]
    attributes: dict[str, Any] = {
        "email": user["email"],
        "created_at": 1682942400,
        "hull_segments": [SEGMENT["name"]],
        "anonymous_id": user["anonymous_ids"][-1],
    }
    for name in job.attribute_names:
        value = user[name]
        attributes[name] = 1709287200 if name.endswith("_at") else value
    items = list(attributes.items())
    return [
        dict(items[i : i + MAX_ATTRIBUTES_PER_CALL])
        for i in range(0, len(items), MAX_ATTRIBUTES_PER_CALL)
    ]


async def baseline_requests(job: Job) -> dict[str, Any]:
    """``job.baseline_requests`` calls straight through the ``customerio`` package, paced like
    the service's sender (a slot, then a token, then a worker thread) with no planner and no
    database: the floor the service's figures are compared with."""
    from customerio import CustomerIO, CustomerIOException

    from connector.outbound.ratelimit import TokenBucket
    from connector.outbound.sender import parse_track_host

    host, port = parse_track_host(job.track_host)
    local = threading.local()
    clients: list[CustomerIO] = []

    def client() -> CustomerIO:
        found = getattr(local, "client", None)
        if found is None:
            found = CustomerIO(
                site_id=FAKE_SITE_ID,
                api_key=FAKE_API_KEY,
                host=host,
                port=port,
                retries=0,
                timeout=10,
                use_connection_pooling=True,
            )
            found.http.verify = job.ca_file
            found.http.trust_env = False
            local.client = found
            clients.append(found)
        return found

    def calls_for(n: int) -> Iterator[Callable[[CustomerIO], Any]]:
        customer_id = f"baseline-{n}"
        for chunk in _identify_chunks(n, job):
            yield lambda c, chunk=chunk: c.identify(id=customer_id, **chunk)
        for k, name in enumerate(job.event_names):
            data = {"plan": "pro", "amount": n % 100}
            event_id = f"01HBENCH{n:012d}{k:06d}"
            yield lambda c, name=name, data=data, event_id=event_id: c.track(
                customer_id, name, data, id=event_id, timestamp=1709287200
            )

    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(job.concurrency, thread_name_prefix="baseline")
    slots = asyncio.Semaphore(job.concurrency)
    bucket = TokenBucket(job.rate_limit)
    users = iter(range(job.baseline_requests))
    outcomes: Counter[str] = Counter()
    issued = 0
    progress = Progress("baseline", unit="request")

    async def worker() -> None:
        nonlocal issued
        for n in users:
            for call in calls_for(n):
                if issued >= job.baseline_requests:
                    return
                issued += 1
                try:
                    async with slots:
                        await bucket.acquire()
                        await loop.run_in_executor(executor, lambda call=call: call(client()))
                    outcomes["ok"] += 1
                except CustomerIOException:
                    outcomes["error"] += 1
                progress.advance(1, 1)

    before = fake_control(job.track_host, job.ca_file, "GET", "stats")
    progress.start(job.baseline_requests)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(job.concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    progress.close()
    after = fake_control(job.track_host, job.ca_file, "GET", "stats")
    executor.shutdown(wait=True)
    for found in clients:
        found.close()
    return {
        "requests": issued,
        "errors": outcomes["error"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "fake_requests": after["total"] - before["total"],
        "fake_429": count_429(after) - count_429(before),
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {"load": load_users, "sync": sync_users, "baseline": baseline_requests}


def run_worker(kind: str, job_file: str, result_file: str) -> int:
    job = Job(**json.loads(Path(job_file).read_text()))
    log_to_file(job.log_file, job.log_level)
    result = asyncio.run(WORKERS[kind](job))
    Path(result_file).write_text(json.dumps(result))
    return 0


# -- the orchestrating process ---------------------------------------------------------------


@contextlib.contextmanager
def fake_track_api(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, str]]:
    """Start the fake in a process of its own; yield its ``host:port`` and CA file."""
    command = [
        sys.executable,
        str(FAKE_SCRIPT),
        "--port",
        "0",
        "--latency-ms",
        str(args.latency_ms),
        "--rate-limit",
        str(args.rate_limit),
        "--ca-file",
        str(workdir / "fake-ca.pem"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        words = process.stdout.readline().split()
        if len(words) != 3 or words[0] != "ready":
            raise RuntimeError(f"the fake Track API did not start (said {words!r})")
        yield words[1], words[2]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_child(kind: str, job: Job, workdir: Path) -> dict[str, Any]:
    stem = workdir / f"{kind}-{job.users}"
    job_file, result_file = stem.with_suffix(".job.json"), stem.with_suffix(".result.json")
    job_file.write_text(json.dumps(asdict(job)))
    command = [sys.executable, "-m", "bench.outbound", "--worker", kind]
    command += ["--job", str(job_file), "--result", str(result_file)]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(result_file.read_text())


def _row(label: str, value: str, target: str = "", met: bool | None = None) -> str:
    return row(label, value, target, met, widths=(28, 34, 16))


def print_report(
    args: argparse.Namespace,
    baseline: dict[str, Any] | None,
    runs: list[tuple[int, dict[str, Any], dict[str, Any]]],
) -> None:
    users, load, sync = runs[-1]
    limit = args.rate_limit
    database = "PostgreSQL" if args.database_url else "SQLite"
    per_user = requests_per_user(args.attributes, args.events)
    ceiling = args.concurrency / (args.latency_ms / 1000) if args.latency_ms else float("inf")
    print()
    print("Customer.io outbound benchmark")
    print(
        f"  {users:,} users x {args.attributes} attributes, {args.events} whitelisted events "
        f"({per_user} requests each) · {database} · concurrency {args.concurrency}"
    )
    print(
        f"  fake Track API: {limit:g} req/s limit, {args.latency_ms:g} ms latency "
        f"(concurrency / latency allows {ceiling:,.0f} req/s) · "
        f"{os.cpu_count()} CPUs · Python {sys.version.split()[0]}"
    )

    print()
    print(f"Load (parse_notification + store_messages, {args.batch_size} per call)")
    print(
        _row(
            "users stored",
            f"{load['users']:,} in {load['wall_seconds']:.1f} s = "
            f"{load['users'] / load['wall_seconds']:,.0f} users/s",
        )
    )
    print(_row("CPU", f"{load['cpu_seconds']:.1f} s, peak RSS {load['peak_rss_mb']:.0f} MB"))

    if baseline is not None:
        print()
        print("Baseline (customerio package only, same concurrency and token bucket)")
        rate = baseline["requests"] / baseline["wall_seconds"]
        print(
            _row(
                "requests",
                f"{baseline['requests']:,} in {baseline['wall_seconds']:.1f} s = "
                f"{rate:.1f} req/s ({rate / limit:.3f} of limit)",
            )
        )
        print(_row("429s / errors", f"{baseline['fake_429']} / {baseline['errors']}"))
        print(
            _row(
                "CPU",
                f"{baseline['cpu_seconds']:.2f} s = "
                f"{baseline['cpu_seconds'] / baseline['requests'] * 1000:.2f} ms/request, "
                f"{baseline['cpu_seconds'] / baseline['wall_seconds']:.3f} cores",
            )
        )

    summary = sync["summary"]
    wall, cpu = sync["wall_seconds"], sync["cpu_seconds"]
    calls = summary["api_calls"]
    rate = calls / wall
    cores = cpu / wall
    print()
    print("Sync (SyncService.run_once)")
    print(
        _row(
            "users",
            f"{summary['sent']:,} sent, {summary['skipped']} skipped, "
            f"{summary['failed']} failed, {summary['retrying']} retrying",
        )
    )
    print(_row("wall time", f"{wall:.1f} s"))
    print(_row("requests", f"{calls:,} (the fake counted {sync['fake_requests']:,})"))
    print(
        _row(
            "requests/s",
            f"{rate:.1f} = {rate / limit:.3f} of the limit",
            f"≥ {TARGET_LIMIT_RATIO}",
            rate / limit >= TARGET_LIMIT_RATIO,
        )
    )
    print(_row("429s provoked", str(sync["fake_429"]), "0", sync["fake_429"] == 0))
    print(_row("users/s", f"{sync['users'] / wall:.1f}"))
    print(_row("CPU seconds / 1,000 users", f"{cpu / max(sync['users'], 1) * 1000:.2f}"))
    print(
        _row(
            "CPU cores",
            f"{cores:.3f} ({cpu:.1f} s, {cpu / max(calls, 1) * 1000:.2f} ms/request)",
            f"< {TARGET_CORES}",
            cores < TARGET_CORES,
        )
    )
    before = sync["rss_before_mb"]
    print(
        _row(
            "peak RSS",
            f"{sync['peak_rss_mb']:.0f} MB"
            + (f" ({before:.0f} MB when the pass began)" if before else ""),
            f"≤ {TARGET_PEAK_MB} MB",
            sync["peak_rss_mb"] <= TARGET_PEAK_MB,
        )
    )
    if baseline is not None:
        base_rate = baseline["requests"] / baseline["wall_seconds"]
        base_cpu = baseline["cpu_seconds"] / baseline["requests"]
        print(
            _row(
                "against the baseline",
                f"{rate / base_rate:.3f}x its req/s, "
                f"{cpu / max(calls, 1) / base_cpu:.1f}x its CPU/request",
            )
        )
    expected = users * per_user
    if summary["sent"] != users or calls != expected or summary["error"]:
        print(
            f"  NOTE: expected {users:,} users sent with {expected:,} requests; "
            f"error: {summary['error']}. The figures above describe a pass that did not "
            "go as planned."
        )

    if len(runs) > 1:
        print()
        print("Memory (each size loaded and synced in processes of its own)")
        for size, size_load, size_sync in runs:
            print(
                _row(
                    f"{size:,} users",
                    f"sync peak {size_sync['peak_rss_mb']:.0f} MB, "
                    f"load peak {size_load['peak_rss_mb']:.0f} MB",
                )
            )
        growth = runs[-1][2]["peak_rss_mb"] / runs[0][2]["peak_rss_mb"]
        factor = runs[-1][0] / runs[0][0]
        print(
            _row(
                "sync peak growth",
                f"{growth:.2f}x for {factor:.0f}x the users",
                f"≤ {TARGET_GROWTH}x",
                growth <= TARGET_GROWTH,
            )
        )
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the outbound sync against the fake Track API (prints figures).",
    )
    parser.add_argument("--users", type=int, default=10_000, help="users to sync (10,000)")
    parser.add_argument("--attributes", type=int, default=40, help="synchronized attributes")
    parser.add_argument("--events", type=int, default=2, help="whitelisted events per user")
    parser.add_argument("--rate-limit", type=float, default=100, help="requests/s (100)")
    parser.add_argument("--latency-ms", type=float, default=50, help="fake's latency (50)")
    parser.add_argument("--concurrency", type=int, default=8, help="sync.concurrency (8)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server URL (postgresql+asyncpg://…): each size gets a scratch "
        "database created on it and dropped afterwards; default: a temporary SQLite file",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="users per store call")
    parser.add_argument(
        "--baseline-requests", type=int, default=2000, help="requests of the baseline (2,000)"
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--memory-check",
        action="store_true",
        help="also load and sync a tenth of --users, each size in processes of its own, "
        "and compare their peak memory",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the service's log level; its logs go to a file in the temporary directory",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        parser.error("--database-url must be a postgresql+asyncpg:// URL")
    for name in ("users", "attributes", "concurrency", "batch_size", "baseline_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.events < 0 or args.rate_limit <= 0 or args.latency_ms < 0:
        parser.error("--events and --latency-ms must not be negative, --rate-limit positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.job, args.result)
    sizes = [args.users]
    if args.memory_check:
        sizes.insert(0, max(1, args.users // 10))
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbound-"))
    try:
        with fake_track_api(args, workdir) as (track_host, ca_file):

            def job(users: int, database_url: str = "") -> Job:
                return Job(
                    users=users,
                    attributes=args.attributes,
                    events=args.events,
                    rate_limit=args.rate_limit,
                    concurrency=args.concurrency,
                    batch_size=args.batch_size,
                    baseline_requests=args.baseline_requests,
                    database_url=database_url,
                    track_host=track_host,
                    ca_file=ca_file,
                    log_file=str(workdir / "service.log"),
                    log_level=args.log_level,
                )

            baseline = None
            if not args.skip_baseline:
                fake_control(track_host, ca_file, "POST", "reset")
                baseline = run_child("baseline", job(1), workdir)
            runs = []
            for users in sizes:
                with scratch_database(args.database_url, workdir / f"bench-{users}.db") as url:
                    load = run_child("load", job(users, url), workdir)
                    # A fresh fake bucket: the baseline's last second must not eat the sync's.
                    fake_control(track_host, ca_file, "POST", "reset")
                    runs.append((users, load, run_child("sync", job(users, url), workdir)))
        print_report(args, baseline, runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
