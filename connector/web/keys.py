"""Every object the web app shares, reached through a typed key (no module-level singletons)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from connector.config import Config
from connector.db.kv import KeyValueStore
from connector.forwarding.outbox import ForwardingService
from connector.inbound.gate import WebhookGate
from connector.inbound.inbox import InboxWriter
from connector.inbound.processor import InboundProcessor
from connector.ops.metrics import Metrics
from connector.ops.status import CredentialStatusStore
from connector.outbound.credential_check import CredentialChecker
from connector.outbound.service import SyncService
from connector.scheduler import Scheduler
from connector.settings.secrets import ServiceSecrets
from connector.settings.store import SettingsStore

if TYPE_CHECKING:
    from connector.web.admin.security import AdminSessions, LoginThrottle

config_key = web.AppKey("config", Config)
engine_key = web.AppKey("engine", AsyncEngine)
sessionmaker_key = web.AppKey("sessionmaker", async_sessionmaker)
kv_key = web.AppKey("kv", KeyValueStore)
settings_key = web.AppKey("settings", SettingsStore)
credentials_key = web.AppKey("credentials", CredentialStatusStore)
secrets_key = web.AppKey("secrets", ServiceSecrets)
metrics_key = web.AppKey("metrics", Metrics)
sync_key = web.AppKey("sync", SyncService)
scheduler_key = web.AppKey("scheduler", Scheduler)
webhook_gate_key = web.AppKey("webhook_gate", WebhookGate)
inbox_key = web.AppKey("inbox", InboxWriter)
inbound_processor_key = web.AppKey("inbound_processor", InboundProcessor)
credential_checker_key = web.AppKey("credential_checker", CredentialChecker)
# The settings page's objects are declared by name only: connector.web.admin imports this module.
admin_sessions_key: web.AppKey[AdminSessions] = web.AppKey("admin_sessions")
login_throttle_key: web.AppKey[LoginThrottle] = web.AppKey("login_throttle")
forwarding_key = web.AppKey("forwarding", ForwardingService)
