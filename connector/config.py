"""Deployment configuration: a TOML file overlaid with ``CONNECTOR_<SECTION>_<KEY>`` variables.

The file and the environment are read only when :func:`load_config` is called, never at
import time, so tests and the CLI can build as many configurations as they like.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate

ENV_PREFIX = "CONNECTOR_"
DEFAULT_CONFIG_PATH = "settings.toml"


class ConfigError(Exception):
    """The configuration could not be read or is invalid; ``errors`` lists every problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    """Base of the generated webhook URL; empty means ``http://{host}:{port}``."""
    access_log: bool = False
    """Log every HTTP request (aiohttp's access log, as JSON lines)."""

    def __post_init__(self) -> None:
        if not self.public_url:
            host = f"[{self.host}]" if ":" in self.host else self.host
            object.__setattr__(self, "public_url", f"http://{host}:{self.port}")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite+aiosqlite:///connector.db"


@dataclass(frozen=True)
class SecurityConfig:
    admin_password: str = ""
    secret_key: str = ""
    ingest_token: str = ""


@dataclass(frozen=True)
class CustomerioConfig:
    track_host: str = ""
    ca_file: str = ""
    timeout_seconds: float = 10.0


TRANSPORTS = ("batch", "single")
"""``sync.transport``: how the outbound sync talks to the Track API."""


@dataclass(frozen=True)
class SyncConfig:
    scheduled: bool = True
    """Run the outbound sync inside ``serve`` (on the schedule and when notified)."""
    interval_seconds: float = 30
    rate_limit_per_second: float = 100
    concurrency: int = 8
    max_attempts: int = 10
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 900.0
    claim_batch_size: int = 200
    lease_seconds: float = 300.0
    max_deletions_per_pass: int = 100
    """A pass that plans more deletions than this sends none of them: they are held until an
    admin confirms them. 0 turns the guard off."""
    transport: str = "batch"
    """``batch``: operations of many users packed into ``/api/v2/batch`` requests;
    ``single``: one Track API v1 call per operation."""
    batch_max_bytes: int = 450_000
    """A batch request's encoded JSON stays within this (Customer.io refuses 500 KB or more)."""
    batch_max_operations: int = 1000
    """Operations in one batch request at most."""


