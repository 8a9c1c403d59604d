"""The audit log: what operators did, or tried, with when and from where.

Settings changes (which fields; a secret only as ``"changed"``), logins and failed logins,
webhook URL rotations, sync-now, retry-failed and confirmed deletions, from the admin API, the
settings page and the CLI. ``GET /api/audit`` and the page's *Audit log* section read it,
newest first.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from connector.db.models import AuditEntry
from connector.settings.model import SECRET_FIELDS

CLI_SOURCE = "cli"
"""The source of what the command line did (a request's is the client's address)."""
SECRET_CHANGED = "changed"
"""A secret field's entry in a settings change: its values never leave the settings store."""


class AuditAction(StrEnum):
    SETTINGS_CHANGED = "settings_changed"
    """detail: ``{"fields": {name: {"from": old, "to": new} | "changed"}}``."""
    LOGIN = "login"
    """A login to the settings page; detail ``{}``."""
    LOGIN_FAILED = "login_failed"
    """A wrong password, on the page or the admin API, or an attempt while throttled;
    detail ``{"via": "page" | "api", "reason": ...}``."""
    WEBHOOK_URL_ROTATED = "webhook_url_rotated"
    """detail ``{"via": ...}``; the token itself is not recorded."""
    SYNC_NOW = "sync_now"
    """detail ``{"via": ..., "full": bool}``."""
    RETRY_FAILED = "retry_failed"
    """detail ``{"via": ..., "retried": {"users": n, "webhooks": n, "forwarding": n}}``."""
    DELETIONS_CONFIRMED = "deletions_confirmed"
    """Held deletions an operator let go; detail ``{"via": ..., "users": n}``."""


def settings_change(changes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The detail of a settings change, from each changed field's (before, after)."""
    fields: dict[str, Any] = {}
    for name, (before, after) in sorted(changes.items()):
        fields[name] = SECRET_CHANGED if name in SECRET_FIELDS else {"from": before, "to": after}
    return {"fields": fields}


def entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": entry.at,
        "action": entry.action,
        "detail": entry.detail,
        "source": entry.source,
    }


class AuditLog:
    def __init__(self, sessionmaker: async_sessionmaker):
        self._sessionmaker = sessionmaker

    async def record(self, action: AuditAction | str, detail: dict[str, Any], source: str) -> None:
        """Append one entry, committed before this returns. ``source`` is the client's
        address (``request.remote``) or :data:`CLI_SOURCE`; ``detail`` must hold no secret."""
        async with self._sessionmaker() as session, session.begin():
            session.add(AuditEntry(action=str(action), detail=detail, source=source[:100]))

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first."""
        async with self._sessionmaker() as session:
            entries = await session.scalars(
                select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            )
            return [entry_json(entry) for entry in entries]
