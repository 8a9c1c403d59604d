"""``GET /api/openapi.json``: the OpenAPI 3.1 document of the HTTP surface.

Built from Python dicts beside the code it describes: the limits come from the handlers'
constants, and the connector settings' schema is derived from
:class:`~connector.settings.model.ConnectorSettingsSchema` (types, lengths, ranges, choices and
patterns), so a new setting or limit shows up here without a second copy. What the marshmallow
schema checks in functions (blank entries, ``object_type:metric`` pairs, the forwarding URL) is
written out in :data:`_SETTING_RULES`. ``tests/web/test_openapi.py`` checks that the document is
valid, that its routes are exactly the app's, and that real replies fit their schemas.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiohttp import web
from marshmallow import fields, validate

from connector.config import TRANSPORTS
from connector.ops.audit import AuditAction
from connector.settings.model import MASK, SECRET_FIELDS, ConnectorSettingsSchema
from connector.web.api import (
    DEFAULT_EVENTS_PAGE,
    DEFAULT_HISTORY_PAGE,
    MAX_EVENTS_PAGE,
    MAX_HISTORY_PAGE,
    MAX_USERS_LISTED,
    RECENT_EVENTS,
)
from connector.web.webhook import MAX_WEBHOOK_BYTES

PATH = "/api/openapi.json"
MAX_QUERY_INTEGER = 2**63 - 1
"""What a BIGINT column can be compared with: the bound of ``after`` and ``limit``."""

JSON = "application/json"

DESCRIPTION = """\
The HTTP surface of the self-hosted Customer.io connector: the admin API (`/api/*`), the
platform's endpoints (`/smart-notifier`, `/batch`), Customer.io's reporting-webhook receiver
(`/webhook`) and the probes (`/healthz`, `/readyz`, `/status`, `/metrics`).

The settings page (`/admin`, `/admin/login`, `/admin/logout` and the page's form posts under
`/admin/*`), its static files (`/static/admin/*`) and `/` (a redirect to the page) are HTML
for a browser and are not described here.

Every error is JSON `{"error": "…"}` (the settings PATCH's validation errors are
`{"errors": {field: [message]}}`). Any route answers `404` when unknown, `405` with `Allow` for
another method, and `400` for a URL holding a NUL character (`%00`).

