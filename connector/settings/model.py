"""Connector settings (Hull's "private settings"): what to sync and how, stored in the database.

Validation lives here; storage is :mod:`connector.db.kv`. Secrets are masked whenever
settings leave the service.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from connector.rules.safe_json import is_storable

SECRET_FIELDS = frozenset({"api_key", "webhook_signing_key", "forward_write_key"})
MASK = "********"
"""What a set secret looks like outside the service; sending it back leaves the secret as is."""

_METRIC_PATTERN = re.compile(r"^[a-z_]+:[a-z_]+$")


@dataclass(frozen=True)
class ConnectorSettings:
    site_id: str = ""
    api_key: str = ""
    region: str = "us"
    user_id_mapping: str = "external_id"
    synchronized_segments: tuple[str, ...] = ()
    synchronized_attributes: tuple[str, ...] = ()
    enable_user_deletion: bool = False
    events_filter: tuple[str, ...] = ()
    anonymous_events: bool = False
    max_attributes_per_call: int = 30
    webhook_signing_key: str = ""
    webhook_timestamp_tolerance_seconds: int = 300
    incoming_metrics: tuple[str, ...] | None = None
    """``object_type:metric`` pairs that become tracked events; ``None`` means all."""
    forward_url: str = ""
    forward_write_key: str = ""
    forward_event_prefix: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_credentials(self) -> bool:
        return bool(self.site_id and self.api_key)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def masked(self) -> dict[str, Any]:
        """The settings as the API shows them: secrets replaced by :data:`MASK` when set."""
        data = self.to_dict()
        for key in SECRET_FIELDS:
            data[key] = MASK if data[key] else ""
        return data


class Text(fields.String):
    """A string that can be stored and shown: valid Unicode without NUL. (A lone surrogate
    saved here would break the settings page and every call that uses the setting.)"""

    default_error_messages = {"unstorable": "must be valid Unicode text without NUL characters"}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_storable(text):
            raise self.make_error("unstorable")
        return text


def _non_blank_items(values: list[str]) -> None:
    if any(not value.strip() for value in values):
        raise ValidationError("must not contain blank entries")


class ConnectorSettingsSchema(Schema):
    class Meta:
        unknown = RAISE

    site_id = Text(validate=validate.Length(max=200))
    api_key = Text(validate=validate.Length(max=200))
    region = Text(validate=validate.OneOf(["us", "eu"]))
    user_id_mapping = Text(validate=validate.Regexp(r"^\S+$", error="must be an attribute name"))
    synchronized_segments = fields.List(Text(), validate=_non_blank_items)
    synchronized_attributes = fields.List(Text(), validate=_non_blank_items)
    enable_user_deletion = fields.Boolean()
    events_filter = fields.List(Text(), validate=_non_blank_items)
    anonymous_events = fields.Boolean()
    max_attributes_per_call = fields.Integer(validate=validate.Range(min=1, max=300))
    webhook_signing_key = Text(validate=validate.Length(max=500))
    webhook_timestamp_tolerance_seconds = fields.Integer(validate=validate.Range(min=1, max=86400))
    incoming_metrics = fields.List(Text(), allow_none=True)
    forward_url = Text()
    forward_write_key = Text(validate=validate.Length(max=500))
    forward_event_prefix = Text(validate=validate.Length(max=100))

    @validates("incoming_metrics")
    def _check_metrics(self, value: list[str] | None, **_: Any) -> None:
        bad = [item for item in value or [] if not _METRIC_PATTERN.match(item)]
        if bad:
            raise ValidationError(f"must be object_type:metric pairs, got {', '.join(bad)}")

    @validates("forward_url")
    def _check_forward_url(self, value: str, **_: Any) -> None:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValidationError("must be an http:// or https:// URL")


def from_dict(data: dict[str, Any]) -> ConnectorSettings:
    """Build settings from stored or validated data; unknown keys are kept aside, not lost."""
    known = {f.name for f in dataclasses.fields(ConnectorSettings)} - {"extra"}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            values[key] = tuple(value) if isinstance(value, list) else value
    extra = {key: value for key, value in data.items() if key not in known}
    return ConnectorSettings(**values, extra=extra)


def validate_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Validate a complete or partial settings document; raises ``ValidationError``."""
    return ConnectorSettingsSchema().load(data)


def apply_patch(current: ConnectorSettings, patch: dict[str, Any]) -> ConnectorSettings:
    """Merge a validated-on-the-way patch into ``current``; a masked secret leaves it as is.

    Raises ``ValidationError`` with per-field messages; nothing is applied then.
    """
    if not isinstance(patch, dict):
        raise ValidationError({"_schema": ["must be a JSON object"]})
    cleaned = {
        key: value for key, value in patch.items() if not (key in SECRET_FIELDS and value == MASK)
    }
    loaded = validate_settings(cleaned)
    merged = current.to_dict()
    merged.update(loaded)
    return from_dict(merged)
