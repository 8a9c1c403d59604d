"""Whether Customer.io accepts a set of Track API credentials, and the stored ones' verdict."""

from __future__ import annotations

import logging

from connector.config import Config
from connector.ops.status import CredentialStatusStore
from connector.outbound.sender import CredentialCheck, CustomerIOSender
from connector.settings.store import SettingsStore

log = logging.getLogger("connector.credentials")

CHECK_INTERVAL_SECONDS = 30 * 60


class CredentialChecker:
    """Calls ``GET /api/v1/accounts/region`` through the sender's host and CA configuration."""

    def __init__(self, config: Config, settings: SettingsStore, credentials: CredentialStatusStore):
        self._config = config
        self._settings = settings
        self._credentials = credentials

    async def check(self, site_id: str, api_key: str, region: str) -> CredentialCheck:
        """Ask Customer.io about these credentials; records nothing."""
        try:
            sender = CustomerIOSender.from_config(
                site_id, api_key, region, self._config.customerio, self._config.sync
            )
        except ValueError as exc:
            return CredentialCheck(ok=False, reason=str(exc))
        try:
            return await sender.check_credentials()
        finally:
            await sender.close()

    async def record(self, result: CredentialCheck) -> None:
        """Store the verdict on the stored credentials, as ``/status`` shows it.

        Only a 401 makes them ``invalid``; a timeout or a 5xx says nothing about them, but
        Customer.io could not be reached with them: ``unreachable``, an error until a later
        check or pass gets through.
        """
        if result.ok:
            await self._credentials.record("valid", result.reason)
        elif result.unauthorized:
            await self._credentials.record("invalid", result.reason)
        else:
            await self._credentials.record("unreachable", result.reason)

    async def check_stored(self) -> CredentialCheck | None:
        """Check and record the stored credentials; ``None`` when there are none to check."""
        settings = await self._settings.load()
        if not settings.has_credentials:
            return None
        result = await self.check(settings.site_id, settings.api_key, settings.region)
        await self.record(result)
        log.info(
            "credentials checked",
            extra={"ok": result.ok, "region": result.region, "reason": result.reason},
        )
        return result