A `POST`, `PATCH`, `PUT` or `DELETE` to `/api/*` with a cross-site `Origin` header is a `403`,
whatever the credentials. Wrong HTTP Basic passwords count towards the login throttle: after 5
from one address within 15 minutes, that address gets `429` with `Retry-After`.
"""

_SETTING_NOTES: dict[str, str] = {
    "site_id": "Track API site id.",
    "api_key": "Track API key.",
    "region": "Customer.io's data centre.",
    "user_id_mapping": "The user attribute sent as the Customer.io customer id.",
    "synchronized_segments": "Segment ids; a user is sent only while in one of them.",
    "synchronized_attributes": (
        "Attributes sent besides `email`, `created_at`, `hull_segments` (and `anonymous_id`)."
    ),
    "enable_user_deletion": "Delete users who left every whitelisted segment.",
    "events_filter": "Event names to send; `page` sends page views.",
    "anonymous_events": (
        "Send whitelisted events of users without a customer id as anonymous events."
    ),
    "max_attributes_per_call": "Attributes per identify call; more are split over several calls.",
    "webhook_signing_key": "Key of the reporting webhooks' `X-CIO-Signature`; empty: unsigned.",
    "webhook_timestamp_tolerance_seconds": "How far `X-CIO-Timestamp` may be from now.",
    "incoming_metrics": (
        "`object_type:metric` pairs (e.g. `email:opened`) that become tracked events; "
        "`null`: all of them."
    ),
    "forward_url": "A Segment-compatible destination for tracked events; empty: none.",
    "forward_write_key": "The destination's write key.",
    "forward_event_prefix": "Put before the names of forwarded events.",
}

_NON_BLANK = {"items": {"pattern": r"\S"}}
_SETTING_RULES: dict[str, dict[str, Any]] = {
    "synchronized_segments": _NON_BLANK,
    "synchronized_attributes": _NON_BLANK,
    "events_filter": _NON_BLANK,
    "incoming_metrics": {"items": {"pattern": r"^[a-z_]+:[a-z_]+$"}},
    "forward_url": {"pattern": r"^(?:$|https?://[^\s/]+)"},
}


def _field_schema(field: fields.Field) -> dict[str, Any]:
    """A marshmallow field as JSON Schema: its type and its declarative validators."""
    schema: dict[str, Any]
    if isinstance(field, fields.List):
        schema = {"type": "array", "items": _field_schema(field.inner)}
    elif isinstance(field, fields.Boolean):
        schema = {"type": "boolean"}
    elif isinstance(field, fields.Integer):
        schema = {"type": "integer"}
    elif isinstance(field, fields.String):
        schema = {"type": "string"}
    else:
        raise TypeError(f"no JSON Schema for a {type(field).__name__} setting")
    for rule in field.validators:
        if isinstance(rule, validate.Length):
            bounds = (
                ("minItems", "maxItems")
                if schema["type"] == "array"
                else ("minLength", "maxLength")
            )
            for key, value in zip(bounds, (rule.min, rule.max), strict=True):
                if value is not None:
                    schema[key] = value
        elif isinstance(rule, validate.Range):
            if rule.min is not None:
                schema["minimum" if rule.min_inclusive else "exclusiveMinimum"] = rule.min
            if rule.max is not None:
                schema["maximum" if rule.max_inclusive else "exclusiveMaximum"] = rule.max
        elif isinstance(rule, validate.OneOf):
            schema["enum"] = list(rule.choices)
        elif isinstance(rule, validate.Regexp):
            schema["pattern"] = rule.regex.pattern
    if field.allow_none:
        schema["type"] = [schema["type"], "null"]
    return schema


def _setting_schemas() -> dict[str, dict[str, Any]]:
    properties: dict[str, dict[str, Any]] = {}
    for name, field in ConnectorSettingsSchema().fields.items():
        schema = _field_schema(field)
        for key, value in _SETTING_RULES.get(name, {}).items():
            if isinstance(value, dict):
                schema[key] = {**schema[key], **value}
            else:
                schema[key] = value
        note = _SETTING_NOTES[name]
        if name in SECRET_FIELDS:
            note += (
                f" Secret: reads as `{MASK}` when set; sending `{MASK}` back leaves it as it is,"
                ' `""` clears it.'
            )
        properties[name] = {"description": note, **schema}
    return properties


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return _json(description, _ref("Error"), **extra)


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


_TIME = {"type": "string", "format": "date-time"}
_OPTIONAL_TIME = _nullable("string", format="date-time")
_COUNT = {"type": "integer", "minimum": 0}
_SYNC_TRANSPORT = {
    "type": "object",
    "properties": {
        "transport": {"enum": list(TRANSPORTS)},
        "batch_max_bytes": {"type": "integer"},
        "batch_max_operations": {"type": "integer"},
    },
    "required": ["transport", "batch_max_bytes", "batch_max_operations"],
    "additionalProperties": False,
    "readOnly": True,
    "description": (
        "How the sync talks to the Track API (`[sync]` of the configuration file, read-only "
        "here: a PATCH may send it back unchanged, any other value is a 400)."
    ),
}
_USERS_PER_REQUEST = _nullable(
    "number",
    minimum=0,
    description="Users in one `/api/v2/batch` request on average; null without any.",
)


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object whose properties are all present."""
    return {"type": "object", "required": list(properties), "properties": properties, **extra}


