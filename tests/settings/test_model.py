"""Connector settings: validation, masking of secrets, partial updates."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from connector.settings.model import MASK, ConnectorSettings, apply_patch


def test_settings_masked_hides_every_secret():
    settings = ConnectorSettings(api_key="k-1", webhook_signing_key="s-1", forward_write_key="w")
    masked = settings.masked()
    assert masked["api_key"] == masked["webhook_signing_key"] == masked["forward_write_key"] == MASK
    assert "k-1" not in str(masked)


def test_settings_masked_shows_unset_secret_as_empty():
    assert ConnectorSettings().masked()["api_key"] == ""


def test_settings_patch_with_mask_keeps_the_secret():
    current = ConnectorSettings(api_key="real-key")
    updated = apply_patch(current, {"api_key": MASK, "site_id": "site"})
    assert updated.api_key == "real-key"
    assert updated.site_id == "site"


def test_settings_patch_can_clear_a_secret():
    assert apply_patch(ConnectorSettings(api_key="real-key"), {"api_key": ""}).api_key == ""


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"region": "asia"}, "region"),
        ({"max_attributes_per_call": 0}, "max_attributes_per_call"),
        ({"max_attributes_per_call": 301}, "max_attributes_per_call"),
        ({"synchronized_segments": "seg-1"}, "synchronized_segments"),
        ({"synchronized_segments": [" "]}, "synchronized_segments"),
        ({"enable_user_deletion": "perhaps"}, "enable_user_deletion"),
        ({"incoming_metrics": ["email opened"]}, "incoming_metrics"),
        ({"forward_url": "ftp://x"}, "forward_url"),
        ({"user_id_mapping": ""}, "user_id_mapping"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_settings_patch_rejects_bad_values_per_field(patch, field):
    with pytest.raises(ValidationError) as caught:
        apply_patch(ConnectorSettings(), patch)
    assert field in caught.value.messages


def test_settings_patch_keeps_what_it_does_not_name():
    current = ConnectorSettings(site_id="s", synchronized_segments=("a",))
    updated = apply_patch(current, {"enable_user_deletion": True})
    assert updated.site_id == "s"
    assert updated.synchronized_segments == ("a",)
    assert updated.enable_user_deletion is True
