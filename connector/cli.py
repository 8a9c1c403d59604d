"""``connector``: serve, migrate, sync by hand, import users, and write a first settings file."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import click
from aiohttp import web
from tqdm import tqdm

from connector.config import Config, ConfigError, config_path, load_config, unknown_variables
from connector.db import migrate as db_migrate
from connector.inbound.gate import webhook_url
from connector.notifications.parse import InvalidNotification, parse_notification
from connector.notifications.store import store_messages
from connector.ops.audit import CLI_SOURCE, AuditAction
from connector.ops.logs import ACCESS_LOGGER, setup_logging
from connector.ops.quarantine import retry_failed
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    Operation,
    PlanAction,
    UserPlan,
    UserSnapshot,
)
from connector.outbound.planner import plan_user
from connector.outbound.sender import DryRunSender
from connector.rules import safe_json
from connector.runtime import DatabaseNotMigrated, Runtime, open_runtime
from connector.settings.secrets import new_token

EXIT_CONFIG = 2
EXIT_CREDENTIALS = 3
EXIT_LISTEN = 1
# More receiving processes than cores only adds contention; this bounds a typo.
MAX_WORKERS = 64
# How often a worker checks that its supervisor is still there.
PARENT_POLL_SECONDS = 1.0
IMPORT_BATCH = 500
# Shipped in the package (the checkout's top-level settings.example.toml links to it), so that
# `connector init` works from a wheel too.
EXAMPLE_SETTINGS = Path(__file__).resolve().parent / "settings.example.toml"


def _load(ctx: click.Context) -> Config:
    for warning in unknown_variables(os.environ):
        click.echo(f"warning: {warning}", err=True)
    try:
        return load_config(ctx.obj["config_path"])
    except ConfigError as exc:
        click.echo("Invalid configuration:", err=True)
        for line in exc.errors:
            click.echo(f"  {line}", err=True)
        sys.exit(EXIT_CONFIG)


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except DatabaseNotMigrated as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(package_name="customerio-connector", prog_name="connector")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Settings TOML (default: $CONNECTOR_CONFIG or ./settings.toml).",
)
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Customer.io connector: platform users and events out, Customer.io webhooks in."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_file


@main.command()
@click.option("--from", "example", type=click.Path(exists=True, dir_okay=False), default=None)
@click.pass_context
def init(ctx: click.Context, example: str | None) -> None:
    """Write a settings file from settings.example.toml with a generated admin password."""
    target = config_path(ctx.obj["config_path"], os.environ)
    if target.exists():
        click.echo(f"{target} exists; leaving it as it is.")
        return
    text = Path(example or EXAMPLE_SETTINGS).read_text(encoding="utf-8")
    password = secrets.token_urlsafe(12)
    token = new_token()
    text = text.replace('admin_password = ""', f'admin_password = "{password}"', 1)
    text = text.replace('# ingest_token = "..."', f'ingest_token = "{token}"', 1)
    target.write_text(text, encoding="utf-8")
    click.echo(f"Wrote {target}.")
    click.echo(f"  admin password (user 'admin'): {password}")
    click.echo(f"  platform ingest token (Authorization: Bearer ...): {token}")


async def _freeze_startup_objects(_app: web.Application) -> None:
    """Keep what start-up built out of the garbage collector's way.

    The service holds some 100,000 long-lived objects after start-up; a full collection of
    them took 60-100 ms every second or two under load, which showed as webhook latency.
    """
    gc.collect()
    gc.freeze()


def _listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The server's listening socket, or exit with one line saying why it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=reuse_port)
    except OSError as exc:
        # create_server's message repeats the address; the errno's text alone does not (a
        # negative errno is the resolver's, with no text of its own).
        if exc.errno and exc.errno > 0:
            reason = os.strerror(exc.errno)
        else:
            reason = (exc.strerror or str(exc)).partition(" (while attempting")[0]
        reason = reason.lower()
        click.echo(f"error: cannot listen on {host}:{port}: {reason}", err=True)
        sys.exit(EXIT_LISTEN)


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(1, MAX_WORKERS),
    default=1,
    show_default=True,
    help="Processes receiving on the one port (SO_REUSEPORT); the first also runs the "
    "scheduled jobs.",
)
@click.pass_context
def serve(ctx: click.Context, workers: int) -> None:
    """Run the service: HTTP API, webhook receiver and scheduled sync."""
    from connector.web.serving import event_loop_name

    config = _load(ctx)
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        click.echo("error: --workers needs SO_REUSEPORT, which this system lacks", err=True)
        sys.exit(EXIT_CONFIG)
    # Bound before anything starts, so that a port in use runs no migration and no sync. Each
    # worker has a socket of its own on the port: the kernel spreads connections over them.
    sockets = [
        _listen(config.server.host, config.server.port, reuse_port=workers > 1)
        for _ in range(workers)
    ]
    setup_logging()
    url = f"http://{config.server.host}:{config.server.port}"
    click.echo(f"Connector listening on {url} (status: {url}/status, admin API: {url}/api/)")
    click.echo(f"Settings page: {url}/admin (user 'admin', password security.admin_password)")
    click.echo(f"Event loop: {event_loop_name()}")
    if workers == 1:
        sys.exit(_serve_worker(config, sockets[0], scheduled_jobs=True))
    # What a first start writes (migration, settings, secrets, the webhook token) is written
    # once, here, rather than raced for by the workers.
    _run(_prepare(config))
    sys.exit(_supervise(config, sockets))


async def _prepare(config: Config) -> None:
    async with open_runtime(config):
        pass


def _serve_worker(
    config: Config, sock: socket.socket, *, scheduled_jobs: bool, parent: int | None = None
) -> int:
    """Serve on ``sock`` until told to stop; the exit code."""
    from connector.web.app import create_app
    from connector.web.serving import serve

    app = create_app(config, scheduled_jobs=scheduled_jobs)
    app.on_startup.append(_freeze_startup_objects)
    if parent is not None:
        app.cleanup_ctx.append(_stop_with_parent(parent))
    try:
        access_log = logging.getLogger(ACCESS_LOGGER) if config.server.access_log else None
        serve(app, sock, access_log=access_log)
    except DatabaseNotMigrated as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    return 0


def _stop_with_parent(parent: int):
    """A worker whose supervisor has gone (killed with SIGKILL) shuts down as if told to."""

    async def watch(_app: web.Application) -> AsyncIterator[None]:
        async def poll() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(PARENT_POLL_SECONDS)
            os.kill(os.getpid(), signal.SIGTERM)

        task = asyncio.create_task(poll(), name="watch-supervisor")
        yield
        task.cancel()

    return watch


def _supervise(config: Config, sockets: list[socket.socket]) -> int:
    """Fork a worker per socket (the first runs the scheduled jobs), pass SIGTERM and SIGINT
    on to them, and wait; when one fails, stop the others. The exit code."""
    parent = os.getpid()
    children: dict[int, int] = {}
    for index, sock in enumerate(sockets):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # Its own process group: a Ctrl-C in the terminal reaches the supervisor only,
                # which stops each worker once.
                os.setpgid(0, 0)
                for other in sockets:
                    if other is not sock:
                        other.close()
                code = _serve_worker(config, sock, scheduled_jobs=index == 0, parent=parent)
            except BaseException:
                logging.getLogger("connector").exception("worker failed", extra={"worker": index})
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    for sock in sockets:
        sock.close()

    stopping = False

    def stop(_signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and not stopping:
            click.echo(f"error: worker {index} exited with {exit_code}; stopping", err=True)
            code = 1
            stop()
    return code


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the database tables."""
    config = _load(ctx)
    _run(db_migrate.upgrade(config.database.url))
    click.echo(f"Database migrated to revision {db_migrate.head_revision()}.")


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _describe(operation: Operation) -> list[str]:
    """An operation as ``sync --dry-run`` prints it: a line, then its attributes or data,
    names and values (an operation never holds the credentials)."""
    if isinstance(operation, Identify):
        count = len(operation.attributes)
        lines = [f"identify {operation.customer_id}: {count} attributes"]
        lines += [
            f"  {name} = {_value(operation.attributes[name])}"
            for name in sorted(operation.attributes)
        ]
        return lines
    if isinstance(operation, DeleteCustomer):
        return [f"delete {operation.customer_id}"]
    who = operation.customer_id or f"anonymous {operation.anonymous_id}"
    kind = "page view" if operation.page else "event"
    lines = [
        f"{kind} {operation.name!r} for {who} (id {operation.id}, timestamp {operation.timestamp})"
    ]
    lines += [f"  data.{name} = {_value(operation.data[name])}" for name in sorted(operation.data)]
    return lines


