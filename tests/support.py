"""Helpers shared by the test suite and the benchmarks: scratch databases, ports, processes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from connector.db import migrate
from connector.db.engine import make_engine


def run_blocking(coroutine: Any) -> Any:
    """Run a coroutine to the end from synchronous code, even inside a running event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def admin_execute(server_url: str, statement: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE) on a PostgreSQL server."""
    engine = make_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@contextlib.contextmanager
def scratch_postgres_database(server_url: str, prefix: str) -> Iterator[str]:
    """A migrated database of its own on the server of ``server_url``, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    run_blocking(admin_execute(server_url, f'CREATE DATABASE "{name}"'))
    try:
        run_blocking(migrate.upgrade(url))
        yield url
    finally:
        run_blocking(admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def scratch_database(server_url: str | None, sqlite_file: Path) -> Iterator[str]:
    """A fresh SQLite file, or a migrated scratch database on the PostgreSQL server."""
    if not server_url:
        yield f"sqlite+aiosqlite:///{sqlite_file}"
        return
    with scratch_postgres_database(server_url, "connector_bench") as url:
        yield url


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not gone after ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
