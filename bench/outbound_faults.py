"""Outbound sync under a fault mix: N users, passes until every one is settled.

The fake Track API (``tests/fake_customerio.py``, in this process, recording everything)
answers a seeded share of calls with 429, 500, 503, or holds them past the client's timeout
(half of those applied all the same). Passes of ``SyncService.run_once`` run until no user is
pending; then the users' sync statuses are counted and the fake's workspace is checked: every
customer with all its attributes, every event exactly once. Prints figures, asserts nothing.

    .venv/bin/python bench/outbound_faults.py                     # 2,000 users, 20 % faults
    .venv/bin/python bench/outbound_faults.py --users 500 --fault-rate 0.4 --retry-after 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.outbound import (
    ADMIN_PASSWORD,
    MAX_ATTRIBUTES_PER_CALL,
    SEGMENT,
    log_to_file,
    requests_per_user,
    user_message,
)
from tests.fake_customerio import FakeCustomerIO
from tests.support import scratch_database

TARGET = "every user synced, Customer.io holding every attribute and event once"


def attribute_names(count: int) -> list[str]:
    return [f"attr_{i:02d}" for i in range(count)]


def event_names(count: int) -> list[str]:
    return [f"Bench Event {k}" for k in range(count)]


def build_config(args: argparse.Namespace, fake: FakeCustomerIO, database_url: str) -> Any:
    from connector.config import parse_config

    return parse_config(
        {
            "security": {"admin_password": ADMIN_PASSWORD},
            "database": {"url": database_url},
            "customerio": {
                "track_host": fake.host,
                "ca_file": fake.ca_file,
                "timeout_seconds": args.timeout,
            },
            "sync": {
                "scheduled": False,
                "rate_limit_per_second": args.rate_limit,
                "concurrency": args.concurrency,
                "max_attempts": args.max_attempts,
                "backoff_base_seconds": args.backoff_base,
                "backoff_max_seconds": args.backoff_max,
            },
            "connector": {
                "site_id": fake.site_id,
                "api_key": fake.api_key,
                "synchronized_segments": [SEGMENT["id"]],
                "synchronized_attributes": attribute_names(args.attributes),
                "events_filter": event_names(args.events),
                "max_attributes_per_call": MAX_ATTRIBUTES_PER_CALL,
            },
        }
    )


async def store_users(runtime: Any, args: argparse.Namespace) -> None:
    from connector.notifications.parse import parse_notification
    from connector.notifications.store import store_messages

    names, events = attribute_names(args.attributes), event_names(args.events)
    for start in range(0, args.users, 500):
        body = {
            "notification_id": f"faults-{start}",
            "channel": "user:update",
            "messages": [
                user_message(n, names, events) for n in range(start, min(start + 500, args.users))
            ],
        }
        await store_messages(
            runtime.sessionmaker, parse_notification(body).messages, via_batch=False
        )


async def pending_users(runtime: Any) -> tuple[int, Any]:
    """How many users are pending, and when the first of them is due."""
    from sqlalchemy import func, select

    from connector.db.models import User

    async with runtime.sessionmaker() as session:
        row = (
            await session.execute(
                select(func.count(), func.min(User.next_attempt_at)).where(User.pending.is_(True))
            )
        ).one()
    return row[0], row[1]


async def statuses(runtime: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from connector.db.models import User

    async with runtime.sessionmaker() as session:
        rows = await session.execute(
            select(User.sync_status, func.count()).group_by(User.sync_status)
        )
        return dict(rows.all())


def check_workspace(fake: FakeCustomerIO, args: argparse.Namespace) -> dict[str, int]:
    """Customers missing an attribute, and events missing or stored twice."""
    names = attribute_names(args.attributes)
    incomplete = 0
    for n in range(args.users):
        expected = user_message(n, names, [])["user"]
        stored = fake.customers.get(f"ext-{n}", {})
        if any(stored.get(name) != expected[name] for name in names):
            incomplete += 1
    events = Counter((e["customer_id"], e["name"]) for e in fake.events)
    expected_events = {
        (f"ext-{n}", name) for n in range(args.users) for name in event_names(args.events)
    }
    return {
        "customers": len(fake.customers),
        "incomplete": incomplete,
        "events": len(fake.events),
        "missing_events": len(expected_events - set(events)),
        "duplicate_events": sum(count - 1 for count in events.values() if count > 1),
    }


async def run(args: argparse.Namespace, workdir: Path) -> None:
    from connector.db.types import utcnow
    from connector.runtime import open_runtime

    log_to_file(str(workdir / "service.log"), "INFO")
    fake = FakeCustomerIO(latency=args.latency_ms / 1000)
    await fake.start()
    try:
        with scratch_database(args.database_url, workdir / "faults.db") as url:
            async with open_runtime(build_config(args, fake, url)) as runtime:
                await store_users(runtime, args)
                fake.fault_mix(
                    args.fault_rate,
                    seed=args.seed,
                    hold=args.timeout * 2.5,
                    retry_after=args.retry_after,
                )
                passes, calls = 0, 0
                wall = time.perf_counter()
                while passes < args.max_passes:
                    summary = await runtime.sync.run_once("bench")
                    passes += 1
                    calls += summary.api_calls
                    pending, due = await pending_users(runtime)
                    if not pending:
                        break
                    if due is not None:
                        await asyncio.sleep(max(0.0, (due - utcnow()).total_seconds()) + 0.01)
                wall = time.perf_counter() - wall
                counts = await statuses(runtime)
        workspace = check_workspace(fake, args)
        print_report(args, fake, counts, workspace, passes, calls, wall)
    finally:
        await fake.close()


def print_report(
    args: argparse.Namespace,
    fake: FakeCustomerIO,
    counts: dict[str, int],
    workspace: dict[str, int],
    passes: int,
    calls: int,
    wall: float,
) -> None:
    per_user = requests_per_user(args.attributes, args.events)
    faults = sum(fake.faults.values())
    total = sum(fake.counts.values())
    database = "PostgreSQL" if args.database_url else "SQLite"
    print()
    print("Customer.io outbound under faults")
    print(
        f"  {args.users:,} users x {args.attributes} attributes, {args.events} events "
        f"({per_user} requests each) · {database} · concurrency {args.concurrency} · "
        f"max_attempts {args.max_attempts} · "
        f"backoff {args.backoff_base:g} to {args.backoff_max:g} s"
    )
    print(
        f"  fault mix: {args.fault_rate:.0%} of calls, seed {args.seed}, client timeout "
        f"{args.timeout:g} s, Retry-After {args.retry_after or 'none'}"
    )
    print()
    print(
        f"  requests answered      {total:,} "
        f"({faults:,} faults: {dict(sorted(fake.faults.items()))})"
    )
    print(
        f"  passes                 {passes} in {wall:.1f} s, {calls:,} calls counted by the service"
    )
    print(f"  users by sync status   {dict(sorted(counts.items()))}")
    print(
        f"  Customer.io holds      {workspace['customers']:,} customers "
        f"({workspace['incomplete']} missing attributes), {workspace['events']:,} events "
        f"({workspace['missing_events']} missing, {workspace['duplicate_events']} twice)"
    )
    met = (
        counts.get("synced", 0) == args.users
        and workspace["customers"] == args.users
        and not workspace["incomplete"]
        and not workspace["missing_events"]
        and not workspace["duplicate_events"]
    )
    print(
        f"  {counts.get('synced', 0):,} of {args.users:,} synced: {TARGET}: "
        f"{'TARGET MET' if met else 'TARGET MISSED'}"
    )
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Outbound sync under a Track API fault mix.")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--attributes", type=int, default=40)
    parser.add_argument("--events", type=int, default=2)
    parser.add_argument("--fault-rate", type=float, default=0.2, help="share of calls (0.2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--retry-after", help="Retry-After on the mix's 429s (none)")
    parser.add_argument("--timeout", type=float, default=0.5, help="client timeout, s (0.5)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=float, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-attempts", type=int, default=10, help="sync.max_attempts (10)")
    parser.add_argument("--backoff-base", type=float, default=0.05)
    parser.add_argument("--backoff-max", type=float, default=1.0)
    parser.add_argument("--max-passes", type=int, default=200)
    parser.add_argument(
        "--database-url", help="a PostgreSQL server URL; default: a temporary SQLite file"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as workdir:
        asyncio.run(run(args, Path(workdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