def _print_plan(plan: UserPlan, held: bool) -> None:
    header = f"user {plan.user_id}: {plan.action.value}"
    if held and plan.action is PlanAction.DELETE:
        header += " (held by the deletion guard)"
    if plan.skip_reason:
        header += f" ({plan.skip_reason})"
    click.echo(header)
    for operation in plan.operations:
        for line in _describe(operation):
            click.echo(f"  {line}")
    for name, reason in plan.attribute_errors.items():
        click.echo(f"  attribute {name} left out: {reason}")
    for event_id, reason in plan.skipped_events.items():
        click.echo(f"  event {event_id} skipped: {reason}")


async def _sync_once(config: Config, full: bool) -> int:
    async with open_runtime(config) as runtime:
        bar = tqdm(total=0, unit="user", desc="sync", file=sys.stderr, disable=None)

        def on_start(total: int) -> None:
            bar.total = total
            bar.refresh()

        summary = await runtime.sync.run_once(
            "cli", full=full, progress=lambda *_: bar.update(1), on_start=on_start
        )
        bar.close()
    click.echo(
        f"sent {summary.sent}, skipped {summary.skipped}, deleted {summary.deleted}, "
        f"failed {summary.failed}, retrying later {summary.retrying}, "
        f"deletions held {summary.held}; "
        f"{summary.events_sent} events, {summary.api_calls} API calls"
    )
    for reason, count in sorted(summary.skip_reasons.items()):
        click.echo(f"  skipped {count}: {reason}")
    if summary.held:
        click.echo(
            f"  {summary.held} deletions held: more than sync.max_deletions_per_pass "
            f"({config.sync.max_deletions_per_pass}); see GET /api/deletions, then "
            "`connector sync --confirm-deletions`"
        )
    if summary.error:
        click.echo(f"error: {summary.error}", err=True)
        return EXIT_CREDENTIALS
    return 0


