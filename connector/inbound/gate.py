"""What the webhook receiver checks a request against: the URL token and the signing key.

Both live in the database. Reading them on every webhook would cost a query per request, so
they are cached for :data:`REFRESH_SECONDS`; a rotation on this instance applies at once, one on
another instance within that time.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from dataclasses import dataclass

from connector.db.kv import KeyValueStore
from connector.inbound.signing import WebhookVerifier
from connector.settings.secrets import new_token
from connector.settings.store import SettingsStore

WEBHOOK_TOKEN_KEY = "webhook_token"
REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class GateState:
    token: str
    signing_key: str
    tolerance_seconds: int

    @functools.cached_property
    def verifier(self) -> WebhookVerifier | None:
        """The signature check, when a signing key is set (made once per state)."""
        if not self.signing_key:
            return None
        return WebhookVerifier(self.signing_key, self.tolerance_seconds)

    @functools.cached_property
    def _token_bytes(self) -> bytes:
        return self.token.encode()

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token_bytes)


async def ensure_webhook_token(kv: KeyValueStore) -> str:
    """The stored token; generated and stored the first time."""
    return await kv.get(WEBHOOK_TOKEN_KEY) or await kv.put_if_absent(WEBHOOK_TOKEN_KEY, new_token())


class WebhookGate:
    def __init__(self, kv: KeyValueStore, settings: SettingsStore, clock=time.monotonic):
        self._kv = kv
        self._settings = settings
        self._clock = clock
        self._state: GateState | None = None
        self._loaded_at = 0.0
        self._refreshing = asyncio.Lock()

    def fresh(self) -> GateState | None:
        """The cached state while it is fresh, else None (then await :meth:`current`): the
        receiver's path on nearly every webhook, without a coroutine."""
        if self._state is None or self._clock() - self._loaded_at > REFRESH_SECONDS:
            return None
        return self._state

    async def current(self) -> GateState:
        """The cached state; one request refreshes it when stale while the others go on."""
        stale = self.fresh() is None
        if stale and not self._refreshing.locked():
            async with self._refreshing:
                await self.refresh()
        elif self._state is None:
            async with self._refreshing:
                pass
        assert self._state is not None
        return self._state

    async def refresh(self) -> GateState:
        settings = await self._settings.load()
        token = await ensure_webhook_token(self._kv)
        self._state = GateState(
            token=token,
            signing_key=settings.webhook_signing_key,
            tolerance_seconds=settings.webhook_timestamp_tolerance_seconds,
        )
        self._loaded_at = self._clock()
        return self._state

    async def rotate(self) -> str:
        """A new token; the old one stops working at once on this instance."""
        token = new_token()
        await self._kv.put(WEBHOOK_TOKEN_KEY, token)
        await self.refresh()
        return token


def webhook_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/webhook?conf={token}"