def _schemas() -> dict[str, Any]:
    settings = _setting_schemas()
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Settings": _object(
            {**settings, "sync": _SYNC_TRANSPORT},
            additionalProperties=False,
            description="Every connector setting, secrets masked.",
        ),
        "SettingsPatch": {
            "type": "object",
            "properties": {**settings, "sync": _SYNC_TRANSPORT},
            "additionalProperties": False,
            "description": (
                "Any subset of the settings; all are validated at once, and nothing is saved "
                "when any is wrong. Text must be valid Unicode without NUL characters."
            ),
        },
        "SettingsErrors": _object(
            {
                "errors": {
                    "type": "object",
                    "description": (
                        "Messages by setting (`_schema` for the body as a whole); a list "
                        "setting's bad entries are an object of messages by position."
                    ),
                    "additionalProperties": {"type": ["array", "object"]},
                    "minProperties": 1,
                }
            }
        ),
        "SyncStarted": _object({"started": {"const": True}}),
        "SyncSummary": _object(
            {
                **{
                    name: _COUNT
                    for name in (
                        "sent",
                        "skipped",
                        "deleted",
                        "failed",
                        "retrying",
                        "held",
                        "events_sent",
                        "api_calls",
                    )
                },
                "users_per_request": _USERS_PER_REQUEST,
                "error": _nullable("string", description="Why the pass stopped, if it did."),
            },
            description="What the pass did: users by outcome, events sent, Track API calls.",
        ),
        "Quarantined": _object(
            {"count": _COUNT, "reason": _nullable("string", description="The latest one's.")}
        ),
        "Quarantine": _object(
            {name: _ref("Quarantined") for name in ("users", "webhooks", "forwarding")}
        ),
        "Retried": _object(
            {
                "retried": _object(
                    {name: _COUNT for name in ("users", "webhooks", "forwarding")},
                    description="How many of each kind became pending again.",
                )
            }
        ),
        "Run": _object(
            {
                "id": {"type": "integer"},
                "trigger": {"enum": ["schedule", "notification", "api", "page", "cli"]},
                "full": {"type": "boolean"},
                "instance": {"type": "string"},
                "started_at": _TIME,
                "finished_at": _OPTIONAL_TIME,
                **{
                    name: _COUNT
                    for name in (
                        "sent",
                        "skipped",
                        "deleted",
                        "held",
                        "failed",
                        "retrying",
                        "events",
                        "requests",
                    )
                },
                "transport": {"enum": list(TRANSPORTS), "description": "`sync.transport`."},
                "users_per_request": _USERS_PER_REQUEST,
                "error": _nullable("string", description="Why the pass stopped, if it did."),
                "errors": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "The first few distinct reasons users failed or retry.",
                },
            },
            description=(
                "One pass: who started it, when, users by outcome (`held`: deletions waiting "
                "for a confirmation), events sent and Track API requests."
            ),
        ),
        "Runs": _object({"runs": {"type": "array", "items": _ref("Run")}}),
        "AuditEntry": _object(
            {
                "id": {"type": "integer"},
                "at": _TIME,
                "action": {"enum": [action.value for action in AuditAction]},
                "detail": {
                    "type": "object",
                    "description": (
                        "What was done; a settings change lists its `fields`, a secret only as "
                        '`"changed"`.'
                    ),
                },
                "source": {
                    "type": "string",
                    "description": "The client's address, or `cli`.",
                },
            }
        ),
        "AuditLog": _object({"entries": {"type": "array", "items": _ref("AuditEntry")}}),
        "HeldDeletion": _object(
            {
                "id": {"type": "string", "description": "The platform's `user.id`."},
                "external_id": _nullable("string"),
                "email": _nullable("string"),
                "customer_id": _nullable("string", description="The Customer.io id deleted."),
                "reason": _nullable("string"),
                "held_at": _OPTIONAL_TIME,
            }
        ),
        "HeldDeletions": _object(
            {
                "count": _COUNT,
                "users": {"type": "array", "items": _ref("HeldDeletion")},
            },
            description="Deletions held by `sync.max_deletions_per_pass` (the first 1,000).",
        ),
        "ConfirmDeletions": {
            "type": "object",
            "properties": {"user_ids": {"type": "array", "items": {"type": "string"}}},
            "description": "Only these users' held deletions; all of them without it.",
        },
        "ConfirmedDeletions": _object(
            {"confirmed": _COUNT, "user_ids": {"type": "array", "items": {"type": "string"}}}
        ),
        "Segment": _object({"id": {"type": "string"}, "name": {"type": "string"}}),
        "User": _object(
            {
                "id": {"type": "string", "description": "The platform's `user.id`."},
                "external_id": _nullable("string"),
                "email": _nullable("string"),
                "anonymous_ids": {"type": "array", "items": {"type": "string"}},
                "segments": {"type": "array", "items": _ref("Segment")},
                "attributes": {"type": "object"},
                "account": {"type": "object"},
                "sync": _object(
                    {
                        "status": {
                            "type": "string",
                            "description": "e.g. `new`, `pending`, `skipped`, `failed`.",
                        },
                        "pending": {"type": "boolean"},
                        "attempts": _COUNT,
                        "next_attempt_at": _OPTIONAL_TIME,
                        "skip_reason": _nullable("string"),
                        "attribute_errors": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                    }
                ),
                "customerio": _object(
                    {
                        "id": _nullable("string", description="The customer id sent."),
                        "created_at": _OPTIONAL_TIME,
                        "synced_at": _OPTIONAL_TIME,
                        "deleted_at": _OPTIONAL_TIME,
                        "hash": _nullable("string"),
                        "cio_id": _nullable(
                            "string", description="Customer.io's own id, from webhooks."
                        ),
                        "last_error": _nullable("string"),
                        "sent_attributes": {
                            "type": "object",
                            "description": "The attributes Customer.io accepted, as last sent.",
                        },
                    }
                ),
                "updated_at": _OPTIONAL_TIME,
            }
        ),
        "UserEvent": _object(
            {
                "event_id": {"type": "string"},
                "name": {"type": "string"},
                "occurred_at": _OPTIONAL_TIME,
                "status": {"type": "string", "description": "e.g. `pending`, `sent`, `failed`."},
                "reason": _nullable("string"),
                "sent_at": _OPTIONAL_TIME,
            },
            description="An event the platform sent for the user, and what became of it.",
        ),
        "TrackedEvent": _object(
            {
                "id": {"type": "integer", "description": "The cursor of `GET /api/events`."},
                "event_id": {"type": "string"},
                "user_id": _nullable("string", description="`null`: unmatched."),
                "name": {"type": "string", "examples": ["Email Delivered"]},
                "object_type": {"type": "string"},
                "metric": {"type": "string"},
                "properties": {"type": "object"},
                "context": {"type": "object"},
                "occurred_at": _TIME,
                "received_at": _TIME,
            },
            description="An event Customer.io reported.",
        ),
        "UserDetail": {
            "allOf": [
                _ref("User"),
                _object(
                    {
                        "events": {
                            "type": "array",
                            "items": _ref("UserEvent"),
                            "maxItems": RECENT_EVENTS,
                        },
                        "tracked_events": {
                            "type": "array",
                            "items": _ref("TrackedEvent"),
                            "maxItems": RECENT_EVENTS,
                        },
                    }
                ),
            ],
            "description": f"The user, with its {RECENT_EVENTS} most recent events of each kind.",
        },
        "Users": _object(
            {"users": {"type": "array", "items": _ref("User"), "maxItems": MAX_USERS_LISTED}}
        ),
        "EventPage": _object(
            {
                "events": {"type": "array", "items": _ref("TrackedEvent")},
                "next": _nullable(
                    "integer", description="Pass as `after` for the next page; `null`: the last."
                ),
            }
        ),
        "InboundStats": _object(
            {
                "deliveries": {
                    "type": "object",
                    "description": "Webhook deliveries by status.",
                    "additionalProperties": _COUNT,
                },
                "events": {
                    "type": "object",
                    "description": "Tracked events by name.",
                    "additionalProperties": _COUNT,
                },
                "unmatched": _COUNT,
                "last_received_at": _OPTIONAL_TIME,
            }
        ),
        "Catalog": _object(
            {
                "segments": {"type": "array", "items": _ref("Segment")},
                "attributes": {"type": "array", "items": {"type": "string"}},
                "events": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Always holds `page`, which turns on page views.",
                },
            }
        ),
        "WebhookURL": _object(
            {"url": {"type": "string", "description": "`<public_url>/webhook?conf=<token>`."}}
        ),
        "Status": _object(
            {
                "status": {"enum": ["ok", "warning", "error"]},
                "messages": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "Notification": {
            "type": "object",
            "required": ["messages"],
            "properties": {
                "notification_id": {"type": "string"},
                "channel": {"type": "string", "examples": ["user:update"]},
                "messages": {"type": "array", "items": _ref("NotificationMessage")},
            },
            "description": (
                "A Hull-style notification. A message that does not fit is rejected by its "
                "index in the reply; the others are stored."
            ),
        },
        "NotificationMessage": {
            "type": "object",
            "required": ["user"],
            "properties": {
                "user": _ref("PlatformUser"),
                "segments": {
                    "type": "array",
                    "items": {"anyOf": [_ref("Segment"), {"type": "string"}]},
                },
                "account": {"type": "object"},
                "changes": {"type": "object"},
                "events": {"type": "array", "items": _ref("PlatformEvent")},
            },
        },
        "PlatformUser": {
            "type": "object",
            "anyOf": [{"required": [key]} for key in ("id", "external_id", "email")],
            "properties": {
                "id": {"type": "string"},
                "external_id": {"type": "string"},
                "email": {"type": "string"},
                "anonymous_ids": {"type": "array", "items": {"type": "string"}},
                "created_at": {"type": "string"},
                "indexed_at": {
                    "type": "string",
                    "description": "Of several messages for one user, the latest wins.",
                },
            },
            "additionalProperties": True,
            "description": "Attributes; keys beginning `traits_` are stored without the prefix.",
        },
        "PlatformEvent": {
            "type": "object",
            "required": ["event"],
            "properties": {
                "event_id": {
                    "type": "string",
                    "description": "Derived from the event's content when missing.",
                },
                "event": {"type": "string"},
                "properties": {"type": "object"},
                "context": {"type": "object"},
                "created_at": {"type": "string"},
            },
        },
        "NotificationReply": _object(
            {
                "accepted": _COUNT,
                "rejected": {
                    "type": "array",
                    "items": _object({"index": _COUNT, "error": {"type": "string"}}),
                },
                "flow_control": _object({"type": {"const": "next"}}),
            }
        ),
        "ReportingWebhook": {
            "type": "object",
            "properties": {
                "event_id": {"type": ["string", "integer"]},
                "object_type": {"type": "string", "examples": ["email", "push", "customer"]},
                "metric": {"type": "string", "examples": ["delivered", "opened", "clicked"]},
                "event_type": {
                    "type": "string",
                    "description": "The legacy format's `<object_type>_<metric>`.",
                    "examples": ["email_opened"],
                },
                "timestamp": {
                    "type": ["integer", "string"],
                    "description": "Unix time (seconds or milliseconds), or a numeric string.",
                },
                "data": {
                    "type": "object",
                    "properties": {
                        "identifiers": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "email": {"type": "string"},
                                "cio_id": {"type": "string"},
                            },
                        },
                        "customer_id": {"type": "string"},
                        "email_address": {"type": "string"},
                        "recipient": {"type": "string"},
                    },
                },
            },
            "description": (
                "One Customer.io reporting webhook: `{event_id, object_type, metric, timestamp, "
                "data}`, or the legacy email-activity format with `event_type`. Any JSON object "
                "is stored and acknowledged; what cannot be mapped is set aside later."
            ),
        },
        "WebhookReply": {
            "type": "object",
            "required": ["ok"],
            "properties": {
                "ok": {"const": True},
                "duplicate": {
                    "const": True,
                    "description": "An `event_id` seen before: nothing new stored.",
                },
            },
        },
    }


