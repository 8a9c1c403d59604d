"""Outbound sync benchmark: both transports over the same generated users, against the fake
Track API, with each part in a process of its own so that its CPU and peak memory are its own:

- the fake Track API (``tests/fake_customerio.py``) with the configured latency and rate limit
  (it answers 429 beyond it), counting requests only;
- a **load** child per scratch database, storing the users through ``parse_notification`` +
  ``store_messages`` as ``/smart-notifier`` would: the ingest figure;
- a **sync** child per pass (``open_runtime`` + ``SyncService.run_once``) with
  ``sync.transport`` set: ``batch`` over all ``--users``, ``single`` over the first
  ``--single-users`` of the same generator (the v1 transport is paced by the rate limit at
  about 25 users/s, so it could not send 100,000 users in a bench run), each on a scratch
  database of its own;
- with ``--instances 2`` (PostgreSQL), that many batch sync children started together on one
  more scratch database holding the ``--users`` again: they share the rate limit through
  ``sync_instances`` heartbeats and split the users by claims.

Sync children open the runtime, say ``ready`` and wait for ``go`` on stdin, so the fake's
counters are reset just before a pass and parallel instances start together.

Prints figures, asserts nothing; exits 0 unless something crashed. ``bench/README.md`` says
more; ``python -m bench.outbound --help`` lists the options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
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
TARGET_INGEST = 2_000
TARGET_SEND = 2_000
TARGET_SPEEDUP = 80
TARGET_USERS_PER_REQUEST = 100
TARGET_PEAK_MB = 300
# Our reading of "peak memory flat in N": ten times the users, at most 15 % more.
TARGET_GROWTH = 1.15
# Two instances "raise" users/s when together they beat one by more than the noise.
RISE = 1.05

# Without a terminal (CI, a log file) a progress line this often instead of a bar.
PROGRESS_LINE_SECONDS = 10.0
PROFILE_LINES = 30


@dataclass(frozen=True)
class Job:
    """What a child process is asked to do, written to a JSON file for it."""

    users: int
    attributes: int
    events: int
    rate_limit: float
    concurrency: int
    batch_size: int
    transport: str
    database_url: str
    track_host: str
    ca_file: str
    log_file: str
    log_level: str
    label: str = "sync"
    bar: bool = True
    """A progress bar on a terminal; False: lines (several children share the terminal)."""
    profile_file: str = ""
    """Where the sync child writes a cProfile of its event loop thread; empty: no profile."""

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


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds another process has used so far (Linux ``/proc``); None elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        # The command may hold spaces: the fields after its closing parenthesis are fixed.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def count_429(stats: dict[str, Any]) -> int:
    return int(stats.get("by_status", {}).get("429", 0))


class Progress:
    """A tqdm bar on a terminal; a line every few seconds otherwise (CI, redirected output)."""

    def __init__(self, label: str, unit: str = "user", *, bar: bool = True):
        self.label = label
        self.unit = unit
        self.total = 0
        self.done = 0
        self.requests = 0
        self._started = time.perf_counter()
        self._last_line = self._started
        self._want_bar = bar
        self._bar: Any = None

    def start(self, total: int) -> None:
        self.total = total
        self._started = self._last_line = time.perf_counter()
        if self._want_bar and sys.stderr.isatty():
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
                "transport": job.transport,
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
    progress = Progress(job.label, bar=job.bar)
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
    """One ``SyncService.run_once`` over the pending users, once the parent says ``go``."""
    from connector.runtime import open_runtime

    progress = Progress(job.label, bar=job.bar)
    profile = cProfile.Profile() if job.profile_file else None
    async with open_runtime(build_config(job)) as runtime:
        rss_before = current_rss_mb()
        print("ready", flush=True)
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            raise RuntimeError("the benchmark did not say go")
        started = time.time()
        wall, cpu = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        summary = await runtime.sync.run_once(
            "bench",
            progress=lambda _plan, outcome: progress.advance(1, outcome.api_calls),
            on_start=progress.start,
        )
        if profile is not None:
            profile.disable()
            profile.dump_stats(job.profile_file)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finished = time.time()
        progress.close()
    return {
        "summary": summary.as_dict(),
        "users": summary.users,
        "batch_requests": summary.batch_requests,
        "batch_users": summary.batch_users,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "started": started,
        "finished": finished,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {"load": load_users, "sync": sync_users}


def run_worker(kind: str, job_file: str, result_file: str) -> int:
    job = Job(**json.loads(Path(job_file).read_text()))
    log_to_file(job.log_file, job.log_level)
    result = asyncio.run(WORKERS[kind](job))
    Path(result_file).write_text(json.dumps(result))
    return 0


# -- the orchestrating process ---------------------------------------------------------------


@contextlib.contextmanager
def fake_track_api(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, str]]:
    """Start the fake in a process of its own; yield its ``host:port`` and CA file (what
    ``bench/fuzz.py`` uses too)."""
    with fake_process(args, workdir) as (host, ca_file, _):
        yield host, ca_file


@contextlib.contextmanager
def fake_process(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, str, int]]:
    """Start the fake in a process of its own; yield its ``host:port``, CA file and pid."""
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
        yield words[1], words[2], process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _files(kind: str, job: Job, workdir: Path) -> tuple[list[str], Path]:
    """The command of a child doing ``job``, and the file it writes its result to."""
    stem = workdir / f"{kind}-{job.label.replace(' ', '-')}-{job.users}"
    job_file, result_file = stem.with_suffix(".job.json"), stem.with_suffix(".result.json")
    job_file.write_text(json.dumps(asdict(job)))
    command = [sys.executable, "-m", "bench.outbound", "--worker", kind]
    command += ["--job", str(job_file), "--result", str(result_file)]
    return command, result_file


def run_load(job: Job, workdir: Path) -> dict[str, Any]:
    command, result_file = _files("load", job, workdir)
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(result_file.read_text())


def run_passes(
    jobs: list[Job], workdir: Path, fake_pid: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sync children for ``jobs``, started together once each has opened its runtime; their
    results and what the fake counted over the passes (reset just before they began), with
    the fake's CPU seconds."""
    started: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for job in jobs:
            command, result_file = _files("sync", job, workdir)
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
            )
            started.append((process, result_file))
        for process, _ in started:
            assert process.stdout is not None
            said = process.stdout.readline().strip()
            if said != "ready":
                raise RuntimeError(f"a sync child did not start (said {said!r})")
        job = jobs[0]
        fake_control(job.track_host, job.ca_file, "POST", "reset")
        fake_cpu = process_cpu_seconds(fake_pid)
        for process, _ in started:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for process, _ in started:
            if process.wait() != 0:
                raise RuntimeError(f"a sync child exited with status {process.returncode}")
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    stats = fake_control(job.track_host, job.ca_file, "GET", "stats")
    after = process_cpu_seconds(fake_pid)
    stats["cpu_seconds"] = None if fake_cpu is None or after is None else after - fake_cpu
    return [json.loads(result_file.read_text()) for _, result_file in started], stats


