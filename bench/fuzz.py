"""Fuzz a real ``connector serve``: N generated hostile and broken requests (default 10,000)
to every route, then the checks of the issue ("bad input never stalls a pipeline or gets a
5xx"): no 5xx, every webhook acknowledged as new is in the database, and a normal
notification and webhook still go through.

The requests come from ``tests/fuzzing.py`` (the strategies ``tests/web/test_fuzz.py`` uses),
drawn with ``--seed``. The service runs on a scratch SQLite file (or a scratch database on
``--database-url``'s PostgreSQL server), with the fake Track API (``tests/fake_customerio.py``)
in a process of its own. ``bench/README.md`` says more. Run from the repository root::

    .venv/bin/python -m bench.fuzz
    .venv/bin/python -m bench.fuzz --requests 2000 --database-url postgresql+asyncpg://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.inbound import HOST, query, stop, wait_healthy
from bench.outbound import fake_track_api
from bench.report import REPO
from tests.fuzzing import SECRET_SETTINGS, Fuzzer, Outcome, draw_requests, routes_of
from tests.support import free_port, scratch_database

ADMIN_PASSWORD = "bench-admin-password"
INGEST_TOKEN = "bench-ingest-token-0123456789"
SITE_ID, API_KEY = "fake-site-id", "fake-api-key"
STATUS_COLUMNS = (200, 202, 303, 400, 401, 403, 404, 405, 413, 429)


def service_config(port: int, database_url: str, track_host: str, ca_file: str) -> dict:
    return {
        "server": {"host": HOST, "port": port, "public_url": f"http://{HOST}:{port}"},
        "database": {"url": database_url},
        "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
        "customerio": {"track_host": track_host, "ca_file": ca_file},
        "sync": {"scheduled": False, "rate_limit_per_second": 1000},
        "connector": {
            "site_id": SITE_ID,
            "api_key": API_KEY,
            "synchronized_segments": ["seg-paying"],
        },
    }


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """Tables of strings, numbers, booleans and string lists (JSON writes them as TOML does)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def routes_for(config: dict) -> list:
    from connector.config import parse_config
    from connector.web.app import create_app

    return routes_of(create_app(parse_config(config)))


async def fuzz(base_url: str, requests: list, args: argparse.Namespace) -> dict[str, Any]:
    async with Fuzzer(base_url, admin_password=ADMIN_PASSWORD, ingest_token=INGEST_TOKEN) as f:
        baseline = await f.admin("GET", "/api/settings")
        baseline.update({key: "" for key in SECRET_SETTINGS}, api_key=API_KEY)
        started = time.monotonic()
        last = [0.0]

        def progress(sent: int) -> None:
            now = time.monotonic()
            if now - last[0] > 5:
                last[0] = now
                print(f"  {sent:,} / {len(requests):,} sent", file=sys.stderr)

        outcome = await f.run(requests, concurrency=args.concurrency, progress=progress)
        elapsed = time.monotonic() - started
        await f.restore_settings(baseline)
        flowing_error = None
        try:
            await f.check_still_flowing(f"fuzz-after-{args.seed}")
        except AssertionError as exc:
            flowing_error = str(exc)[:500] or "assertion failed"
        return {"outcome": outcome, "elapsed": elapsed, "flowing_error": flowing_error}


def print_table(outcome: Outcome) -> None:
    kinds = sorted({kind for kind, _ in outcome.by_kind})
    others = sorted(set(outcome.statuses) - set(STATUS_COLUMNS))
    columns = [*STATUS_COLUMNS, *others]
    header = f"{'route kind':<14}" + "".join(f"{c:>7}" for c in columns) + f"{'total':>8}"
    print(header)
    print("-" * len(header))
    for kind in kinds:
        counts = [outcome.by_kind[(kind, c)] for c in columns]
        print(f"{kind:<14}" + "".join(f"{n:>7,}" for n in counts) + f"{sum(counts):>8,}")
    totals = [outcome.statuses[c] for c in columns]
    print(f"{'all':<14}" + "".join(f"{n:>7,}" for n in totals) + f"{sum(totals):>8,}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--database-url", help="a PostgreSQL server (default: SQLite file)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    try:
        with (
            scratch_database(args.database_url, workdir / "fuzz.db") as database_url,
            fake_track_api(argparse.Namespace(latency_ms=0, rate_limit=0), workdir) as fake,
        ):
            port = free_port()
            config = service_config(port, database_url, *fake)
            drawing = time.monotonic()
            requests = draw_requests(routes_for(config), args.requests, args.seed)
            drawing = time.monotonic() - drawing
            print(f"drew {len(requests):,} requests in {drawing:.1f} s", file=sys.stderr)
            (workdir / "settings.toml").write_text(to_toml(config))
            command = [
                sys.executable,
                "-m",
                "connector",
                "--config",
                str(workdir / "settings.toml"),
            ]
            subprocess.run([*command, "migrate"], check=True, cwd=REPO, capture_output=True)
            log_file = workdir / "service.log"
            with log_file.open("wb") as log:
                process = subprocess.Popen(
                    [*command, "serve"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO
                )
            try:
                base_url = f"http://{HOST}:{port}"
                wait_healthy(base_url, process, log_file)
                result = asyncio.run(fuzz(base_url, requests, args))
                alive = process.poll() is None
            finally:
                stop(process)
            stored = query(database_url, "SELECT event_id, status FROM webhook_deliveries")
            unhandled = log_file.read_text(errors="replace").count("unhandled error")
        return report(args, database_url, requests, result, stored, alive, unhandled)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    database_url: str,
    requests: list,
    result: dict[str, Any],
    stored: list[tuple[Any, ...]],
    alive: bool,
    unhandled: int,
) -> int:
    outcome: Outcome = result["outcome"]
    engine = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite"
    print(
        f"\nfuzz: {outcome.sent:,} of {len(requests):,} requests answered, seed {args.seed}, "
        f"{engine}, concurrency {args.concurrency}, {result['elapsed']:.0f} s "
        f"({outcome.sent / max(result['elapsed'], 1e-9):.0f} req/s)\n"
    )
    print_table(outcome)
    server_errors = sum(n for status, n in outcome.statuses.items() if status >= 500)
    ids = {row[0] for row in stored}
    missing = outcome.webhook_event_ids - ids
    by_status = Counter(row[1] for row in stored)
    checks = [
        ("no 5xx answer", server_errors == 0, f"{server_errors}"),
        ("no request failed in transport", not outcome.transport_errors, ""),
        (
            "every webhook acknowledged as new is stored (rows = acknowledged + 1 normal)",
            len(stored) == outcome.webhooks_acknowledged + 1 and not missing,
            f"{len(stored):,} rows, {outcome.webhooks_acknowledged:,} acknowledged, "
            f"{len(missing)} plain event ids missing",
        ),
        ("no delivery left pending", not by_status.get("pending"), dict(sorted(by_status.items()))),
        (
            "normal notification synced, normal webhook tracked afterwards",
            result["flowing_error"] is None,
            result["flowing_error"] or "",
        ),
        ("service still running, no unhandled error logged", alive and not unhandled, unhandled),
    ]
    print()
    for name, ok, detail in checks:
        print(f"{verdict(ok)}  {name}  {detail}")
    for line in (outcome.server_errors + outcome.transport_errors)[:20]:
        print(f"  {line[:600]}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