_ADMIN_READ = [{"admin": []}, {"session": []}]
_ADMIN_CHANGE = [{"admin": []}, {"session": [], "csrf": []}]


def _admin(
    summary: str,
    ok: dict[str, Any],
    *,
    changes: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    responses: dict[str, Any] = {**ok, **extra.pop("responses", {})}
    responses["401"] = {"$ref": "#/components/responses/AdminRequired"}
    if changes:
        responses["403"] = _error(
            "A cross-site `Origin`, or a session call without the CSRF token."
        )
    responses["429"] = {"$ref": "#/components/responses/Throttled"}
    return {
        "tags": ["admin"],
        "summary": summary,
        "security": _ADMIN_CHANGE if changes else _ADMIN_READ,
        **extra,
        "responses": responses,
    }


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _probe(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"tags": ["probes"], "summary": summary, "security": [], "responses": responses}


def _ingest(summary: str, description: str) -> dict[str, Any]:
    return {
        "tags": ["platform"],
        "summary": summary,
        "description": description,
        "security": [{"ingest": []}],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _ref("Notification"), "examples": _NOTIFICATION}},
        },
        "responses": {
            "200": _json(
                "Every accepted message is committed; the others are rejected by index.",
                _ref("NotificationReply"),
            ),
            "400": _error("Not a JSON object with a `messages` list, or JSON not accepted."),
            "401": _error("Missing or wrong ingest token."),
            "413": _error("Over 10 MiB."),
        },
    }