async def _sync_forever(config: Config) -> None:
    async with open_runtime(config) as runtime:
        while True:
            summary = await runtime.sync.run_once("cli")
            click.echo(json.dumps(summary.as_dict()))
            await asyncio.sleep(config.sync.interval_seconds)


async def _dry_run(config: Config, full: bool, limit: int | None) -> None:
    async with open_runtime(
        config, sender_factory=lambda _settings, _bucket: DryRunSender()
    ) as runtime:
        preview = await runtime.sync.preview(
            full=full, limit=limit, max_deletions=config.sync.max_deletions_per_pass
        )
    for plan in preview.plans:
        _print_plan(plan, held=bool(preview.held))
    if len(preview.plans) < preview.users:
        click.echo(f"... {preview.users - len(preview.plans)} more users not shown (--limit)")
    what = "users (every user: --full)" if full else "pending users"
    click.echo(
        f"{preview.users} {what}: {preview.identify} identify, {preview.events} event, "
        f"{preview.delete} delete, {preview.skip} skip; "
        f"{preview.held} deletions would be held; "
        f"{preview.requests} Track API requests ({preview.transport} transport); "
        "nothing was sent."
    )


async def _confirm_deletions(config: Config) -> int:
    async with open_runtime(config) as runtime:
        confirmed = await runtime.sync.repository.confirm_deletions()
        if confirmed:
            detail = {"via": "cli", "users": len(confirmed)}
            await runtime.audit.record(AuditAction.DELETIONS_CONFIRMED, detail, CLI_SOURCE)
        return len(confirmed)


