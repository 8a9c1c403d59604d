"""Connector settings in the database: read, seeded from the TOML, patched through the API."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.kv import KeyValueStore, get_value
from connector.settings.model import ConnectorSettings, apply_patch, from_dict, validate_settings

SETTINGS_KEY = "connector_settings"


async def load_settings(session: AsyncSession) -> ConnectorSettings:
    """The settings as ``session``'s transaction sees them."""
    return from_dict(await get_value(session, SETTINGS_KEY, {}))


class SettingsStore:
    def __init__(self, store: KeyValueStore, clock=time.monotonic):
        self._store = store
        self._clock = clock
        # The settings as this instance last read or saved them, and when.
        self._recent: tuple[float, ConnectorSettings] | None = None

    async def load(self) -> ConnectorSettings:
        started = self._clock()
        settings = from_dict(await self._store.get(SETTINGS_KEY, {}))
        # A read that began before a save on this instance must not replace what it saved.
        if self._recent is None or started >= self._recent[0]:
            self._recent = (started, settings)
        return settings

    async def load_recent(self, max_age: float) -> ConnectorSettings:
        """The settings as read or saved on this instance at most ``max_age`` seconds ago,
        else as stored now: for work that needs them for every batch, where reading them cost
        a round trip to the database each time. A change saved on this instance applies at
        once; one saved on another instance within ``max_age``."""
        recent = self._recent
        if recent is not None and self._clock() - recent[0] < max_age:
            return recent[1]
        return await self.load()

    async def seed(self, initial: dict[str, Any]) -> None:
        """Store the TOML's ``[connector]`` settings while the database holds none."""
        await self._store.put_if_absent(SETTINGS_KEY, validate_settings(initial or {}))

    async def update(self, patch: dict[str, Any]) -> ConnectorSettings:
        """Validate and save a partial update; raises ``ValidationError`` and saves nothing."""
        updated = apply_patch(await self.load(), patch)
        await self._store.put(SETTINGS_KEY, updated.to_dict())
        self._recent = (self._clock(), updated)
        return updated
