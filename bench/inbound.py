"""Inbound webhook benchmark: signed reporting webhooks at full speed and at a fixed rate.

Prints figures, asserts nothing. Every server runs in a process of its own, on 127.0.0.1:

- the **service** (``python -m connector serve``) on a scratch SQLite file (or a scratch
  database on ``--database-url``'s PostgreSQL server), with a webhook signing key, so every
  request pays for the token check, the signature check, the JSON parse and the group commit;
- a **bare** aiohttp server whose handler reads the body and answers ``200 {"ok": true}``:
  the ceiling the service is compared with, measured in the same run, on the event loop the
  service runs on (uvloop where it is installed).

This process is the load generator. The webhooks (the reporting fixtures in
``tests/fixtures``, each with an event id of its own, signed with the current time) are built
before any clock starts. The phases, for the service with one process:

1. **fixed rate**: ``--rate`` webhooks a second against the service, on its fresh database,
   open loop (each is sent at its scheduled time whether or not earlier ones were answered),
   latency counted from the scheduled time. Once the processor has caught up, the
   **processing lag** of those webhooks (arrival to tracked event:
   ``tracked_events.created_at`` minus ``webhook_deliveries.received_at``).
2. **full speed**: ``--connections`` keep-alive connections, each sending its next webhook as
   soon as the previous one is answered, against the bare server and the service in turns
   (``--rounds`` of each, ``--duration`` seconds in all for each server): this machine's speed
   drifts by tens of percent within a minute, and measured in turns both servers see the same
   drift. After each turn of the service its processor empties the inbox before the next turn.
   ``wrk`` generates this load when it is installed (much cheaper per request than a Python
   client, which matters on a small machine where client and server share the cores);
   otherwise an aiohttp client. Then, unless ``--wide-connections 0``, the same on that many
   connections (128): on 32 connections, each with one request in flight, the service's rate
   is also bound by each request's wait for its commit, which the bare handler does not have
   (see ``docs/design.md``, Inbound).
3. **durability**: the rows in ``webhook_deliveries`` against the webhooks acknowledged as
   new; then, unless ``--skip-crash``, the service is killed with SIGKILL under load and
   every event id it had acknowledged is looked up in the database.
4. unless ``--workers 1``, phases 1 and 2 again against ``connector serve --workers N``
   (default 2) on a fresh database.

Run ``python bench/inbound.py --help`` for the options; ``bench/README.md`` says more.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.report import REPO, row
from connector.web.serving import event_loop_name, new_event_loop
from tests.support import free_port, scratch_database
from tests.support import stop_process as stop

FIXTURES = REPO / "tests" / "fixtures"
# The fixtures that are Customer.io reporting webhooks (the others are platform notifications).
WEBHOOK_FIXTURES = (
    "email_sent.json",
    "email_clicked.json",
    "customer_subscribed.json",
    "customer_preferences_changed.json",
    "legacy_email_opened.json",
)
HOST = "127.0.0.1"
ADMIN_PASSWORD = "bench-admin-password"
SIGNING_KEY = "bench-signing-key-0123456789abcdef"

# Targets from the issue: acknowledged-and-committed rate against the bare handler on one
# process, latency at the fixed rate, and arrival -> tracked event at the fixed rate.
TARGET_RATIO = 0.7
TARGET_P99_MS = 20.0
TARGET_LAG_P99_S = 2.0
# "The rate was achieved" when this share of the scheduled webhooks went out on time.
RATE_ACHIEVED_SHARE = 0.98

STARTUP_SECONDS = 30.0
# How often the inbox is looked at while the processor drains the first phase's backlog.
DRAIN_POLL_SECONDS = 0.5
REQUEST_TIMEOUT_SECONDS = 10.0
# Requests still unanswered this long after a phase ends are counted as errors.
SETTLE_SECONDS = 15.0
CRASH_LOAD_SECONDS = 2.0
# wrk's request pool is built before the run: this many per second of --duration, at most.
WRK_POOL_PER_SECOND_CAP = 30_000


# -- the bare server -------------------------------------------------------------------------


def run_bare_server(port: int) -> int:
    """Serve ``POST /webhook`` reading the body and answering 200 ``{"ok": true}``."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhook", handler)
    app.router.add_get("/healthz", lambda _request: _ok())
    # On the event loop the service runs on (uvloop where installed): the comparison is of
    # what the handlers do, not of the loops.
    loop = new_event_loop()
    web.run_app(app, host=HOST, port=port, print=None, access_log=None, loop=loop)
    return 0


