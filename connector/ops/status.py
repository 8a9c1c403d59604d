"""The service's health as an operator sees it: pure rules over stored facts, plus their storage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector.db.kv import KeyValueStore
from connector.db.types import utcnow
from connector.settings.model import ConnectorSettings

if TYPE_CHECKING:
    from connector.ops.quarantine import Quarantined

CREDENTIALS_KEY = "credentials_status"
CALL_FAILURES_KEY = "track_call_failures"
CALL_FAILURE_WINDOW = timedelta(minutes=5)
"""Failing Track API calls show on ``/status`` for this long after the last one was recorded."""
INVALID_CREDENTIALS = "Invalid credentials"
CONNECT_ERROR = "Error when trying to connect with Customer.io"
"""Hull's own connector's words for a credential check Customer.io could not answer."""


_QUARANTINE_WORDS = {
    "webhooks": "webhook(s) that could not be processed",
    "forwarding": "forwarded event(s) that failed for good",
}


@dataclass(frozen=True)
class Status:
    status: str
    """``ok``, ``warning`` or ``error``."""
    messages: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "messages": self.messages}


def _moment(record: dict[str, Any] | None) -> datetime | None:
    """When a stored record (``{"at": ISO 8601, ...}``) was written; None if unknown."""
    try:
        return datetime.fromisoformat(record["at"]) if record else None
    except (KeyError, TypeError, ValueError):
        return None


def _superseded(last_run_at: datetime | None, credentials: dict[str, Any] | None) -> bool:
    """Whether a verdict on the credentials came after the last pass (which it then replaces).

    A pass's error is always about the credentials (missing, or refused with a 401), and every
    credential change, check and pass records a verdict, so a newer one is the current truth.
    """
    checked = _moment(credentials)
    return last_run_at is not None and checked is not None and checked > last_run_at


def _prefixed(prefix: str, reason: str) -> str:
    """``prefix: reason``, or the reason alone when it already says the prefix (the credential
    check's reason for a 401 is "Invalid credentials" itself)."""
    if reason.lower().startswith(prefix.lower()):
        return reason
    return f"{prefix}: {reason}"


def compute_status(
    settings: ConnectorSettings,
    credentials: dict[str, Any] | None,
    last_run_error: str | None,
    failed_users: int,
    forwarding_error: str | None = None,
    *,
    last_run_at: datetime | None = None,
    call_failures: dict[str, Any] | None = None,
    quarantine: dict[str, Quarantined] | None = None,
    now: datetime | None = None,
    held_deletions: int = 0,
) -> Status:
    """Missing credentials, no whitelisted segment and Track API calls failing in the last
    :data:`CALL_FAILURE_WINDOW` warn; invalid credentials, a credential check Customer.io could
    not answer, users given up on and failing forwarding are errors.

    A last pass's error older than the latest credential verdict is not reported: the
    credentials it was about have changed or been checked since. Webhooks and forwarded events
    set aside (``quarantine``, see :mod:`connector.ops.quarantine`) warn, with the latest reason.
    Deletions held by the deletion guard (``held_deletions``) warn, with their count.
    """
    errors: list[str] = []
    warnings: list[str] = []
    state = (credentials or {}).get("state")
    reason = (credentials or {}).get("reason")
    if not settings.has_credentials:
        warnings.append("Customer.io credentials are missing: set site_id and api_key")
    elif state == "invalid":
        errors.append(_prefixed(INVALID_CREDENTIALS, reason or "Customer.io said 401"))
    elif state == "unreachable":
        errors.append(_prefixed(CONNECT_ERROR, reason or "no answer"))
    if not settings.synchronized_segments:
        warnings.append("No whitelisted segment: only users sent through /batch are synced")
    if (
        last_run_error
        and not errors
        and settings.has_credentials
        and not _superseded(last_run_at, credentials)
    ):
        errors.append(f"Last sync failed: {last_run_error}")
    quarantine = quarantine or {}
    if failed_users:
        latest = quarantine.get("users")
        because = f" (latest: {latest.reason})" if latest and latest.reason else ""
        errors.append(
            f"{failed_users} user(s) failed to sync{because}; see /admin/users/{{id}} "
            f"(or GET /api/users/{{id}}), and POST /api/retry-failed once fixed"
        )
    for name, what in _QUARANTINE_WORDS.items():
        held = quarantine.get(name)
        if held and held.count:
            warnings.append(
                f"{held.count} {what} set aside (latest: {held.reason or 'no reason'}); "
                "POST /api/retry-failed tries them again"
            )
    if held_deletions:
        warnings.append(
            f"{held_deletions} deletion(s) held: a pass planned more than "
            "sync.max_deletions_per_pass; see GET /api/deletions, and confirm them with "
            "POST /api/deletions/confirm (or the settings page)"
        )
    if forwarding_error and settings.forward_url:
        errors.append(f"Forwarding is failing: {forwarding_error}")
    last_failure = _moment(call_failures)
    if call_failures and last_failure and last_failure >= (now or utcnow()) - CALL_FAILURE_WINDOW:
        warnings.append(
            f"Customer.io Track API calls are failing ({call_failures.get('count')} in the "
            f"last pass, retried with backoff): {call_failures.get('reason')}"
        )
    if errors:
        return Status("error", errors + warnings)
    if warnings:
        return Status("warning", warnings)
    return Status("ok", [])


class CredentialStatusStore:
    """The stored facts ``/status`` reports besides the database's own: the verdict on the
    credentials and the Track API calls failing lately."""

    def __init__(self, store: KeyValueStore):
        self._store = store

    async def get(self) -> dict[str, Any] | None:
        return await self._store.get(CREDENTIALS_KEY)

    async def record(
        self, state: str, reason: str | None = None, at: datetime | None = None
    ) -> None:
        """``valid``, ``invalid`` (401), ``unreachable`` (a check Customer.io did not answer
        with 2xx or 401) or ``unknown`` (after the credentials changed)."""
        checked = (at or utcnow()).isoformat()
        await self._store.put(CREDENTIALS_KEY, {"state": state, "reason": reason, "at": checked})

    async def call_failures(self) -> dict[str, Any] | None:
        return await self._store.get(CALL_FAILURES_KEY)

    async def record_call_failures(self, count: int, reason: str | None) -> None:
        """``count`` Track API calls of the pass under way failed (429, 5xx, timeouts...)."""
        record = {"count": count, "reason": reason, "at": utcnow().isoformat()}
        await self._store.put(CALL_FAILURES_KEY, record)

    async def clear_call_failures(self) -> None:
        """A pass's calls all went through: the trouble, if any, is over."""
        await self._store.put(CALL_FAILURES_KEY, {})