@dataclass
class Run:
    """One scratch database: its load, its passes (one per instance) and the fake's counts."""

    transport: str
    users: int
    load: dict[str, Any]
    passes: list[dict[str, Any]]
    fake: dict[str, Any]

    @property
    def sent(self) -> int:
        return sum(p["summary"]["sent"] for p in self.passes)

    @property
    def handled(self) -> int:
        return sum(p["users"] for p in self.passes)

    @property
    def wall(self) -> float:
        """From the first pass's start to the last one's end."""
        return max(p["finished"] for p in self.passes) - min(p["started"] for p in self.passes)

    @property
    def cpu(self) -> float:
        return sum(p["cpu_seconds"] for p in self.passes)

    @property
    def requests(self) -> int:
        return sum(p["summary"]["api_calls"] for p in self.passes)

    @property
    def send_rate(self) -> float:
        return self.sent / self.wall

    @property
    def ingest_rate(self) -> float:
        return self.load["users"] / self.load["wall_seconds"]

    @property
    def users_per_request(self) -> float:
        return self.sent / max(self.requests, 1)

    @property
    def peak_rss(self) -> float:
        return max(p["peak_rss_mb"] for p in self.passes)

    @property
    def too_many(self) -> int:
        return count_429(self.fake)

    def problems(self, per_user: int) -> list[str]:
        """What went otherwise than planned: every user sent, no error, the v1 request count."""
        found = []
        errors = {p["summary"]["error"] for p in self.passes} - {None}
        if self.sent != self.users or self.handled != self.users or errors:
            failed = sum(p["summary"]["failed"] + p["summary"]["retrying"] for p in self.passes)
            found.append(
                f"{self.transport}: {self.sent:,} of {self.users:,} users sent, "
                f"{failed:,} failed or retrying, errors {sorted(errors) or 'none'}"
            )
        if self.transport == "single" and self.requests != self.users * per_user:
            found.append(f"single: {self.requests:,} requests, {self.users * per_user:,} expected")
        if self.requests != self.fake["total"]:
            found.append(
                f"{self.transport}: the service counted {self.requests:,} requests, "
                f"the fake {self.fake['total']:,}"
            )
        return found


