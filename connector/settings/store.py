"""Connector settings in the database: read, seeded from the TOML, patched through the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.kv import KeyValueStore, get_value
from connector.settings.model import ConnectorSettings, apply_patch, from_dict, validate_settings

SETTINGS_KEY = "connector_settings"


async def load_settings(session: AsyncSession) -> ConnectorSettings:
    """The settings as ``session``'s transaction sees them."""
    return from_dict(await get_value(session, SETTINGS_KEY, {}))


class SettingsStore:
    def __init__(self, store: KeyValueStore):
        self._store = store

    async def load(self) -> ConnectorSettings:
        return from_dict(await self._store.get(SETTINGS_KEY, {}))

    async def seed(self, initial: dict[str, Any]) -> None:
        """Store the TOML's ``[connector]`` settings while the database holds none."""
        await self._store.put_if_absent(SETTINGS_KEY, validate_settings(initial or {}))

    async def update(self, patch: dict[str, Any]) -> ConnectorSettings:
        """Validate and save a partial update; raises ``ValidationError`` and saves nothing."""
        updated = apply_patch(await self.load(), patch)
        await self._store.put(SETTINGS_KEY, updated.to_dict())
        return updated
