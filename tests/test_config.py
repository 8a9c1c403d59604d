"""Deployment configuration: TOML, environment overrides, every error at once."""

from __future__ import annotations

import pytest

from connector.config import (
    ConfigError,
    apply_environment,
    load_config,
    parse_config,
    unknown_variables,
)

MINIMAL = {"security": {"admin_password": "long-enough"}}


def test_config_defaults_follow_the_spec():
    config = parse_config(MINIMAL)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.public_url == "http://127.0.0.1:8080"
    assert config.database.url == "sqlite+aiosqlite:///connector.db"
    assert config.sync.interval_seconds == 30
    assert config.sync.rate_limit_per_second == 100
    assert config.sync.concurrency == 8
    assert config.sync.max_attempts == 10
    assert config.inbound.retention_days == 30
    assert config.customerio.track_host == ""


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"port": 9000}, "http://127.0.0.1:9000"),
        ({"host": "0.0.0.0", "port": 9000}, "http://0.0.0.0:9000"),
        ({"host": "::1", "port": 9000}, "http://[::1]:9000"),
        ({"port": 9000, "public_url": "https://hooks.example.com"}, "https://hooks.example.com"),
    ],
)
def test_config_public_url_follows_host_and_port_unless_set(server, expected):
    assert parse_config({**MINIMAL, "server": server}).server.public_url == expected


def test_config_public_url_follows_the_port_from_the_environment():
    config = parse_config(apply_environment(MINIMAL, {"CONNECTOR_SERVER_PORT": "9001"}))
    assert config.server.public_url == "http://127.0.0.1:9001"


def test_config_reports_every_error_at_once_with_key_names():
    raw = {
        "server": {"port": 70000},
        "sync": {"concurrency": 0, "bogus": 1},
        "security": {},
        "connector": {"region": "mars", "max_attributes_per_call": 301},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    text = "\n".join(caught.value.errors)
    for key in (
        "server.port",
        "sync.concurrency",
        "sync.bogus",
        "security.admin_password",
        "connector.region",
        "connector.max_attributes_per_call",
    ):
        assert key in text, key


@pytest.mark.parametrize(
    ("variable", "value", "read", "expected"),
    [
        (
            "CONNECTOR_DATABASE_URL",
            "postgresql+asyncpg://x@h/db",
            lambda c: c.database.url,
            "postgresql+asyncpg://x@h/db",
        ),
        ("CONNECTOR_SERVER_PORT", "9090", lambda c: c.server.port, 9090),
        ("CONNECTOR_SYNC_INTERVAL_SECONDS", "5", lambda c: c.sync.interval_seconds, 5.0),
        (
            "CONNECTOR_CUSTOMERIO_TRACK_HOST",
            "localhost:8443",
            lambda c: c.customerio.track_host,
            "localhost:8443",
        ),
    ],
)
def test_config_environment_overrides_file(variable, value, read, expected):
    assert read(parse_config(apply_environment(MINIMAL, {variable: value}))) == expected


def test_config_environment_lists_take_commas_or_json():
    commas = apply_environment({}, {"CONNECTOR_CONNECTOR_EVENTS_FILTER": "Signed Up, page"})
    as_json = apply_environment({}, {"CONNECTOR_CONNECTOR_EVENTS_FILTER": '["a,b", "c"]'})
    assert commas["connector"]["events_filter"] == ["Signed Up", "page"]
    assert as_json["connector"]["events_filter"] == ["a,b", "c"]


def test_config_file_is_read_and_environment_wins(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[security]\nadmin_password = "from-the-file"\n[server]\nport = 8081\n')
    config = load_config(path, {"CONNECTOR_SERVER_PORT": "8082"})
    assert config.security.admin_password == "from-the-file"
    assert config.server.port == 8082


def test_config_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", {})


def test_config_broken_toml_is_an_error(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("[security\n")
    with pytest.raises(ConfigError):
        load_config(path, {})


@pytest.mark.parametrize("key", ["secret_key", "ingest_token"])
def test_config_empty_generated_secret_means_generate(key):
    config = parse_config({"security": {"admin_password": "long-enough", key: ""}})
    assert getattr(config.security, key) == ""
    with pytest.raises(ConfigError, match=f"security.{key}"):
        parse_config({"security": {"admin_password": "long-enough", key: "short"}})


def test_config_unknown_variable_is_warned_about_with_the_closest_name():
    environ = {"CONNECTOR_DATABSE_URL": "x", "CONNECTOR_NOTHING_LIKE_IT": "y", "HOME": "/"}
    assert unknown_variables(environ) == [
        "CONNECTOR_DATABSE_URL names no setting and is ignored"
        " (did you mean CONNECTOR_DATABASE_URL?)",
        "CONNECTOR_NOTHING_LIKE_IT names no setting and is ignored",
    ]


@pytest.mark.parametrize(
    "variable",
    [
        "CONNECTOR_CONFIG",
        "CONNECTOR_TEST_POSTGRES_URL",
        "CONNECTOR_UPDATE_SCREENSHOTS",
        "CONNECTOR_SERVER_PORT",
        "CONNECTOR_CONNECTOR_EVENTS_FILTER",
    ],
)
def test_config_known_and_suite_variables_are_not_warned_about(variable):
    assert unknown_variables({variable: "1"}) == []