def _row(label: str, value: str, target: str = "", met: bool | None = None) -> str:
    return row(label, value, target, met, widths=(30, 44, 14))


def _pair(batch: str, single: str) -> str:
    return f"{batch:<24}{single}"


def print_report(
    args: argparse.Namespace,
    batch: Run,
    single: Run,
    together: Run | None,
    smaller: Run | None,
    profile: str,
) -> None:
    limit = args.rate_limit
    database = "PostgreSQL" if args.database_url else "SQLite"
    per_user = requests_per_user(args.attributes, args.events)
    print()
    print("Customer.io outbound benchmark (figures, not assertions)")
    print(
        f"  {batch.users:,} users x {args.attributes} attributes, {args.events} whitelisted "
        f"events · {database} · sync.concurrency {args.concurrency} · "
        f"{os.cpu_count()} CPUs · Python {sys.version.split()[0]}"
    )
    print(
        f"  fake Track API: {limit:g} req/s limit, {args.latency_ms:g} ms latency · "
        f"batch_max_bytes/operations: the service's defaults"
    )
    print(
        f"  single transport ({per_user} v1 requests a user) on the first {single.users:,} "
        "of the same users, in a scratch database of their own"
    )

    print()
    print(f"Ingest (parse_notification + store_messages, {args.batch_size} users per call)")
    print(
        _row(
            "users/s",
            f"{batch.ingest_rate:,.0f} ({batch.users:,} in {batch.load['wall_seconds']:.1f} s)",
            f"≥ {TARGET_INGEST:,}",
            batch.ingest_rate >= TARGET_INGEST,
        )
    )
    print(
        _row(
            "CPU seconds / 1,000 users",
            f"{batch.load['cpu_seconds'] / batch.users * 1000:.2f}",
        )
    )
    print(
        _row(
            "peak RSS",
            f"{batch.load['peak_rss_mb']:.0f} MB",
            f"≤ {TARGET_PEAK_MB} MB",
            batch.load["peak_rss_mb"] <= TARGET_PEAK_MB,
        )
    )

    print()
    print(f"Send (SyncService.run_once)        {_pair('batch', 'single')}")
    print(_row("users sent", _pair(f"{batch.sent:,}", f"{single.sent:,}")))
    print(_row("wall time", _pair(f"{batch.wall:.1f} s", f"{single.wall:.1f} s")))
    print(_row("users/s", _pair(f"{batch.send_rate:,.1f}", f"{single.send_rate:,.1f}")))
    print(
        _row(
            "requests (the fake counted)",
            _pair(
                f"{batch.requests:,} ({batch.fake['total']:,})",
                f"{single.requests:,} ({single.fake['total']:,})",
            ),
        )
    )

    def rate(run: Run) -> str:
        per_second = run.requests / run.wall
        return f"{per_second:.1f} ({per_second / limit:.2f} of limit)"

    print(_row("requests/s", _pair(rate(batch), rate(single))))
    service_upr = batch.passes[0]["batch_users"] / max(batch.passes[0]["batch_requests"], 1)
    print(
        _row(
            "users per request",
            _pair(
                f"{batch.users_per_request:.1f} (service: {service_upr:.1f})",
                f"{single.users_per_request:.2f}",
            ),
        )
    )
    print(_row("429s", _pair(str(batch.too_many), str(single.too_many))))

    def cpu(run: Run) -> str:
        return f"{run.cpu / max(run.sent, 1) * 1000:.2f} ({run.cpu / run.wall:.2f} cores)"

    print(_row("CPU s / 1,000 users (cores)", _pair(cpu(batch), cpu(single))))

    def fake_cpu(run: Run) -> str:
        seconds = run.fake.get("cpu_seconds")
        if seconds is None:
            return "?"
        return f"{seconds / max(run.sent, 1) * 1000:.2f} ({seconds / run.wall:.2f} cores)"

    print(_row("the fake's, same", _pair(fake_cpu(batch), fake_cpu(single))))
    print(
        _row(
            "peak RSS",
            _pair(f"{batch.peak_rss:.0f} MB", f"{single.peak_rss:.0f} MB"),
        )
    )
    speedup = batch.send_rate / single.send_rate
    packing = batch.users_per_request / single.users_per_request
    print(_row("batch ÷ single", f"{speedup:,.1f}x users/s, {packing:,.0f}x users per request"))

    print()
    print("Targets")
    print(
        _row(
            "ingest users/s",
            f"{batch.ingest_rate:,.0f}",
            f"≥ {TARGET_INGEST:,}",
            batch.ingest_rate >= TARGET_INGEST,
        )
    )
    print(
        _row(
            "send users/s, batch",
            f"{batch.send_rate:,.0f}",
            f"≥ {TARGET_SEND:,}",
            batch.send_rate >= TARGET_SEND,
        )
    )
    print(
        _row(
            "batch ÷ single users/s",
            f"{speedup:,.1f}x",
            f"≥ {TARGET_SPEEDUP}x",
            speedup >= TARGET_SPEEDUP,
        )
    )
    print(
        _row(
            "users per request, batch",
            f"{batch.users_per_request:.1f}",
            f"≥ {TARGET_USERS_PER_REQUEST}",
            batch.users_per_request >= TARGET_USERS_PER_REQUEST,
        )
    )
    runs = [batch, single] + ([together] if together else []) + ([smaller] if smaller else [])
    too_many = sum(run.too_many for run in runs)
    print(_row("429s, every pass", str(too_many), "0", too_many == 0))
    peak = max(max(run.peak_rss, run.load["peak_rss_mb"]) for run in runs)
    print(
        _row(
            "peak RSS, every child",
            f"{peak:.0f} MB ({batch.users:,} users)",
            f"≤ {TARGET_PEAK_MB} MB",
            peak <= TARGET_PEAK_MB,
        )
    )
    if smaller is not None:
        print(
            _row(
                f"batch sync, {smaller.users:,} users",
                f"{smaller.send_rate:,.0f} users/s, "
                f"{smaller.cpu / max(smaller.sent, 1) * 1000:.2f} CPU s / 1,000 users",
            )
        )
        growth = batch.peak_rss / smaller.peak_rss
        factor = batch.users / smaller.users
        print(
            _row(
                "batch sync peak RSS growth",
                f"{growth:.2f}x for {factor:.0f}x the users "
                f"({smaller.peak_rss:.0f} → {batch.peak_rss:.0f} MB)",
                f"≤ {TARGET_GROWTH}x",
                growth <= TARGET_GROWTH,
            )
        )
        load_growth = batch.load["peak_rss_mb"] / smaller.load["peak_rss_mb"]
        print(
            _row(
                "load peak RSS growth",
                f"{load_growth:.2f}x ({smaller.load['peak_rss_mb']:.0f} → "
                f"{batch.load['peak_rss_mb']:.0f} MB)",
                f"≤ {TARGET_GROWTH}x",
                load_growth <= TARGET_GROWTH,
            )
        )

    if together is not None:
        print()
        print(f"{len(together.passes)} instances on one database, started together (batch)")
        for i, one in enumerate(together.passes, 1):
            print(
                _row(
                    f"instance {i}",
                    f"{one['summary']['sent']:,} users, {one['summary']['api_calls']:,} requests "
                    f"in {one['wall_seconds']:.1f} s, {one['cpu_seconds']:.1f} CPU s, "
                    f"{one['peak_rss_mb']:.0f} MB",
                )
            )
        gain = together.send_rate / batch.send_rate
        verdict = "rose" if gain >= RISE else "did not rise"
        print(
            _row(
                "combined users/s",
                f"{together.send_rate:,.0f} = {gain:.2f}x one instance's: {verdict}",
            )
        )
        print(_row("requests/s", rate(together)))
        print(_row("429s", str(together.too_many), "0", together.too_many == 0))
        print(_row("ingest (loaded again)", f"{together.ingest_rate:,.0f} users/s"))

    problems = [p for run in runs for p in run.problems(per_user)]
    for problem in problems:
        print(f"  NOTE: {problem}: the figures describe a pass that did not go as planned.")
    if profile:
        print()
        print("Profile of the batch pass's event loop thread (cProfile: the figures above")
        print(
            "are slowed by it; worker threads, where requests are encoded and sent, are not in it)"
        )
        print(profile)
    print()


