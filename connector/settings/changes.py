"""Saving connector settings, and what a change sets in motion: the one path the admin API
and the settings page share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from connector.settings.model import ConnectorSettings
from connector.settings.store import SettingsStore

# Changing any of these changes what users should look like in Customer.io.
MAPPING_KEYS = frozenset(
    {
        "synchronized_segments",
        "synchronized_attributes",
        "user_id_mapping",
        "events_filter",
        "anonymous_events",
        "enable_user_deletion",
    }
)
CREDENTIAL_KEYS = frozenset({"site_id", "api_key", "region"})
WEBHOOK_KEYS = frozenset({"webhook_signing_key", "webhook_timestamp_tolerance_seconds"})


@dataclass(frozen=True)
class SavedSettings:
    settings: ConnectorSettings
    """The settings as stored now."""
    changes: dict[str, tuple[Any, Any]]
    """Each field the patch changed: its value before and after (secrets too: never show
    them as they are)."""


class SettingsChanges:
    """Stores settings patches and tells the rest of the service what changed: the
    consequences are callables, so that settings know nothing of the sync or the inbox."""

    def __init__(
        self,
        store: SettingsStore,
        *,
        credentials_changed: Callable[[], Awaitable[object]],
        mapping_changed: Callable[[], Awaitable[object]],
        webhook_keys_changed: Callable[[], Awaitable[object]],
        sync_soon: Callable[[str], None],
    ):
        self._store = store
        self._credentials_changed = credentials_changed
        self._mapping_changed = mapping_changed
        self._webhook_keys_changed = webhook_keys_changed
        self._sync_soon = sync_soon

    async def save(self, patch: dict[str, Any], *, by: str) -> SavedSettings:
        """Validate and store ``patch``, then act on what changed.

        Raises marshmallow's ``ValidationError`` with per-field messages; nothing is saved
        then. New credentials are unchecked until the next check or sync; a new mapping puts
        every user back in the queue; either starts a sync soon, recorded as asked for ``by``
        the patch's sender (``api``, ``page``).
        """
        before = (await self._store.load()).to_dict()
        after = await self._store.update(patch)
        changes = {
            key: (before[key], value)
            for key, value in after.to_dict().items()
            if before[key] != value
        }
        changed = set(changes)
        if changed & CREDENTIAL_KEYS:
            await self._credentials_changed()
        if changed & MAPPING_KEYS:
            await self._mapping_changed()
        if changed & WEBHOOK_KEYS:
            # This instance verifies with the new signing key at once, not after the cache
            # expires.
            await self._webhook_keys_changed()
        if changed & (MAPPING_KEYS | CREDENTIAL_KEYS):
            self._sync_soon(by)
        return SavedSettings(after, changes)
