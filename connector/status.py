"""The service's health as an operator sees it: pure rules over stored facts, plus their storage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connector.db.kv import KeyValueStore
from connector.db.types import utcnow
from connector.settings import ConnectorSettings

CREDENTIALS_KEY = "credentials_status"


@dataclass(frozen=True)
class Status:
    status: str
    """``ok``, ``warning`` or ``error``."""
    messages: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "messages": self.messages}


def compute_status(
    settings: ConnectorSettings,
    credentials: dict[str, Any] | None,
    last_run_error: str | None,
    failed_users: int,
    forwarding_error: str | None = None,
) -> Status:
    """Missing credentials and no whitelisted segment warn; invalid credentials and failing calls
    are errors."""
    errors: list[str] = []
    warnings: list[str] = []
    if not settings.has_credentials:
        warnings.append("Customer.io credentials are missing: set site_id and api_key")
    elif credentials and credentials.get("state") == "invalid":
        errors.append(f"Invalid credentials: {credentials.get('reason') or 'Customer.io said 401'}")
    if not settings.synchronized_segments:
        warnings.append("No whitelisted segment: only users sent through /batch are synced")
    if last_run_error and not errors and settings.has_credentials:
        errors.append(f"Last sync failed: {last_run_error}")
    if failed_users:
        errors.append(f"{failed_users} user(s) failed to sync; see GET /api/users/{{id}}")
    if forwarding_error and settings.forward_url:
        errors.append(f"Forwarding is failing: {forwarding_error}")
    if errors:
        return Status("error", errors + warnings)
    if warnings:
        return Status("warning", warnings)
    return Status("ok", [])


class CredentialStatusStore:
    def __init__(self, store: KeyValueStore):
        self._store = store

    async def get(self) -> dict[str, Any] | None:
        return await self._store.get(CREDENTIALS_KEY)

    async def record(
        self, state: str, reason: str | None = None, at: datetime | None = None
    ) -> None:
        """``valid``, ``invalid`` or ``unknown`` (after the credentials changed)."""
        checked = (at or utcnow()).isoformat()
        await self._store.put(CREDENTIALS_KEY, {"state": state, "reason": reason, "at": checked})