def profile_summary(path: Path) -> str:
    if not path.exists():
        return ""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(PROFILE_LINES)
    return out.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the outbound sync, batch and single transports, against the "
        "fake Track API (prints figures).",
    )
    parser.add_argument("--users", type=int, default=100_000, help="users, batch (100,000)")
    parser.add_argument(
        "--single-users",
        type=int,
        default=2_000,
        help="the first users of the same data sent with the single transport (2,000)",
    )
    parser.add_argument("--attributes", type=int, default=40, help="synchronized attributes")
    parser.add_argument("--events", type=int, default=2, help="whitelisted events per user")
    parser.add_argument("--rate-limit", type=float, default=100, help="requests/s (100)")
    parser.add_argument("--latency-ms", type=float, default=50, help="fake's latency (50)")
    parser.add_argument("--concurrency", type=int, default=8, help="sync.concurrency (8)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server URL (postgresql+asyncpg://…): each run gets a scratch "
        "database created on it and dropped afterwards; default: temporary SQLite files",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="users per store call")
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="also run this many batch sync instances together on one database holding "
        "--users again (PostgreSQL only; 1: no such run)",
    )
    parser.add_argument(
        "--memory-check",
        action="store_true",
        help="also load and batch-sync a tenth of --users, in processes and a database of "
        "their own, and compare peak memory",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the batch pass's event loop thread and print the top functions",
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
    for name in ("users", "single_users", "attributes", "concurrency", "batch_size", "instances"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.events < 0 or args.rate_limit <= 0 or args.latency_ms < 0:
        parser.error("--events and --latency-ms must not be negative, --rate-limit positive")
    if args.instances > 1 and not args.database_url:
        parser.error("--instances needs --database-url: instances share a PostgreSQL database")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.job, args.result)
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbound-"))
    try:
        with fake_process(args, workdir) as (track_host, ca_file, fake_pid):
            base = Job(
                users=args.users,
                attributes=args.attributes,
                events=args.events,
                rate_limit=args.rate_limit,
                concurrency=args.concurrency,
                batch_size=args.batch_size,
                transport="batch",
                database_url="",
                track_host=track_host,
                ca_file=ca_file,
                log_file=str(workdir / "service.log"),
                log_level=args.log_level,
            )

            def run(name: str, transport: str, users: int, instances: int = 1, **extra: Any) -> Run:
                """Load ``users`` into a scratch database, then sync them with ``instances``."""
                print(f"{name}: {users:,} users, {transport} transport", file=sys.stderr)
                with scratch_database(args.database_url, workdir / f"{name}.db") as url:
                    job = replace(base, users=users, transport=transport, database_url=url)
                    load = run_load(replace(job, label=f"{name} load"), workdir)
                    jobs = [
                        replace(
                            job,
                            label=f"{name} sync {i}" if instances > 1 else f"{name} sync",
                            bar=instances == 1,
                            **extra,
                        )
                        for i in range(1, instances + 1)
                    ]
                    passes, fake = run_passes(jobs, workdir, fake_pid)
                return Run(transport, users, load, passes, fake)

            smaller = None
            if args.memory_check:
                smaller = run("tenth", "batch", max(1, args.users // 10))
            profile_file = workdir / "batch.prof" if args.profile else None
            batch = run(
                "batch",
                "batch",
                args.users,
                profile_file=str(profile_file) if profile_file else "",
            )
            single = run("single", "single", min(args.single_users, args.users))
            together = None
            if args.instances > 1:
                together = run("instances", "batch", args.users, args.instances)
        profile = profile_summary(profile_file) if profile_file else ""
        print_report(args, batch, single, together, smaller, profile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
