"""``GET /api/openapi.json``: a valid OpenAPI 3.1 document whose routes are exactly the app's,
whose schemas the service's real replies fit, and whose settings schema refuses what the
service refuses."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from connector.settings.model import ConnectorSettings, ConnectorSettingsSchema
from connector.web.openapi import build_document

from ..conftest import ADMIN, ADMIN_PASSWORD, INGEST, INGEST_TOKEN

BASE = "urn:connector-openapi"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The settings page's HTML routes, which the document says it leaves out.
PAGE_PREFIX = "/admin"

NOTIFICATION = {
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
            },
            "segments": [{"id": "seg-paying", "name": "Paying customers"}],
            "events": [
                {
                    "event_id": "ev-1",
                    "event": "Signed Up",
                    "properties": {"plan": "pro"},
                    "created_at": "2018-03-30 14:38:02 UTC",
                }
            ],
        },
        {"user": {"first_name": "nobody"}},
    ],
}
WEBHOOK = {
    "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQJ",
    "object_type": "email",
    "metric": "opened",
    "timestamp": 1613063089,
    "data": {"identifiers": {"id": "u-42", "email": "ana@example.com"}},
}

# One setting at a time: the service and the document's SettingsPatch agree on each.
GOOD_PATCHES = [
    {"site_id": "s" * 200},
    {"region": "eu"},
    {"user_id_mapping": "email"},
    {"synchronized_segments": ["seg-paying", "seg-trial"]},
    {"events_filter": ["Signed Up", "page"]},
    {"enable_user_deletion": True},
    {"max_attributes_per_call": 300},
    {"webhook_timestamp_tolerance_seconds": 86400},
    {"incoming_metrics": None},
    {"incoming_metrics": ["email:opened", "push:delivered"]},
    {"forward_url": ""},
    {"forward_url": "https://events.example.com/v1"},
    {"forward_event_prefix": "p" * 100},
]
BAD_PATCHES = [
    {"site_id": "s" * 201},
    {"region": "mars"},
    {"user_id_mapping": "two words"},
    {"synchronized_segments": "seg-paying"},
    {"synchronized_attributes": ["email", " "]},
    {"events_filter": ["Signed Up", ""]},
    {"enable_user_deletion": "sometimes"},
    {"max_attributes_per_call": 0},
    {"max_attributes_per_call": 301},
    {"webhook_timestamp_tolerance_seconds": 0},
    {"webhook_signing_key": "k" * 501},
    {"incoming_metrics": ["email-opened"]},
    {"forward_url": "ftp://example.com"},
    {"forward_write_key": "k" * 501},
    {"forward_event_prefix": "p" * 101},
    {"no_such_setting": 1},
]


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


class Document:
    """The served document, and validators of its schemas (``$ref``s resolved in it)."""

    def __init__(self, document: dict[str, Any]):
        self.data = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(BASE, resource)

    def validator(self, pointer: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": BASE + pointer}, registry=self._registry)

    def schema_pointer(self, path: str, method: str, status: int) -> str:
        """Where the JSON schema of this reply is; fails when the document does not declare it."""
        responses = self.data["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {path} {status} is not documented"
        where = ("paths", path, method, "responses", str(status))
        response = responses[str(status)]
        if "$ref" in response:
            where = tuple(response["$ref"].removeprefix("#/").split("/"))
        return _pointer(*where, "content", "application/json", "schema")

    def request_pointer(self, path: str, method: str) -> str:
        return _pointer(
            "paths", path, method, "requestBody", "content", "application/json", "schema"
        )

    async def check(self, resp, path: str, method: str, status: int) -> Any:
        """The reply's JSON, once it has the expected status and fits its documented schema."""
        assert resp.status == status, f"{method.upper()} {path}: {resp.status} {await resp.text()}"
        body = await resp.json()
        errors = list(self.validator(self.schema_pointer(path, method, status)).iter_errors(body))
        assert not errors, f"{method.upper()} {path} {status}: {[e.message for e in errors]}"
        return body