@main.command()
@click.option("--once", is_flag=True, help="Run one pass to the end, then exit.")
@click.option("--full", is_flag=True, help="Send every attribute again, not only changes.")
@click.option("--dry-run", is_flag=True, help="Print the planned calls without sending.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    help="With --dry-run: print the first N users only (the summary counts all).",
)
@click.option(
    "--confirm-deletions",
    is_flag=True,
    help="Confirm the deletions the deletion guard held, then run one pass that sends them.",
)
@click.pass_context
def sync(
    ctx: click.Context,
    once: bool,
    full: bool,
    dry_run: bool,
    limit: int | None,
    confirm_deletions: bool,
) -> None:
    """Send pending users and events to Customer.io."""
    config = _load(ctx)
    if dry_run:
        _run(_dry_run(config, full, limit))
        return
    if confirm_deletions:
        confirmed = _run(_confirm_deletions(config))
        click.echo(f"{confirmed} held deletions confirmed.")
        once = True
    if once or full:
        sys.exit(_run(_sync_once(config, full)))
    setup_logging()
    with contextlib.suppress(KeyboardInterrupt):
        _run(_sync_forever(config))


def _batches(lines: Iterator[tuple[int, str]]) -> Iterator[list[tuple[int, Any]]]:
    batch: list[tuple[int, Any]] = []
    for number, line in lines:
        if not line.strip():
            continue
        batch.append((number, line))
        if len(batch) >= IMPORT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _parsed_batches(path: Path, errors: list[str]) -> Iterator[tuple[list[Any], list[int]]]:
    """The file's messages, parsed, a batch at a time, with their line numbers; the lines
    rejected are added to ``errors``."""
    size = path.stat().st_size
    with (
        # Invalid UTF-8 stays visible as lone surrogates, and the parser rejects its line.
        path.open(encoding="utf-8", errors="surrogateescape") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc="import", file=sys.stderr, disable=None
        ) as bar,
    ):
        for batch in _batches(enumerate(handle, start=1)):
            messages: list[Any] = []
            numbers: list[int] = []
            for number, line in batch:
                bar.update(len(line.encode(errors="surrogateescape")))
                try:
                    messages.append(safe_json.loads(line))
                    numbers.append(number)
                except safe_json.UnsafeJSON as exc:
                    errors.append(f"line {number}: {exc}")
            try:
                parsed = parse_notification({"messages": messages})
            except InvalidNotification as exc:  # pragma: no cover - the body is built here
                raise click.ClickException(str(exc)) from exc
            for rejection in parsed.rejected:
                errors.append(f"line {numbers[rejection['index']]}: {rejection['error']}")
            yield parsed.messages, numbers


async def _import(runtime: Runtime, path: Path) -> tuple[int, list[str]]:
    stored = 0
    errors: list[str] = []
    for messages, numbers in _parsed_batches(path, errors):
        result = await store_messages(runtime.sessionmaker, messages, via_batch=True)
        stored += result.accepted
        for rejection in result.rejected:
            errors.append(f"line {numbers[rejection['index']]}: {rejection['error']}")
    return stored, errors


