"""The composition root: every service of a running connector, built in one place and used by
the web app and the CLI alike.

:func:`build_runtime` constructs (no I/O); :meth:`Runtime.opened` prepares the database and
loads what the services read at start (seeded settings, secrets, the webhook token), then
disposes of it all; :meth:`Runtime.serving` runs the background work of a serving instance
(the webhook inbox, the inbound processor, the scheduler's jobs).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from connector.config import Config
from connector.db import migrate
from connector.db.engine import is_sqlite, make_engine, make_sessionmaker
from connector.db.kv import KeyValueStore
from connector.forwarding.outbox import ForwardingService
from connector.inbound.gate import WebhookGate
from connector.inbound.inbox import InboxWriter
from connector.inbound.processor import InboundProcessor
from connector.ops.audit import AuditLog
from connector.ops.metrics import Metrics
from connector.ops.status import CredentialStatusStore
from connector.outbound.credential_check import CredentialChecker
from connector.outbound.engine import SyncEngine
from connector.outbound.instances import SendingInstances
from connector.outbound.ratelimit import TokenBucket
from connector.outbound.repository import OutboundRepository
from connector.outbound.sender import CustomerIOSender
from connector.outbound.service import SenderFactory, SyncService
from connector.scheduler import Scheduler
from connector.settings.changes import SettingsChanges
from connector.settings.model import ConnectorSettings
from connector.settings.secrets import ServiceSecrets
from connector.settings.store import SettingsStore


class DatabaseNotMigrated(RuntimeError):
    pass


@dataclass
class Runtime:
    config: Config
    engine: AsyncEngine
    sessionmaker: async_sessionmaker
    kv: KeyValueStore
    settings: SettingsStore
    settings_changes: SettingsChanges
    credentials: CredentialStatusStore
    credential_checker: CredentialChecker
    secrets: ServiceSecrets
    metrics: Metrics
    audit: AuditLog
    sync: SyncService
    gate: WebhookGate
    inbox: InboxWriter
    processor: InboundProcessor
    forwarding: ForwardingService
    scheduler: Scheduler

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[Runtime]:
        """The database prepared and the start-up reads done; everything closed at the end."""
        try:
            await prepare_database(self.config)
            await self.settings.seed(self.config.connector)
            await self.secrets.load()
            await self.gate.refresh()
            yield self
        finally:
            await self.forwarding.close()
            await self.engine.dispose()

    @asynccontextmanager
    async def serving(self, *, scheduled_jobs: bool = True) -> AsyncIterator[None]:
        """The background work of an instance that receives: the inbox's group commits, the
        processor (woken at once for deliveries stored before a restart) and, unless
        ``scheduled_jobs`` is off (the other workers of ``serve --workers N``), the
        scheduler."""
        self.inbox.start()
        self.processor.give_way_to(lambda: self.inbox.load)
        self.processor.start()
        self.processor.wake()
        if scheduled_jobs:
            self.scheduler.start()
        try:
            yield
        finally:
            await self.scheduler.shutdown()
            await self.inbox.close()
            await self.processor.close()


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def customerio_sender_factory(config: Config, metrics: Metrics | None = None) -> SenderFactory:
    def build(settings: ConnectorSettings, bucket: TokenBucket) -> CustomerIOSender:
        return CustomerIOSender.from_config(
            settings.site_id,
            settings.api_key,
            settings.region,
            config.customerio,
            config.sync,
            bucket=bucket,
            metrics=metrics,
        )

    return build


async def prepare_database(config: Config) -> None:
    """Migrate the embedded SQLite database; refuse to run on an unmigrated shared one."""
    url = config.database.url
    if is_sqlite(url):
        await migrate.upgrade(url)
        return
    engine = make_engine(url)
    try:
        if not await migrate.is_up_to_date(engine):
            raise DatabaseNotMigrated(
                "the database is not migrated to the newest revision: run `connector migrate`"
            )
    finally:
        await engine.dispose()


def build_runtime(
    config: Config,
    *,
    metrics: Metrics | None = None,
    sender_factory: SenderFactory | None = None,
) -> Runtime:
    """Every service, wired to its collaborators; nothing is read or started yet."""
    engine = make_engine(config.database.url)
    sessionmaker = make_sessionmaker(engine)
    kv = KeyValueStore(sessionmaker)
    settings = SettingsStore(kv)
    credentials = CredentialStatusStore(kv)
    metrics = metrics or Metrics()
    repository = OutboundRepository(sessionmaker, instance_id(), config.sync.lease_seconds)
    sync = SyncService(
        repository=repository,
        engine=SyncEngine(repository, config.sync, metrics),
        settings=settings,
        credentials=credentials,
        sender_factory=sender_factory or customerio_sender_factory(config, metrics),
        instances=SendingInstances(sessionmaker, repository.instance_id),
        rate_limit_per_second=config.sync.rate_limit_per_second,
        metrics=metrics,
    )
    gate = WebhookGate(kv, settings)
    processor = InboundProcessor(sessionmaker, settings, metrics, config.sync.lease_seconds)
    forwarding = ForwardingService(
        sessionmaker, settings, config.sync, metrics, repository.instance_id
    )
    credential_checker = CredentialChecker(config, settings, credentials)
    scheduler = Scheduler(
        sync,
        processor,
        sessionmaker,
        config,
        credential_check=credential_checker.check_stored,
        forwarding=forwarding,
    )
    settings_changes = SettingsChanges(
        settings,
        credentials_changed=lambda: credentials.record("unknown", "credentials changed"),
        mapping_changed=lambda: repository.mark_all_pending(full=False),
        webhook_keys_changed=gate.refresh,
        sync_soon=scheduler.trigger_sync,
    )
    return Runtime(
        config=config,
        engine=engine,
        sessionmaker=sessionmaker,
        kv=kv,
        settings=settings,
        settings_changes=settings_changes,
        credentials=credentials,
        credential_checker=credential_checker,
        secrets=ServiceSecrets(
            kv,
            secret_key=config.security.secret_key,
            ingest_token=config.security.ingest_token,
        ),
        metrics=metrics,
        audit=AuditLog(sessionmaker),
        sync=sync,
        gate=gate,
        inbox=InboxWriter(sessionmaker),
        processor=processor,
        forwarding=forwarding,
        scheduler=scheduler,
    )


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    metrics: Metrics | None = None,
    sender_factory: SenderFactory | None = None,
) -> AsyncIterator[Runtime]:
    """A runtime built and opened (for the CLI and tests; the web app opens its own)."""
    async with build_runtime(config, metrics=metrics, sender_factory=sender_factory).opened() as rt:
        yield rt
