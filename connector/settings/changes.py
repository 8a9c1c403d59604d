"""Saving connector settings, and what a change sets in motion: the one path the admin API
and the settings page share."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from connector.settings.model import ConnectorSettings
from connector.web.keys import (
    credentials_key,
    scheduler_key,
    settings_key,
    sync_key,
    webhook_gate_key,
)

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


async def save_settings(app: web.Application, patch: dict[str, Any]) -> ConnectorSettings:
    """Validate and store ``patch``, then act on what changed.

    Raises marshmallow's ``ValidationError`` with per-field messages; nothing is saved then.
    New credentials are unchecked until the next check or sync; a new mapping puts every
    user back in the queue; either starts a sync soon.
    """
    store = app[settings_key]
    before = (await store.load()).to_dict()
    after = await store.update(patch)
    changed = {key for key, value in after.to_dict().items() if before[key] != value}
    if changed & CREDENTIAL_KEYS:
        await app[credentials_key].record("unknown", "credentials changed")
    if changed & MAPPING_KEYS:
        await app[sync_key].repository.mark_all_pending(full=False)
    if changed & WEBHOOK_KEYS:
        # This instance verifies with the new signing key at once, not after the cache expires.
        await app[webhook_gate_key].refresh()
    if changed & (MAPPING_KEYS | CREDENTIAL_KEYS):
        app[scheduler_key].trigger_sync()
    return after
