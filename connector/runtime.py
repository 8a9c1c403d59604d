"""Everything a running connector needs, opened once: by the web app and by the CLI alike."""

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
from connector.inbound.processor import InboundProcessor
from connector.ops.metrics import Metrics
from connector.ops.status import CredentialStatusStore
from connector.outbound.engine import SyncEngine
from connector.outbound.instances import SendingInstances
from connector.outbound.ratelimit import TokenBucket
from connector.outbound.repository import OutboundRepository
from connector.outbound.sender import CustomerIOSender
from connector.outbound.service import SenderFactory, SyncService
from connector.settings.model import ConnectorSettings
from connector.settings.secrets import ServiceSecrets, ensure_secrets
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
    credentials: CredentialStatusStore
    secrets: ServiceSecrets
    metrics: Metrics
    sync: SyncService
    gate: WebhookGate
    processor: InboundProcessor
    forwarding: ForwardingService


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def customerio_sender_factory(config: Config) -> SenderFactory:
    def build(settings: ConnectorSettings, bucket: TokenBucket) -> CustomerIOSender:
        return CustomerIOSender.from_config(
            settings.site_id,
            settings.api_key,
            settings.region,
            config.customerio,
            config.sync,
            bucket=bucket,
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


@asynccontextmanager
async def open_runtime(
    config: Config,
    *,
    metrics: Metrics | None = None,
    sender_factory: SenderFactory | None = None,
) -> AsyncIterator[Runtime]:
    await prepare_database(config)
    engine = make_engine(config.database.url)
    try:
        sessionmaker = make_sessionmaker(engine)
        kv = KeyValueStore(sessionmaker)
        settings = SettingsStore(kv)
        await settings.seed(config.connector)
        credentials = CredentialStatusStore(kv)
        metrics = metrics or Metrics()
        repository = OutboundRepository(sessionmaker, instance_id(), config.sync.lease_seconds)
        sync = SyncService(
            repository=repository,
            engine=SyncEngine(repository, config.sync, metrics),
            settings=settings,
            credentials=credentials,
            sender_factory=sender_factory or customerio_sender_factory(config),
            instances=SendingInstances(sessionmaker, repository.instance_id),
            rate_limit_per_second=config.sync.rate_limit_per_second,
        )
        gate = WebhookGate(kv, settings)
        await gate.refresh()
        processor = InboundProcessor(sessionmaker, settings, metrics, config.sync.lease_seconds)
        forwarding = ForwardingService(
            sessionmaker, settings, config.sync, metrics, repository.instance_id
        )
        runtime = Runtime(
            config=config,
            engine=engine,
            sessionmaker=sessionmaker,
            kv=kv,
            settings=settings,
            credentials=credentials,
            secrets=await ensure_secrets(config, kv),
            metrics=metrics,
            sync=sync,
            gate=gate,
            processor=processor,
            forwarding=forwarding,
        )
        try:
            yield runtime
        finally:
            await forwarding.close()
    finally:
        await engine.dispose()