async def _import_preview(runtime: Runtime, path: Path) -> tuple[dict[str, int], list[str]]:
    """What importing ``path`` then one pass would do, user by user, storing nothing: each
    message planned as it would be sent through ``/batch``, as new to Customer.io."""
    settings = await runtime.settings.load()
    counts = {"sent": 0, "skipped": 0, "deleted": 0}
    errors: list[str] = []
    for messages, _numbers in _parsed_batches(path, errors):
        for message in messages:
            snapshot = UserSnapshot(
                id=message.key or "",
                external_id=message.external_id,
                email=message.email,
                anonymous_ids=tuple(message.anonymous_ids),
                attributes=message.attributes,
                account=message.account,
                segments=tuple(message.segments),
                via_batch=True,
                events=tuple(message.events),
            )
            # Through /batch a user is always in segments: never a deletion, whatever names.
            plan = plan_user(snapshot, settings, whitelisted_names=())
            if plan.action is PlanAction.DELETE:
                counts["deleted"] += 1
            elif plan.action is PlanAction.SKIP:
                counts["skipped"] += 1
            else:
                counts["sent"] += 1
    return counts, errors


@main.command(name="webhook-url")
@click.option("--rotate", is_flag=True, help="Replace the token; the old URL stops working.")
@click.pass_context
def webhook_url_command(ctx: click.Context, rotate: bool) -> None:
    """Print the URL to paste into Customer.io's reporting webhooks."""
    config = _load(ctx)

    async def go() -> str:
        async with open_runtime(config) as runtime:
            token = await runtime.gate.rotate() if rotate else (await runtime.gate.current()).token
        return webhook_url(config.server.public_url, token)

    click.echo(_run(go()))


@main.command(name="ingest-token")
@click.pass_context
def ingest_token_command(ctx: click.Context) -> None:
    """Print the bearer token the platform sends to /smart-notifier and /batch."""
    config = _load(ctx)

    async def go() -> str:
        async with open_runtime(config) as runtime:
            return runtime.secrets.ingest_token

    click.echo(_run(go()))


@main.command(name="retry-failed")
@click.pass_context
def retry_failed_command(ctx: click.Context) -> None:
    """Make quarantined users, webhooks and forwarded events pending again (after a fix).

    A running ``serve`` picks them up with its next sync, sweep and flush.
    """
    config = _load(ctx)

    async def go() -> dict[str, int]:
        async with open_runtime(config) as runtime:
            retried = await retry_failed(runtime.sessionmaker)
            detail = {"via": CLI_SOURCE, "retried": retried}
            await runtime.audit.record(AuditAction.RETRY_FAILED, detail, CLI_SOURCE)
            return retried

    retried = _run(go())
    click.echo(
        f"retrying {retried['users']} user(s), {retried['webhooks']} webhook(s), "
        f"{retried['forwarding']} forwarded event(s)"
    )


@main.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Say how many users would be sent, skipped and deleted."
)
@click.pass_context
def import_users(ctx: click.Context, file: Path, dry_run: bool) -> None:
    """Backfill users from a JSON-lines file of notification messages (sent like /batch)."""
    config = _load(ctx)

    async def go() -> tuple[int, list[str]]:
        async with open_runtime(config) as runtime:
            return await _import(runtime, file)

    async def preview() -> tuple[dict[str, int], list[str]]:
        async with open_runtime(config) as runtime:
            return await _import_preview(runtime, file)

    if dry_run:
        counts, errors = _run(preview())
        for line in errors:
            click.echo(line, err=True)
        click.echo(
            f"{counts['sent']} users would be sent, {counts['skipped']} skipped, "
            f"{counts['deleted']} deleted; {len(errors)} lines rejected; nothing was stored."
        )
        if errors:
            sys.exit(1)
        return
    stored, errors = _run(go())
    for line in errors:
        click.echo(line, err=True)
    click.echo(
        f"{stored} users stored and marked pending, {len(errors)} lines rejected. "
        "The running service sends them on its next pass (or run `connector sync --once`)."
    )
    if errors:
        sys.exit(1)