@dataclass(frozen=True)
class InboundConfig:
    retention_days: int = 30


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    customerio: CustomerioConfig = field(default_factory=CustomerioConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    connector: dict[str, Any] = field(default_factory=dict)
    """Initial connector settings, applied only while the database holds none."""


class _SectionSchema(Schema):
    class Meta:
        unknown = RAISE

    dataclass: type

    @post_load
    def _build(self, data: dict[str, Any], **_: Any) -> Any:
        return self.dataclass(**data)


class ServerSchema(_SectionSchema):
    dataclass = ServerConfig
    host = fields.String(validate=validate.Length(min=1))
    port = fields.Integer(validate=validate.Range(min=1, max=65535))
    public_url = fields.Url(require_tld=False, schemes={"http", "https"})
    access_log = fields.Boolean()


class DatabaseSchema(_SectionSchema):
    dataclass = DatabaseConfig
    url = fields.String(
        validate=validate.Regexp(
            r"^(sqlite\+aiosqlite|postgresql\+asyncpg)://",
            error="must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL",
        )
    )


def _empty_or_long(value: str) -> None:
    if value and len(value) < 16:
        raise ValidationError("must be empty (generated) or at least 16 characters")


class SecuritySchema(_SectionSchema):
    dataclass = SecurityConfig
    admin_password = fields.String(
        required=True, validate=validate.Length(min=8, error="must be at least 8 characters")
    )
    # Empty means "generate one on first start and keep it in the database".
    secret_key = fields.String(validate=_empty_or_long)
    ingest_token = fields.String(validate=_empty_or_long)


class CustomerioSchema(_SectionSchema):
    dataclass = CustomerioConfig
    track_host = fields.String(
        validate=validate.Regexp(r"^$|^[A-Za-z0-9.\-]+(:\d{1,5})?$", error="must be host[:port]")
    )
    ca_file = fields.String()
    timeout_seconds = fields.Float(validate=validate.Range(min=0.1, max=120))


class SyncSchema(_SectionSchema):
    dataclass = SyncConfig
    scheduled = fields.Boolean()
    interval_seconds = fields.Float(validate=validate.Range(min=0.05))
    rate_limit_per_second = fields.Float(validate=validate.Range(min=0.1))
    concurrency = fields.Integer(validate=validate.Range(min=1, max=256))
    max_attempts = fields.Integer(validate=validate.Range(min=1))
    backoff_base_seconds = fields.Float(validate=validate.Range(min=0))
    backoff_max_seconds = fields.Float(validate=validate.Range(min=0))
    claim_batch_size = fields.Integer(validate=validate.Range(min=1, max=10_000))
    lease_seconds = fields.Float(validate=validate.Range(min=1))
    max_deletions_per_pass = fields.Integer(validate=validate.Range(min=0))
    transport = fields.String(validate=validate.OneOf(TRANSPORTS))
    batch_max_bytes = fields.Integer(validate=validate.Range(min=40_000, max=499_999))
    batch_max_operations = fields.Integer(validate=validate.Range(min=1, max=10_000))


class InboundSchema(_SectionSchema):
    dataclass = InboundConfig
    retention_days = fields.Integer(validate=validate.Range(min=1))


SECTIONS: dict[str, type[_SectionSchema]] = {
    "server": ServerSchema,
    "database": DatabaseSchema,
    "security": SecuritySchema,
    "customerio": CustomerioSchema,
    "sync": SyncSchema,
    "inbound": InboundSchema,
}


class ConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    server = fields.Nested(ServerSchema, load_default=ServerConfig)
    database = fields.Nested(DatabaseSchema, load_default=DatabaseConfig)
    security = fields.Nested(SecuritySchema, required=True)
    customerio = fields.Nested(CustomerioSchema, load_default=CustomerioConfig)
    sync = fields.Nested(SyncSchema, load_default=SyncConfig)
    inbound = fields.Nested(InboundSchema, load_default=InboundConfig)
    connector = fields.Dict(keys=fields.String(), load_default=dict)

    @post_load
    def _build(self, data: dict[str, Any], **_: Any) -> Config:
        return Config(**data)


def _env_value(raw: str, field_obj: fields.Field | None) -> Any:
    """Turn an environment string into what the field expects (lists: JSON or commas)."""
    if isinstance(field_obj, fields.List):
        stripped = raw.strip()
        if stripped.startswith("["):
            return json.loads(stripped)
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return raw


def _connector_fields() -> Mapping[str, fields.Field]:
    from connector.settings.model import ConnectorSettingsSchema

    return ConnectorSettingsSchema().fields


def _variables() -> dict[str, tuple[str, str, fields.Field]]:
    """Every ``CONNECTOR_<SECTION>_<KEY>`` name, with the section, key and field it sets."""
    known: dict[str, Mapping[str, fields.Field]] = {
        name: schema().fields for name, schema in SECTIONS.items()
    }
    known["connector"] = _connector_fields()
    return {
        f"{ENV_PREFIX}{section}_{key}".upper(): (section, key, field_obj)
        for section, section_fields in known.items()
        for key, field_obj in section_fields.items()
    }


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``CONNECTOR_<SECTION>_<KEY>`` variables on the TOML data."""
    merged = {
        name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()
    }
    for env_name, (section, key, field_obj) in _variables().items():
        if env_name in environ:
            merged.setdefault(section, {})[key] = _env_value(environ[env_name], field_obj)
    return merged


# Variables of the prefix that are no setting: the file's path, and the test suite's own.
_NOT_SETTINGS = re.compile(rf"^{ENV_PREFIX}(CONFIG|UPDATE_SCREENSHOTS|TEST_.*)$")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``CONNECTOR_*`` variable that sets nothing (a misspelt name is
    otherwise silently ignored), naming the closest known one if there is one."""
    known = _variables()
    suffixes = [name.removeprefix(ENV_PREFIX) for name in known]
    warnings: list[str] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or _NOT_SETTINGS.match(name):
            continue
        warning = f"{name} names no setting and is ignored"
        # Compared without the prefix, which every name shares and which would make any two
        # names look alike.
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
        if close:
            warning += f" (did you mean {ENV_PREFIX}{close[0]}?)"
        warnings.append(warning)
    return warnings


def _flatten(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_flatten(value, name))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix}: {m}" for m in messages]
    if isinstance(messages, list):
        return [line for m in messages for line in _flatten(m, prefix)]
    return [f"{prefix}: {messages}"]


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate already-merged configuration data, reporting every error at once."""
    from connector.settings.model import ConnectorSettingsSchema

    errors: list[str] = []
    try:
        config = ConfigSchema().load(raw)
    except ValidationError as exc:
        errors.extend(_flatten(exc.messages))
        config = None
    connector_errors = ConnectorSettingsSchema().validate(raw.get("connector") or {})
    errors.extend(_flatten(connector_errors, "connector"))
    if errors or config is None:
        raise ConfigError(sorted(set(errors)))
    return config


def config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    return Path(explicit or environ.get(f"{ENV_PREFIX}CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the TOML file (optional when the environment supplies everything) and validate."""
    environ = os.environ if environ is None else environ
    file = config_path(path, environ)
    raw: dict[str, Any] = {}
    if file.exists():
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{file}: {exc}"]) from exc
    elif path is not None:
        raise ConfigError([f"{file}: no such file"])
    return parse_config(apply_environment(raw, environ))