async def _ok() -> Any:
    from aiohttp import web

    return web.json_response({"status": "ok"})


# -- processes -------------------------------------------------------------------------------


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 5) -> bytes:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def wait_healthy(base_url: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{base_url} exited at start:\n{log_file.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            http_get(f"{base_url}/healthz", timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{base_url} did not answer /healthz within {STARTUP_SECONDS:g} s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process, from ``/proc`` (None where there is none)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields_after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields_after_name[11]) + int(fields_after_name[12])
        return ticks / os.sysconf("SC_CLK_TCK")
    return None


@dataclass
class Server:
    label: str
    base_url: str
    webhook_url: str
    process: subprocess.Popen
    log_file: Path

    def cpu(self) -> float | None:
        """CPU of the server and of its workers (``serve --workers N`` forks them)."""
        total = cpu_seconds(self.process.pid)
        for child in child_pids(self.process.pid):
            total = (total or 0.0) + (cpu_seconds(child) or 0.0)
        return total


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


@contextlib.contextmanager
def bare_server(workdir: Path) -> Iterator[Server]:
    port = free_port()
    log_file = workdir / "bare.log"
    command = [sys.executable, "-m", "bench.inbound", "--bare-server", str(port)]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        base_url = f"http://{HOST}:{port}"
        wait_healthy(base_url, process, log_file)
        yield Server("bare", base_url, f"{base_url}/webhook", process, log_file)
    finally:
        stop(process)


def settings_toml(port: int, database_url: str) -> str:
    return "\n".join(
        [
            "[server]",
            f'host = "{HOST}"',
            f"port = {port}",
            f'public_url = "http://{HOST}:{port}"',
            "[database]",
            f"url = {json.dumps(database_url)}",
            "[security]",
            f'admin_password = "{ADMIN_PASSWORD}"',
            "[sync]",
            "scheduled = false",
            "[connector]",
            f'webhook_signing_key = "{SIGNING_KEY}"',
            "",
        ]
    )


def start_service(workdir: Path, database_url: str, label: str, workers: int = 1) -> Server:
    """``connector migrate`` then ``connector serve [--workers N]`` on a free port; the caller
    stops it."""
    port = free_port()
    config = workdir / f"{label}.toml"
    config.write_text(settings_toml(port, database_url))
    connector = [sys.executable, "-m", "connector", "--config", str(config)]
    subprocess.run([*connector, "migrate"], check=True, cwd=REPO, capture_output=True)
    log_file = workdir / f"{label}.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*connector, "serve", *(["--workers", str(workers)] if workers > 1 else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        base_url = f"http://{HOST}:{port}"
        wait_healthy(base_url, process, log_file)
        answer = http_get(f"{base_url}/api/webhook-url", auth=("admin", ADMIN_PASSWORD))
        url = json.loads(answer)["url"]
    except BaseException:
        stop(process)
        raise
    return Server(label, base_url, url, process, log_file)


# -- the database ----------------------------------------------------------------------------


def _sqlite_path(database_url: str) -> str:
    return database_url.split(":///", 1)[1]


def query(database_url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run a read-only query: SQLite opened read-only, PostgreSQL through the engine."""
    if database_url.startswith("sqlite"):
        uri = f"file:{_sqlite_path(database_url)}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            return connection.execute(statement).fetchall()
        finally:
            connection.close()

    async def run() -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        from connector.db.engine import make_engine

        engine = make_engine(database_url)
        try:
            async with engine.connect() as connection:
                return [tuple(row) for row in await connection.execute(text(statement))]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def stored_count(database_url: str) -> int:
    return int(query(database_url, "SELECT count(*) FROM webhook_deliveries")[0][0])


def pending_count(database_url: str) -> int:
    statement = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    return int(query(database_url, statement)[0][0])


def stored_event_ids(database_url: str) -> set[str]:
    return {row[0] for row in query(database_url, "SELECT event_id FROM webhook_deliveries")}


def processing_lags(database_url: str, event_ids: list[str]) -> list[float]:
    """Seconds from arrival to tracked event of each of ``event_ids`` that was tracked."""
    wanted = set(event_ids)
    rows = query(
        database_url,
        "SELECT d.event_id, d.received_at, t.created_at FROM webhook_deliveries d "
        "JOIN tracked_events t ON t.event_id = d.event_id",
    )
    lags = []
    for event_id, received, tracked in rows:
        if event_id in wanted:
            lags.append((_moment(tracked) - _moment(received)).total_seconds())
    return sorted(lags)


def _moment(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def wait_drained(database_url: str, timeout: float) -> tuple[float, int]:
    """Wait for the background processor to empty the inbox: (seconds waited, left pending)."""
    started = time.monotonic()
    left = pending_count(database_url)
    while left and time.monotonic() - started < timeout:
        time.sleep(DRAIN_POLL_SECONDS)
        left = pending_count(database_url)
    return time.monotonic() - started, left


# -- the webhooks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    event_id: str
    body: bytes
    headers: dict[str, str]


class WebhookFactory:
    """Signed reporting webhooks from the fixtures, each with an event id never used before."""

    def __init__(self) -> None:
        from connector.inbound.signing import WebhookVerifier

        self._templates = [json.loads((FIXTURES / name).read_text()) for name in WEBHOOK_FIXTURES]
        self._verifier = WebhookVerifier(SIGNING_KEY)
        self._run = uuid.uuid4().hex[:8]
        self._next = 0

    def build(self, count: int) -> list[Webhook]:
        timestamp = str(int(time.time()))
        webhooks = []
        for _ in range(count):
            n = self._next
            self._next += 1
            payload = dict(self._templates[n % len(self._templates)])
            payload["event_id"] = event_id = f"bench-{self._run}-{n:09d}"
            body = json.dumps(payload, separators=(",", ":")).encode()
            headers = {
                "Content-Type": "application/json",
                "X-CIO-Timestamp": timestamp,
                "X-CIO-Signature": self._verifier.sign(timestamp, body),
            }
            webhooks.append(Webhook(event_id, body, headers))
        return webhooks


# -- load generators -------------------------------------------------------------------------


@dataclass
class LoadResult:
    client: str
    seconds: float
    sent: int = 0
    acked: int = 0
    duplicates: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    acked_ids: list[str] = field(default_factory=list)
    # What wrk summarises itself (it keeps no list of latencies).
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    repeated: int = 0
    late_sends: int = 0
    max_send_lag_ms: float = 0.0
    client_cpu: float | None = None
    server_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        if self.percentiles_ms:
            return self.percentiles_ms[str(p)]
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[rank]

    @property
    def max_ms(self) -> float:
        if self.percentiles_ms:
            return self.percentiles_ms["max"]
        return max(self.latencies_ms, default=float("nan"))


def _session(connections: int) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _post(
    session: Any, url: str, webhook: Webhook, started: float, result: LoadResult
) -> None:
    """One webhook; its outcome and latency (from ``started``, a loop time) into ``result``."""
    import aiohttp

    loop = asyncio.get_running_loop()
    result.sent += 1
    try:
        async with session.post(url, data=webhook.body, headers=webhook.headers) as response:
            body = await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.errors[type(exc).__name__] += 1
        return
    result.latencies_ms.append((loop.time() - started) * 1000)
    if not 200 <= status < 300:
        result.errors[f"HTTP {status}"] += 1
        return
    result.acked += 1
    if b'"duplicate"' in body:
        result.duplicates += 1
    else:
        result.acked_ids.append(webhook.event_id)


async def closed_loop(
    url: str,
    webhooks: list[Webhook],
    seconds: float,
    connections: int,
    server: Server | None = None,
) -> LoadResult:
    """Each connection sends its next webhook as soon as the last is answered, until the end;
    what is in flight then is still waited for (and counted)."""
    result = LoadResult("aiohttp", seconds)
    pool = iter(webhooks)
    loop = asyncio.get_running_loop()
    async with _session(connections) as session:
        cpu, server_cpu = time.process_time(), server.cpu() if server else None
        started = loop.time()
        deadline = started + seconds

        async def worker() -> None:
            for webhook in pool:
                if loop.time() >= deadline:
                    return
                await _post(session, url, webhook, loop.time(), result)

        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(connections))), seconds + SETTLE_SECONDS
        )
        result.seconds = loop.time() - started
        result.client_cpu = time.process_time() - cpu
        result.server_cpu = _cpu_delta(server, server_cpu)
    if result.sent == len(webhooks):
        result.errors["pool exhausted"] += 1
    return result


async def fixed_rate(
    url: str, webhooks: list[Webhook], rate: float, connections: int, server: Server
) -> LoadResult:
    """Send ``webhooks`` at ``rate`` a second, open loop; latency from the scheduled time."""
    result = LoadResult("aiohttp", len(webhooks) / rate)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()
    async with _session(connections) as session:
        cpu, server_cpu = time.process_time(), server.cpu()
        started = loop.time() + 0.05
        for n, webhook in enumerate(webhooks):
            scheduled = started + n / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = (loop.time() - scheduled) * 1000
            result.max_send_lag_ms = max(result.max_send_lag_ms, lag)
            # A send more than one interval late means the generator, not the server, fell behind.
            if lag > 1000 / rate:
                result.late_sends += 1
            task = asyncio.create_task(_post(session, url, webhook, scheduled, result))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=SETTLE_SECONDS)
        result.seconds = loop.time() - started
        result.client_cpu = time.process_time() - cpu
        result.server_cpu = _cpu_delta(server, server_cpu)
    for task in pending:
        task.cancel()
    return result


def run_client(coroutine: Any) -> Any:
    """Run a load-generating coroutine on the loop the servers run on (uvloop where installed):
    asyncio's own loop costs the client about a third more a request, which on two cores is
    taken from the server, and at a fixed rate shows as late sends."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def _cpu_delta(server: Server | None, before: float | None) -> float | None:
    after = server.cpu() if server else None
    return None if before is None or after is None else after - before


WRK_SCRIPT = r"""
-- Written by bench/inbound.py: each thread sends its share of the pre-built, signed webhooks.
local threads = {}
local count = 0

function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

function init(args)
  local path, file, nthreads = args[1], args[2], tonumber(args[3])
  pool = {}
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid then
      local ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      pool[#pool + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/json",
        ["X-CIO-Timestamp"] = ts,
        ["X-CIO-Signature"] = sig,
      }, body)
    end
    i = i + 1
  end
  size = #pool
  issued = 0
end

function request()
  issued = issued + 1
  return pool[(issued - 1) % #pool + 1]
end

function done(summary, latency, requests)
  local repeats = 0
  for _, t in ipairs(threads) do
    repeats = repeats + math.max(0, t:get("issued") - t:get("size"))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests": %d, "duration_us": %d, "status": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "repeated": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, repeats))
end
"""


def run_wrk(
    url: str, webhooks: list[Webhook], seconds: float, connections: int, workdir: Path, server
) -> LoadResult:
    """The full-speed phase with wrk (one thread: the server keeps the other core)."""
    from urllib.parse import urlsplit

    threads = 1
    parts = urlsplit(url)
    path = f"{parts.path}?{parts.query}" if parts.query else parts.path
    pool_file, script = workdir / "wrk-pool.tsv", workdir / "wrk.lua"
    with pool_file.open("w", encoding="utf-8") as out:
        for webhook in webhooks:
            ts, sig = webhook.headers["X-CIO-Timestamp"], webhook.headers["X-CIO-Signature"]
            out.write(f"{ts}\t{sig}\t{webhook.body.decode()}\n")
    script.write_text(WRK_SCRIPT)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s"]
    command += [f"--timeout={REQUEST_TIMEOUT_SECONDS:g}s", "-s", str(script), url, "--"]
    command += [path, str(pool_file), str(threads)]
    server_cpu = server.cpu()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH-JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    summary = json.loads(line.removeprefix("BENCH-JSON "))
    result = LoadResult("wrk", summary["duration_us"] / 1e6)
    result.server_cpu = _cpu_delta(server, server_cpu)
    result.sent = summary["requests"]
    result.acked = summary["requests"] - summary["status"]
    result.repeated = summary["repeated"]
    for name in ("status", "connect", "read", "write", "timeout"):
        if summary[name]:
            result.errors["non-2xx" if name == "status" else name] = summary[name]
    result.percentiles_ms = {
        "50": summary["p50_us"] / 1000,
        "99": summary["p99_us"] / 1000,
        "max": summary["max_us"] / 1000,
    }
    return result


def full_speed(
    args: argparse.Namespace,
    server: Server,
    factory: WebhookFactory,
    workdir: Path,
    pool: int,
    seconds: float,
    connections: int,
) -> LoadResult:
    """``server`` at full speed for ``seconds`` on ``connections`` keep-alive connections."""
    webhooks = factory.build(pool)
    if args.use_wrk:
        return run_wrk(server.webhook_url, webhooks, seconds, connections, workdir, server)
    return run_client(closed_loop(server.webhook_url, webhooks, seconds, connections, server))


def merged(results: list[LoadResult]) -> LoadResult:
    """Several runs against one server as one: counts and times added; with wrk, which keeps
    no list of latencies, p50 and p99 are the median of the runs' own, max the largest."""
    total = LoadResult(results[0].client, sum(r.seconds for r in results))
    for result in results:
        total.sent += result.sent
        total.acked += result.acked
        total.duplicates += result.duplicates
        total.errors.update(result.errors)
        total.latencies_ms += result.latencies_ms
        total.acked_ids += result.acked_ids
        total.repeated += result.repeated
        for name in ("client_cpu", "server_cpu"):
            value = getattr(result, name)
            if value is not None:
                setattr(total, name, (getattr(total, name) or 0.0) + value)
    if all(result.percentiles_ms for result in results):
        for p in ("50", "99"):
            total.percentiles_ms[p] = statistics.median(r.percentiles_ms[p] for r in results)
        total.percentiles_ms["max"] = max(r.percentiles_ms["max"] for r in results)
    return total


@dataclass
class Paired:
    """Full speed against the bare handler and the service, in turns (see :func:`paired`)."""

    bare: LoadResult | None
    service: LoadResult
    # (bare, service) req/s of each round.
    rounds: list[tuple[float, float]]
    # The longest wait for the inbox to drain after a turn of the service, and what was left.
    drained: tuple[float, int]

    @property
    def ratio(self) -> float | None:
        if self.bare is None or not self.bare.rate:
            return None
        return self.service.rate / self.bare.rate

    @property
    def round_ratios(self) -> list[float]:
        return sorted(service / bare for bare, service in self.rounds if bare)


def paired(
    args: argparse.Namespace,
    bare: Server | None,
    service: Server,
    database_url: str,
    factory: WebhookFactory,
    workdir: Path,
    connections: int,
) -> Paired:
    """The bare handler and the service at full speed in turns: ``--rounds`` rounds of
    ``--duration / --rounds`` seconds each, the bare handler first in even rounds and second in
    odd ones. This machine's speed drifts by tens of percent within a minute (other tenants of
    the host); measured in turns, both servers see the same drift, which one phase each did
    not. After each turn of the service, its processor drains the inbox before the next turn
    of either server, so that neither pays for the backlog of the last."""
    seconds = args.duration / args.rounds
    if args.use_wrk:
        seconds = max(1, round(seconds))  # wrk takes whole seconds
    pool = int(seconds * WRK_POOL_PER_SECOND_CAP)
    results: dict[str, list[LoadResult]] = {"bare": [], "service": []}
    rounds: list[tuple[float, float]] = []
    drained = (0.0, 0)
    for number in range(args.rounds):
        turns = [("bare", bare), ("service", service)]
        if number % 2:
            turns.reverse()
        rates = {"bare": 0.0}
        for name, server in turns:
            if server is None:
                continue
            result = full_speed(args, server, factory, workdir, pool, seconds, connections)
            results[name].append(result)
            rates[name] = result.rate
            if server is service:
                waited = wait_drained(database_url, args.drain_timeout)
                drained = max(drained, waited)
        rounds.append((rates["bare"], rates["service"]))
    bare_result = merged(results["bare"]) if results["bare"] else None
    return Paired(bare_result, merged(results["service"]), rounds, drained)


def crash_check(service: Server, factory: WebhookFactory, args: argparse.Namespace) -> LoadResult:
    """Load the service, SIGKILL it half-way, and look up every event id it acknowledged."""

    async def load_then_kill() -> LoadResult:
        async def killer() -> None:
            await asyncio.sleep(CRASH_LOAD_SECONDS / 2)
            os.kill(service.process.pid, signal.SIGKILL)

        kill = asyncio.create_task(killer())
        result = await closed_loop(
            service.webhook_url,
            factory.build(int(CRASH_LOAD_SECONDS * 20_000)),
            CRASH_LOAD_SECONDS,
            args.connections,
        )
        await kill
        return result

    result = run_client(load_then_kill())
    service.process.wait(timeout=10)
    return result


# -- the report ------------------------------------------------------------------------------


def _row(label: str, value: str, target: str = "", met: bool | None = None) -> str:
    return row(label, value, target, met, widths=(30, 46, 14))


def _errors(result: LoadResult) -> str:
    if not result.errors:
        return "none"
    return ", ".join(f"{name} {count:,}" for name, count in result.errors.most_common())


def _cores(result: LoadResult) -> str:
    parts = []
    if result.server_cpu is not None and result.seconds:
        parts.append(f"server {result.server_cpu / result.seconds:.2f}")
    if result.client_cpu is not None and result.seconds:
        parts.append(f"client {result.client_cpu / result.seconds:.2f}")
    return ", ".join(parts) + " cores" if parts else "n/a"


def print_load(title: str, result: LoadResult) -> None:
    print(title)
    duplicates = f", {result.duplicates:,} duplicates" if result.duplicates else ""
    print(
        _row(
            "acknowledged",
            f"{result.acked:,} in {result.seconds:.1f} s = {result.rate:,.0f} req/s{duplicates}",
        )
    )
    print(_row("errors", _errors(result)))
    print(
        _row(
            "latency p50 / p99 / max",
            f"{result.percentile(50):.1f} / {result.percentile(99):.1f} / {result.max_ms:.1f} ms",
        )
    )
    print(_row("CPU", _cores(result)))


def print_header(args: argparse.Namespace) -> None:
    database = "PostgreSQL" if args.database_url else "SQLite"
    client = "wrk (1 thread)" if args.use_wrk else "aiohttp client (this process)"
    print()
    print("Customer.io inbound webhook benchmark")
    print(
        f"  service on {database}, signed webhooks from {len(WEBHOOK_FIXTURES)} fixtures · "
        f"{args.connections} connections · full speed: {client} · "
        f"{os.cpu_count()} CPUs · Python {sys.version.split()[0]} · "
        f"event loop: {event_loop_name()} (service and bare handler)"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"  load average when the report was printed: {load}")
    if (os.cpu_count() or 1) <= 2:
        print(
            "  NOTE: the load generator shares this machine's CPUs with the server it loads, "
            "and so does anything else running: figures are a floor."
        )


@dataclass
class ServiceRun:
    """What one service (one process, or ``--workers N``) did, with the bare handler's turns."""

    workers: int
    loaded: Paired
    fixed: LoadResult
    lags: list[float]
    stored: int
    # Full speed on --wide-connections (one process only), None when skipped.
    wide: Paired | None = None


def _rate_line(result: LoadResult) -> str:
    line = (
        f"{result.acked:,} in {result.seconds:.1f} s = {result.rate:,.0f} req/s, "
        f"p50 / p99 {result.percentile(50):.1f} / {result.percentile(99):.1f} ms"
    )
    if result.server_cpu is not None and result.seconds:
        line += f", {result.server_cpu / result.seconds:.2f} cores"
    return line


def print_paired(title: str, name: str, loaded: Paired, target: bool) -> None:
    """The bare handler and the service in turns: each one's figures, their ratio (of the
    totals: both saw the same stretches of this machine's drift) and its spread by round."""
    seconds = loaded.service.seconds / max(len(loaded.rounds), 1)
    print(f"{title}, processing on ({len(loaded.rounds)} rounds of {seconds:.0f} s each, in turns)")
    if loaded.bare is not None:
        print(_row("bare aiohttp handler", _rate_line(loaded.bare)))
        if loaded.bare.errors:
            print(_row("bare handler errors", _errors(loaded.bare)))
    print(_row(name, _rate_line(loaded.service)))
    print(_row("errors", _errors(loaded.service)))
    if loaded.service.repeated:
        print(
            _row("NOTE", f"{loaded.service.repeated:,} sends reused an event id (pool too small)")
        )
    ratio = loaded.ratio
    if ratio is not None:
        met = (f"≥ {TARGET_RATIO}", ratio >= TARGET_RATIO) if target else ("", None)
        print(_row("service / bare", f"{ratio:.2f}", *met))
        spread = loaded.round_ratios
        print(
            _row(
                "by round",
                f"median {statistics.median(spread):.2f}, {spread[0]:.2f} to {spread[-1]:.2f}",
            )
        )
    waited, left = loaded.drained
    print(_row("background processing", f"inbox drained ≤ {waited:.1f} s after each turn"))
    if left:
        print(_row("NOTE", f"{left:,} still pending after --drain-timeout"))
    print()


def print_service(args: argparse.Namespace, run: ServiceRun) -> None:
    name = "service" if run.workers == 1 else f"service --workers {run.workers}"
    fixed = run.fixed
    # The target is for one process; N workers are compared with one bare process too.
    print_paired(f"Full speed, {args.connections} connections", name, run.loaded, run.workers == 1)
    if run.wide is not None:
        # With one request in flight a connection, the rate is connections / latency, and each
        # of the service's requests waits for a commit (docs/design.md, Inbound).
        print_paired(f"Full speed, {args.wide_connections} connections", name, run.wide, False)

    scheduled = len(fixed.latencies_ms) + sum(fixed.errors.values())
    on_time = 1 - fixed.late_sends / max(scheduled, 1)
    print(f"Fixed rate, {name} ({args.rate:g} req/s for {args.duration:g} s, open loop)")
    print(_row("acknowledged", f"{fixed.acked:,} of {fixed.sent:,} sent, errors: {_errors(fixed)}"))
    achieved = on_time >= RATE_ACHIEVED_SHARE and fixed.acked == fixed.sent
    print(
        _row(
            "rate achieved",
            f"{'yes' if achieved else 'no'}: {on_time:.1%} sent on schedule, "
            f"worst send lag {fixed.max_send_lag_ms:.1f} ms",
        )
    )
    print(_row("latency p50", f"{fixed.percentile(50):.1f} ms"))
    p99 = fixed.percentile(99)
    print(_row("latency p99", f"{p99:.1f} ms", f"< {TARGET_P99_MS:g} ms", p99 < TARGET_P99_MS))
    print(_row("latency max", f"{fixed.max_ms:.1f} ms"))
    print(_row("CPU", _cores(fixed)))
    lag50, lag99 = percentile(run.lags, 50), percentile(run.lags, 99)
    print(
        _row(
            "processing lag p50 / p99",
            f"{lag50:.2f} / {lag99:.2f} s ({len(run.lags):,} tracked)",
            f"p99 < {TARGET_LAG_P99_S:g} s",
            lag99 < TARGET_LAG_P99_S and len(run.lags) == fixed.acked - fixed.duplicates,
        )
    )
    print()


def committed(run: ServiceRun) -> tuple[bool, int]:
    """Whether every webhook acknowledged as new is stored, and how many were."""
    acked_new = run.fixed.acked - run.fixed.duplicates
    repeated = 0
    for loaded in (run.loaded, run.wide):
        if loaded is not None:
            acked_new += loaded.service.acked - loaded.service.repeated
            repeated += loaded.service.repeated
    return run.stored >= acked_new and not repeated, acked_new


def print_report(
    args: argparse.Namespace,
    runs: list[ServiceRun],
    crash: LoadResult | None,
    database_url: str,
) -> None:
    print_header(args)
    print()
    for run in runs:
        print_service(args, run)

    print("Durability")
    for run in runs:
        kept, acked_new = committed(run)
        label = "every acked webhook committed"
        if run.workers > 1:
            label = f"the same, --workers {run.workers}"
        print(
            _row(
                label,
                f"{'yes' if kept else 'no'} (acked {acked_new:,} new, stored {run.stored:,})",
                "all",
                kept,
            )
        )
    if crash is not None:
        acked_ids = crash.acked_ids
        missing = set(acked_ids) - stored_event_ids(database_url)
        print(
            _row(
                "after SIGKILL under load",
                f"{'yes' if not missing else 'no'}: {len(acked_ids):,} acked before the kill, "
                f"{len(missing):,} missing",
                "0 missing",
                not missing,
            )
        )
    print()


def measure_service(
    args: argparse.Namespace,
    factory: WebhookFactory,
    workdir: Path,
    database_url: str,
    workers: int,
    bare: Server | None,
) -> tuple[ServiceRun, Server]:
    """The service with ``workers`` processes at the fixed rate, then at full speed in turns
    with ``bare``; the caller stops it."""
    label = "service" if workers == 1 else f"service-{workers}"
    service = start_service(workdir, database_url, label, workers)
    try:
        # The fixed rate first, on the fresh database: after the full-speed phase, PostgreSQL
        # spends a while writing that phase's rows out (a checkpoint the WAL's volume asks
        # for, autovacuum), which at 1,000/s showed as commits of 30-190 ms.
        print(f"{args.rate:g} req/s against the {label} …", file=sys.stderr)
        webhooks = factory.build(int(args.rate * args.duration))
        fixed = run_client(
            fixed_rate(service.webhook_url, webhooks, args.rate, args.connections, service)
        )
        wait_drained(database_url, args.drain_timeout)
        lags = processing_lags(database_url, fixed.acked_ids)
        print(f"full speed against the bare handler and the {label} in turns …", file=sys.stderr)
        loaded = paired(args, bare, service, database_url, factory, workdir, args.connections)
        wide = None
        if args.wide_connections and workers == 1:
            connections = args.wide_connections
            print(f"the same on {connections} connections …", file=sys.stderr)
            wide = paired(args, bare, service, database_url, factory, workdir, connections)
        stored = stored_count(database_url)
    except BaseException:
        stop(service.process)
        raise
    return ServiceRun(workers, loaded, fixed, lags, stored, wide), service


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the webhook receiver against a bare aiohttp handler "
        "(prints figures)."
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="full speed: the phase's seconds split in this many turns of each server (5)",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed-rate req/s (1,000)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (32)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server URL (postgresql+asyncpg://…): the service gets a scratch "
        "database created on it and dropped afterwards; default: a temporary SQLite file",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also measure `serve --workers N` (2; 1 skips it)",
    )
    parser.add_argument(
        "--wide-connections",
        type=int,
        default=128,
        help="also run the bare handler and the service at full speed on this many "
        "connections (128; 0 skips it)",
    )
    parser.add_argument("--skip-bare", action="store_true", help="no bare-handler phase")
    parser.add_argument("--skip-crash", action="store_true", help="no SIGKILL check")
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "aiohttp"],
        default="auto",
        help="full-speed load generator: wrk when installed (auto), or the aiohttp client",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the background processor between the phases (120)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        parser.error("--database-url must be a postgresql+asyncpg:// URL")
    if args.duration <= 0 or args.rate <= 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration and --rate must be positive, --connections and --rounds 1+")
    if args.wide_connections < 0:
        parser.error("--wide-connections must be 0 (skip) or more")
    has_wrk = shutil.which("wrk") is not None
    if args.client == "wrk" and not has_wrk:
        parser.error("--client wrk: wrk is not installed")
    args.use_wrk = args.client == "wrk" or (args.client == "auto" and has_wrk)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_server:
        return run_bare_server(args.bare_server)
    workdir = Path(tempfile.mkdtemp(prefix="bench-inbound-"))
    factory = WebhookFactory()
    try:
        with contextlib.ExitStack() as servers:
            bare = None if args.skip_bare else servers.enter_context(bare_server(workdir))
            runs = []
            with scratch_database(args.database_url, workdir / "bench.db") as database_url:
                run, service = measure_service(args, factory, workdir, database_url, 1, bare)
                runs.append(run)
                try:
                    crash = None
                    if not args.skip_crash:
                        print("SIGKILL under load …", file=sys.stderr)
                        crash = crash_check(service, factory, args)
                finally:
                    stop(service.process)
                if args.workers > 1:
                    with scratch_database(
                        args.database_url, workdir / "bench-workers.db"
                    ) as workers_url:
                        run, service = measure_service(
                            args, factory, workdir, workers_url, args.workers, bare
                        )
                        stop(service.process)
                        runs.append(run)
                print_report(args, runs, crash, database_url)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