_NOTIFICATION = {
    "spec": {
        "summary": "A notification as Hull writes it",
        "value": {
            "notification_id": "n-1",
            "channel": "user:update",
            "messages": [
                {
                    "user": {
                        "id": "5a1f",
                        "external_id": "u-42",
                        "email": "ana@example.com",
                        "anonymous_ids": ["anon-7"],
                        "created_at": "2018-03-30T14:38:02Z",
                        "indexed_at": "2018-03-30T14:38:05Z",
                        "first_name": "Ana",
                        "traits_salesforce_lead/title": "CTO",
                    },
                    "segments": [{"id": "seg-paying", "name": "Paying customers"}],
                    "account": {"clearbit/name": "Acme"},
                    "changes": {"user": {"first_name": [None, "Ana"]}},
                    "events": [
                        {
                            "event_id": "ev-1",
                            "event": "Signed Up",
                            "properties": {"plan": "pro"},
                            "context": {},
                            "created_at": "2018-03-30 14:38:02 UTC",
                        }
                    ],
                }
            ],
        },
    }
}

_WEBHOOKS = {
    "reporting": {
        "summary": "The reporting format",
        "value": {
            "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQJ",
            "object_type": "email",
            "metric": "opened",
            "timestamp": 1613063089,
            "data": {"identifiers": {"id": "u-42", "email": "ana@example.com"}},
        },
    },
    "legacy": {
        "summary": "The legacy email-activity format",
        "value": {
            "event_type": "email_opened",
            "event_id": "abc123",
            "timestamp": 1613063089,
            "data": {"customer_id": "u-42", "email_address": "ana@example.com"},
        },
    },
}


