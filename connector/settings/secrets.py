"""Secrets the service generates on first start when the deployment configuration has none."""

from __future__ import annotations

import secrets

from connector.db.kv import KeyValueStore

# 32 random bytes: the same strength Customer.io and Hull use for their own tokens.
TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class ServiceSecrets:
    """The session-signing key and the platform's ingest token: configured values win,
    otherwise the stored ones, generated the first time (:meth:`load`, at start-up; two
    instances starting at once agree on one)."""

    def __init__(self, store: KeyValueStore, *, secret_key: str = "", ingest_token: str = ""):
        self._store = store
        self._configured = {"secret_key": secret_key, "ingest_token": ingest_token}
        self._values: dict[str, str] = {}

    async def load(self) -> None:
        for name, configured in self._configured.items():
            self._values[name] = configured or await self._store.put_if_absent(name, new_token())

    def _get(self, name: str) -> str:
        if name not in self._values:
            raise RuntimeError("the service's secrets are read at start-up, before any request")
        return self._values[name]

    @property
    def secret_key(self) -> str:
        return self._get("secret_key")

    @property
    def ingest_token(self) -> str:
        return self._get("ingest_token")
