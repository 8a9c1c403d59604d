"""The settings store: what a reader that tolerates an older copy gets, and when."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from connector.runtime import Runtime, open_runtime
from connector.settings.store import SettingsStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        yield runtime


async def test_settings_load_recent_keeps_a_copy_for_max_age_then_reads_again(runtime):
    clock = Clock()
    here = SettingsStore(runtime.kv, clock)
    elsewhere = SettingsStore(runtime.kv)  # another instance of the service
    assert (await here.load_recent(1.0)).incoming_metrics is None

    await elsewhere.update({"incoming_metrics": ["email:opened"]})
    clock.now += 0.5
    assert (await here.load_recent(1.0)).incoming_metrics is None
    clock.now += 0.6
    assert (await here.load_recent(1.0)).incoming_metrics == ("email:opened",)


async def test_settings_load_recent_sees_a_change_saved_here_at_once(runtime):
    clock = Clock()
    store = SettingsStore(runtime.kv, clock)
    await store.load_recent(1.0)
    await store.update({"incoming_metrics": ["email:clicked"]})
    assert (await store.load_recent(1.0)).incoming_metrics == ("email:clicked",)