async def served_document(client) -> Document:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return Document(await resp.json())


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(path, method) of every route, less aiohttp's automatic HEADs and the page's HTML."""
    operations = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource):
            continue
        # The settings page, and "/" which only redirects to it.
        if path in ("/", PAGE_PREFIX) or path.startswith(f"{PAGE_PREFIX}/"):
            continue
        operations.add((path, route.method.lower()))
    return operations


def document_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


async def test_openapi_document_is_served_without_auth_and_is_valid_openapi_3_1(start_app):
    client = await start_app()
    document = await served_document(client)
    assert document.data["openapi"].startswith("3.1.")
    validate_openapi(document.data)


async def test_openapi_document_lists_exactly_the_apps_routes(start_app):
    client = await start_app()
    document = await served_document(client)
    in_app = app_operations(client.app)
    documented = document_operations(document.data)
    assert ("/api/users/{user_id}", "get") in in_app
    assert not in_app - documented, f"routes missing from the document: {in_app - documented}"
    assert not documented - in_app, f"documented but not routed: {documented - in_app}"


async def test_openapi_document_holds_no_secret_of_the_running_service(start_app, fake_cio):
    client = await start_app()
    text = await (await client.get("/api/openapi.json")).text()
    webhook_url = (await (await client.get("/api/webhook-url", headers=ADMIN)).json())["url"]
    token = webhook_url.partition("conf=")[2]
    for secret in (fake_cio.api_key, token, ADMIN_PASSWORD, INGEST_TOKEN):
        assert secret not in text


async def test_openapi_replies_fit_their_documented_schemas(start_app):
    client = await start_app()
    doc = await served_document(client)

    for path, status in (("/healthz", 200), ("/readyz", 200), ("/status", 200)):
        await doc.check(await client.get(path), path, "get", status)
    await doc.check(await client.get("/api/settings"), "/api/settings", "get", 401)

    settings = await doc.check(
        await client.get("/api/settings", headers=ADMIN), "/api/settings", "get", 200
    )
    assert set(settings) == set(doc.data["components"]["schemas"]["Settings"]["properties"])
    await doc.check(
        await client.patch("/api/settings", json={"region": "eu"}, headers=ADMIN),
        "/api/settings",
        "patch",
        200,
    )
    for bad in ({"region": "mars", "synchronized_segments": [1]}, [1, 2]):
        await doc.check(
            await client.patch("/api/settings", json=bad, headers=ADMIN),
            "/api/settings",
            "patch",
            400,
        )
    await doc.check(
        await client.patch("/api/settings", data=b"{not json", headers=ADMIN),
        "/api/settings",
        "patch",
        400,
    )

    reply = await doc.check(
        await client.post("/smart-notifier", json=NOTIFICATION, headers=INGEST),
        "/smart-notifier",
        "post",
        200,
    )
    assert reply["accepted"] == 1 and [r["index"] for r in reply["rejected"]] == [1]
    await doc.check(
        await client.post("/batch", json={"messages": "no"}, headers=INGEST), "/batch", "post", 400
    )

    for path, status in (
        ("/api/sync?wait=1", 200),
        ("/api/sync", 202),
        ("/api/retry-failed", 200),
    ):
        route = urlsplit(path).path
        await doc.check(await client.post(path, headers=ADMIN), route, "post", status)

    url = await doc.check(
        await client.get("/api/webhook-url", headers=ADMIN), "/api/webhook-url", "get", 200
    )
    webhook = "/webhook?" + urlsplit(url["url"]).query
    body = json.dumps(WEBHOOK).encode()
    for expected in ({"ok": True}, {"ok": True, "duplicate": True}):
        resp = await client.post(
            webhook, data=io.BytesIO(body), headers={"Content-Type": "application/json"}
        )
        assert await doc.check(resp, "/webhook", "post", 200) == expected
    await doc.check(await client.post("/webhook?conf=wrong", json=WEBHOOK), "/webhook", "post", 401)

    for path in ("/api/quarantine", "/api/inbound/stats", "/api/catalog", "/api/events"):
        await doc.check(await client.get(path, headers=ADMIN), path, "get", 200)
    await doc.check(
        await client.get("/api/events?limit=-1", headers=ADMIN), "/api/events", "get", 400
    )
    found = await doc.check(
        await client.get("/api/users?email=ana@example.com", headers=ADMIN),
        "/api/users",
        "get",
        200,
    )
    assert [user["id"] for user in found["users"]] == ["5a1f"]
    user = await doc.check(
        await client.get("/api/users/5a1f", headers=ADMIN), "/api/users/{user_id}", "get", 200
    )
    assert [event["event_id"] for event in user["events"]] == ["ev-1"]
    await doc.check(
        await client.get("/api/users/nobody", headers=ADMIN), "/api/users/{user_id}", "get", 404
    )
    await doc.check(
        await client.post("/api/webhook-url/rotate", headers=ADMIN),
        "/api/webhook-url/rotate",
        "post",
        200,
    )


def test_openapi_request_examples_fit_their_request_schemas():
    """The SPEC's example bodies (§4 notification, §6 reporting webhook) fit the documented
    request bodies, and so do the document's own examples."""
    doc = Document(build_document())
    for path in ("/smart-notifier", "/batch", "/webhook"):
        validator = doc.validator(doc.request_pointer(path, "post"))
        content = doc.data["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        for example in content["examples"].values():
            assert not list(validator.iter_errors(example["value"])), path
    assert doc.validator(doc.request_pointer("/webhook", "post")).is_valid(WEBHOOK)
    notifier = doc.validator(doc.request_pointer("/smart-notifier", "post"))
    assert notifier.is_valid({"messages": NOTIFICATION["messages"][:1]})
    assert not notifier.is_valid({"messages": NOTIFICATION["messages"]})
    assert not notifier.is_valid({"notification_id": "n-1"})


async def test_openapi_settings_schema_refuses_what_the_service_refuses(start_app):
    client = await start_app()
    doc = await served_document(client)
    schema = doc.validator(doc.request_pointer("/api/settings", "patch"))
    disagreements = []
    for patch in GOOD_PATCHES + BAD_PATCHES:
        resp = await client.patch("/api/settings", json=patch, headers=ADMIN)
        service_accepts = resp.status == 200
        if not service_accepts:
            assert resp.status == 400
            assert set((await resp.json())["errors"]) == set(patch)
        if service_accepts != schema.is_valid(patch) or service_accepts != (patch in GOOD_PATCHES):
            disagreements.append((patch, resp.status, schema.is_valid(patch)))
    assert not disagreements


def test_openapi_settings_schema_covers_every_setting():
    schemas = build_document()["components"]["schemas"]
    names = set(ConnectorSettingsSchema().fields)
    # Besides the settings, the read-only transport of the configuration file.
    assert set(schemas["SettingsPatch"]["properties"]) == names | {"sync"}
    assert set(schemas["Settings"]["required"]) == set(ConnectorSettings().masked()) | {"sync"}
    assert set(ConnectorSettings().masked()) == names


async def test_openapi_document_route_takes_only_get(start_app):
    client = await start_app()
    resp = await client.post("/api/openapi.json", headers=ADMIN)
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
