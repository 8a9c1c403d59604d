"""Secrets the service generates on first start when the deployment configuration has none."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from connector.config import Config
from connector.db.kv import KeyValueStore

# 32 random bytes: the same strength Customer.io and Hull use for their own tokens.
TOKEN_BYTES = 32


@dataclass(frozen=True)
class ServiceSecrets:
    secret_key: str
    ingest_token: str


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


async def ensure_secrets(config: Config, store: KeyValueStore) -> ServiceSecrets:
    """Configured values win; otherwise the stored ones, generated the first time."""
    secret_key = config.security.secret_key or await store.put_if_absent("secret_key", new_token())
    ingest_token = config.security.ingest_token or await store.put_if_absent(
        "ingest_token", new_token()
    )
    return ServiceSecrets(secret_key=secret_key, ingest_token=ingest_token)