def _paths() -> dict[str, Any]:
    flag = "`1`, `true` or `yes` (any case) turns it on."
    counter = {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_INTEGER}
    bad_query = _error("`after` or `limit` is not a whole number from 0 to 2^63 - 1.")
    bad_limit = _error("`limit` is not a whole number from 1 to 2^63 - 1.")
    history_limit = _query(
        "limit",
        f"How many; more than {MAX_HISTORY_PAGE} counts as {MAX_HISTORY_PAGE}.",
        {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_QUERY_INTEGER,
            "default": DEFAULT_HISTORY_PAGE,
        },
    )
    return {
        "/healthz": {
            "get": _probe(
                "Liveness", {"200": _json("Alive.", _object({"status": {"const": "ok"}}))}
            )
        },
        "/readyz": {
            "get": _probe(
                "Readiness: the database is reachable",
                {
                    "200": _json("Ready.", _object({"status": {"const": "ready"}})),
                    "503": _error("The database is unreachable."),
                },
            )
        },
        "/status": {
            "get": _probe(
                "The service's health as an operator sees it (no secrets)",
                {"200": _json("The status and why.", _ref("Status"))},
            )
        },
        "/metrics": {
            "get": _probe(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus' text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/smart-notifier": {
            "post": _ingest(
                "Platform notifications",
                "Users and their events; the segment whitelist applies.",
            )
        },
        "/batch": {
            "post": _ingest(
                "Send these users now",
                "The same messages, with no segment filter; never deletes.",
            )
        },
        "/webhook": {
            "post": {
                "tags": ["webhook"],
                "summary": "Customer.io reporting webhooks",
                "description": (
                    "One event per request; the raw body is committed before the `200`. When a "
                    "signing key is set, `X-CIO-Signature` must be the lowercase hex "
                    "HMAC-SHA256 of `v0:<X-CIO-Timestamp>:<body>`, and the timestamp within "
                    "`webhook_timestamp_tolerance_seconds` of now."
                ),
                "security": [{"webhookToken": []}],
                "parameters": [
                    {
                        "name": "X-CIO-Signature",
                        "in": "header",
                        "required": False,
                        "description": "Required when `webhook_signing_key` is set.",
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    },
                    {
                        "name": "X-CIO-Timestamp",
                        "in": "header",
                        "required": False,
                        "description": "Unix seconds; required when a signing key is set.",
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("ReportingWebhook"), "examples": _WEBHOOKS}},
                },
                "responses": {
                    "200": _json("Stored (or seen before).", _ref("WebhookReply")),
                    "400": _error("Malformed JSON, JSON not accepted, or not an object."),
                    "401": _error("Missing or wrong token or signature, or a stale timestamp."),
                    "413": _error(f"Over {MAX_WEBHOOK_BYTES} bytes."),
                },
            }
        },
        PATH: {
            "get": {
                "tags": ["meta"],
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("The OpenAPI 3.1 document.", {"type": "object"})},
            }
        },
        "/api/settings": {
            "get": _admin(
                "Connector settings",
                {"200": _json("The settings, secrets masked.", _ref("Settings"))},
            ),
            "patch": _admin(
                "Change connector settings",
                {"200": _json("The settings after the change.", _ref("Settings"))},
                changes=True,
                requestBody={
                    "required": True,
                    "content": {JSON: {"schema": _ref("SettingsPatch")}},
                },
                responses={
                    "400": {
                        "description": "Nothing saved: bad settings, or a body that is not JSON.",
                        "content": {
                            JSON: {"schema": {"oneOf": [_ref("SettingsErrors"), _ref("Error")]}}
                        },
                    }
                },
            ),
        },
        "/api/sync": {
            "post": _admin(
                "Start an outbound sync now (also when `sync.scheduled` is off)",
                {
                    "200": _json("With `wait`: the pass ran.", _ref("SyncSummary")),
                    "202": _json("The pass starts within about a second.", _ref("SyncStarted")),
                },
                changes=True,
                parameters=[
                    _query("wait", f"Run the pass and answer its counts; {flag}"),
                    _query("full", f"Send every user in full; {flag}"),
                ],
            )
        },
        "/api/quarantine": {
            "get": _admin(
                "What the pipelines set aside",
                {"200": _json("Counts and the latest reason.", _ref("Quarantine"))},
            )
        },
        "/api/retry-failed": {
            "post": _admin(
                "Make failed users, invalid webhooks and failed forwarded events pending again",
                {"200": _json("How many of each.", _ref("Retried"))},
                changes=True,
            )
        },
        "/api/runs": {
            "get": _admin(
                "The run history (the newest 1,000 passes are kept), newest first",
                {"200": _json("The passes.", _ref("Runs"))},
                parameters=[history_limit],
                responses={"400": bad_limit},
            )
        },
        "/api/audit": {
            "get": _admin(
                "The audit log, newest first",
                {"200": _json("The entries.", _ref("AuditLog"))},
                parameters=[history_limit],
                responses={"400": bad_limit},
            )
        },
        "/api/deletions": {
            "get": _admin(
                "Deletions held by the deletion guard, waiting for a confirmation",
                {"200": _json("The held deletions.", _ref("HeldDeletions"))},
            )
        },
        "/api/deletions/confirm": {
            "post": _admin(
                "Confirm the held deletions: the next pass (started now) sends them",
                {"200": _json("The users confirmed.", _ref("ConfirmedDeletions"))},
                changes=True,
                requestBody={
                    "required": False,
                    "content": {JSON: {"schema": _ref("ConfirmDeletions")}},
                },
                responses={"400": _error("The body is not as described.")},
            )
        },
        "/api/users": {
            "get": _admin(
                f"Find users (up to {MAX_USERS_LISTED}, by id)",
                {"200": _json("The users that match every given filter.", _ref("Users"))},
                parameters=[
                    _query(
                        "q",
                        "The platform id, external id, customer id (sent, or by "
                        "`user_id_mapping`), Customer.io `cio_id`, or email "
                        "(case-insensitively) of the user: the settings page's search.",
                    ),
                    _query("email", "Exactly this email."),
                    _query("external_id", "Exactly this external id."),
                    _query("status", "This sync status (`sync.status`)."),
                ],
            )
        },
        "/api/users/{user_id}": {
            "get": _admin(
                "A user, what was sent and when, and its recent events",
                {"200": _json("The user.", _ref("UserDetail"))},
                parameters=[
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "description": "The platform's `user.id`.",
                        "schema": {"type": "string"},
                    }
                ],
                responses={"404": _error("No such user.")},
            )
        },
        "/api/events": {
            "get": _admin(
                "Tracked inbound events, oldest first",
                {"200": _json("A page of events.", _ref("EventPage"))},
                parameters=[
                    _query("user_id", "Only this user's."),
                    _query("name", "Only events of this name."),
                    _query(
                        "after",
                        "The previous page's `next`.",
                        {**counter, "default": 0},
                    ),
                    _query(
                        "limit",
                        f"Events per page; more than {MAX_EVENTS_PAGE} counts as "
                        f"{MAX_EVENTS_PAGE}.",
                        {**counter, "default": DEFAULT_EVENTS_PAGE},
                    ),
                ],
                responses={"400": bad_query},
            )
        },
        "/api/inbound/stats": {
            "get": _admin(
                "Webhooks by delivery status, tracked events by name, unmatched, last arrival",
                {"200": _json("The counts.", _ref("InboundStats"))},
            )
        },
        "/api/catalog": {
            "get": _admin(
                "Segments, attribute names and event names the platform has sent",
                {"200": _json("The catalog.", _ref("Catalog"))},
            )
        },
        "/api/webhook-url": {
            "get": _admin(
                "The URL to paste into Customer.io",
                {"200": _json("The URL with its token.", _ref("WebhookURL"))},
            )
        },
        "/api/webhook-url/rotate": {
            "post": _admin(
                "A new webhook token (the old one stops working)",
                {"200": _json("The new URL.", _ref("WebhookURL"))},
                changes=True,
            )
        },
    }


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a new dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Customer.io connector",
            "version": metadata.version("customerio-connector"),
            "description": DESCRIPTION,
        },
        "tags": [
            {"name": "probes", "description": "Unauthenticated health and metrics."},
            {"name": "platform", "description": "Notifications from the platform."},
            {"name": "webhook", "description": "Customer.io's reporting webhooks."},
            {"name": "admin", "description": "The admin API."},
            {"name": "meta", "description": "This document."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": {
                "AdminRequired": _error(
                    "Missing or wrong admin credentials.",
                    headers={
                        "WWW-Authenticate": {
                            "description": '`Basic realm="connector"`',
                            "schema": {"type": "string"},
                        }
                    },
                ),
                "Throttled": _error(
                    "Too many wrong passwords from this address (even the right one is refused).",
                    headers={
                        "Retry-After": {
                            "description": "Seconds until the oldest failure is 15 minutes old.",
                            "schema": {"type": "integer"},
                        }
                    },
                ),
            },
            "securitySchemes": {
                "admin": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "User `admin`, password `security.admin_password`.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "connector_session",
                    "description": "The settings page's session (log in at `/admin/login`).",
                },
                "csrf": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-CSRF-Token",
                    "description": "The page's CSRF token; with the session, calls that change "
                    "something (`POST`, `PATCH`) must send it.",
                },
                "ingest": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`security.ingest_token` (generated on first start if unset).",
                },
                "webhookToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "conf",
                    "description": "The token of the webhook URL (`GET /api/webhook-url`).",
                },
            },
        },
    }


class OpenAPIDocument:
    """Serves :func:`build_document`, built once: it holds no secrets and no state."""

    def __init__(self) -> None:
        self._document = build_document()

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self._document)


def setup_openapi(app: web.Application) -> None:
    app.router.add_get(PATH, OpenAPIDocument().get)
