"""The fake Track API's v2 batch (``POST /api/v2/batch``) driven by the real ``customerio``.

The client is configured as ``connector/outbound/sender.py`` configures its own: the fake's
host and port, its test CA, no transport retries.
"""

import asyncio
import base64
import json
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from customerio import CustomerIO, CustomerIOException
from urllib3.util.retry import Retry

from .fake_customerio import MAX_BATCH_BYTES, MAX_OPERATION_BYTES, FakeCustomerIO

BATCH_PATH = "/api/v2/batch"
EVENT_ID = "01HZX3K6V4D2N8Q5R7T9W1Y3Z5"


def _identify(customer_id: str, **attributes: Any) -> dict[str, Any]:
    return {
        "type": "person",
        "identifiers": {"id": customer_id},
        "action": "identify",
        "attributes": attributes,
    }


def _event(customer_id: str, name: str, event_id: str, **attributes: Any) -> dict[str, Any]:
    return {
        "type": "person",
        "identifiers": {"id": customer_id},
        "action": "event",
        "name": name,
        "id": event_id,
        "timestamp": 1_700_000_000,
        "attributes": attributes,
    }


def _compact_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _event_of_size(customer_id: str, size: int) -> dict[str, Any]:
    """An event operation whose compact JSON is exactly ``size`` bytes."""
    operation = _event(customer_id, "big", EVENT_ID, blob="")
    operation["attributes"]["blob"] = "x" * (size - _compact_size(operation))
    assert _compact_size(operation) == size
    return operation


@pytest.fixture
def make_client(fake_cio: FakeCustomerIO) -> Iterator[Callable[..., CustomerIO]]:
    clients: list[CustomerIO] = []

    def build(api_key: str | None = None) -> CustomerIO:
        host, port = fake_cio.host.rsplit(":", 1)
        client = CustomerIO(
            site_id=fake_cio.site_id,
            api_key=fake_cio.api_key if api_key is None else api_key,
            host=host,
            port=int(port),
            retries=0,
            timeout=5,
        )
        session = client.http
        session.get_adapter(client.base_url).max_retries = Retry(0, read=False)
        session.verify = fake_cio.ca_file
        session.trust_env = False
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def batch(make_client) -> Callable[[list[dict[str, Any]]], Any]:
    """``CustomerIO.batch`` in a thread (the fake answers on this test's event loop)."""
    client = make_client()

    async def send(operations: list[dict[str, Any]]) -> requests.Response:
        return await asyncio.to_thread(client.batch, operations)

    return send


async def _refused(send: Callable[[list[dict[str, Any]]], Any], operations: list) -> str:
    """The package's error text for a batch answered with no 2xx."""
    try:
        await send(operations)
    except CustomerIOException as exc:
        return str(exc)
    raise AssertionError("the batch was accepted")


async def _status(send: Callable[[list[dict[str, Any]]], Any], operations: list) -> int:
    """The status of a batch's answer, 2xx or not."""
    try:
        return (await send(operations)).status_code
    except CustomerIOException as exc:
        return int(str(exc)[:3])


async def _raw(
    fake: FakeCustomerIO, method: str, path: str, body: bytes = b"", auth: bool = True
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if auth:
        token = base64.b64encode(f"{fake.site_id}:{fake.api_key}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"https://{fake.host}{path}",
            data=body,
            headers=headers,
            ssl=ssl.create_default_context(cafile=fake.ca_file),
        ) as response,
    ):
        return response.status, await response.json(content_type=None), dict(response.headers)


async def test_fake_customerio_batch_applies_operations_in_order(batch, fake_cio):
    fake_cio.customers["gone"] = {"a": 1}
    page = {
        "type": "person",
        "identifiers": {"id": "u1"},
        "action": "page",
        "name": "https://example.com/pricing",
        "id": "01HZX3K6V4D2N8Q5R7T9W1Y3Z6",
        "timestamp": 1_700_000_001,
        "attributes": {"referrer": "https://example.com/"},
    }
    delete = {"type": "person", "identifiers": {"id": "gone"}, "action": "delete"}

    response = await batch(
        [
            _identify("u1", email="ana@example.com", plan="pro"),
            _event("u1", "Signed Up", EVENT_ID, plan="pro"),
            page,
            _identify("u1", plan=None, seats=3),
            delete,
        ]
    )

    assert response.status_code == 200
    assert response.json() == {}
    assert fake_cio.customers == {"u1": {"email": "ana@example.com", "seats": 3}}
    assert fake_cio.deleted == ["gone"]
    assert [(e["customer_id"], e["type"], e["name"], e["id"]) for e in fake_cio.events] == [
        ("u1", "event", "Signed Up", EVENT_ID),
        ("u1", "page", "https://example.com/pricing", page["id"]),
    ]
    assert fake_cio.events[0]["data"] == {"plan": "pro"}
    assert fake_cio.events[0]["timestamp"] == 1_700_000_000
    assert fake_cio.events[1]["data"] == {"referrer": "https://example.com/"}
    (recorded,) = fake_cio.requests_for("POST", BATCH_PATH)
    assert recorded.auth_ok and recorded.status == 200
    assert [op["action"] for op in recorded.body["batch"]] == [
        "identify",
        "event",
        "page",
        "identify",
        "delete",
    ]
    assert fake_cio.stats()["operations"] == {"identify": 2, "event": 2, "delete": 1}


async def test_fake_customerio_batch_shares_the_workspace_with_v1(make_client, batch, fake_cio):
    client = make_client()
    await asyncio.to_thread(client.identify, id="u1", plan="pro")
    await asyncio.to_thread(client.track, "u1", "Signed Up", id=EVENT_ID)

    response = await batch([_identify("u1", seats=3), _event("u1", "Signed Up", EVENT_ID)])
    await asyncio.to_thread(client.delete, "u1")

    assert response.status_code == 200
    assert len(fake_cio.events) == 1
    assert fake_cio.customers == {}
    assert fake_cio.deleted == ["u1"]


async def test_fake_customerio_batch_identifies_by_email_and_cio_id(batch, fake_cio):
    response = await batch(
        [
            {
                "type": "person",
                "identifiers": {"email": "ana@example.com"},
                "action": "identify",
                "attributes": {"a": 1},
            },
            {
                "type": "person",
                "identifiers": {"cio_id": "a3000001"},
                "action": "identify",
                "attributes": {"b": 2},
            },
        ]
    )

    assert response.status_code == 200
    assert fake_cio.customers == {"ana@example.com": {"a": 1}, "cio_a3000001": {"b": 2}}


async def test_fake_customerio_batch_deduplicates_a_resent_event_id(batch, fake_cio):
    first = await batch([_event("u1", "Signed Up", EVENT_ID), _event("u1", "Signed Up", EVENT_ID)])
    second = await batch([_event("u1", "Signed Up", EVENT_ID)])

    assert (first.status_code, second.status_code) == (200, 200)
    assert len(fake_cio.events) == 1


@pytest.mark.parametrize(
    ("size", "refused"),
    [(MAX_OPERATION_BYTES, False), (MAX_OPERATION_BYTES + 1, True)],
)
async def test_fake_customerio_batch_refuses_an_operation_over_32kb_alone(
    batch, fake_cio, size, refused
):
    response = await batch([_identify("u1", a=1), _event_of_size("u2", size), _identify("u3")])

    if not refused:
        assert response.status_code == 200
        assert len(fake_cio.events) == 1
        return
    assert response.status_code == 207
    (error,) = response.json()["errors"]
    assert error["batch_index"] == 1
    assert error["reason"] == "too_large"
    assert str(MAX_OPERATION_BYTES) in error["message"]
    assert set(error) == {"batch_index", "reason", "field", "message"}
    assert fake_cio.customers == {"u1": {"a": 1}, "u3": {}}
    assert fake_cio.events == []


async def test_fake_customerio_batch_refuses_operations_of_chosen_customers(batch, fake_cio):
    fake_cio.refuse_operations(["u2"], times=2, reason="blocked", message="u2 is blocked")
    operations = [_identify("u1", a=1), _identify("u2", a=2), _event("u2", "e", EVENT_ID)]

    first = await batch(operations)
    second = await batch(operations)

    assert first.status_code == 207
    assert first.json() == {
        "errors": [
            {
                "batch_index": 1,
                "reason": "blocked",
                "field": "identifiers",
                "message": "u2 is blocked",
            },
            {
                "batch_index": 2,
                "reason": "blocked",
                "field": "identifiers",
                "message": "u2 is blocked",
            },
        ]
    }
    assert second.status_code == 200
    assert fake_cio.customers == {"u1": {"a": 1}, "u2": {"a": 2}}
    assert len(fake_cio.events) == 1
    assert fake_cio.stats()["operations"]["refused"] == 2


async def test_fake_customerio_batch_refuses_by_action_and_predicate(batch, fake_cio):
    fake_cio.refuse_operations(actions=["event"], predicate=lambda op: op["name"] == "bad")

    response = await batch(
        [_event("u1", "bad", EVENT_ID), _event("u1", "good", "01HZX3K6V4D2N8Q5R7T9W1Y3Z7")]
    )
    fake_cio.clear_refusals()
    again = await batch([_event("u1", "bad", EVENT_ID)])

    assert response.status_code == 207
    assert [e["batch_index"] for e in response.json()["errors"]] == [0]
    assert again.status_code == 200
    assert [e["name"] for e in fake_cio.events] == ["good", "bad"]


async def test_fake_customerio_batch_refusals_are_set_over_http(batch, fake_cio):
    rule = {"customer_ids": ["u2"], "actions": ["identify"], "reason": "nope"}
    status, _, _ = await _raw(fake_cio, "POST", "/__fake/refuse", json.dumps(rule).encode(), False)
    assert status == 200

    refused = await batch([_identify("u1"), _identify("u2"), _event("u2", "e", EVENT_ID)])
    status, _, _ = await _raw(fake_cio, "DELETE", "/__fake/refuse", auth=False)
    accepted = await batch([_identify("u2")])

    assert status == 200
    assert refused.status_code == 207
    assert [(e["batch_index"], e["reason"]) for e in refused.json()["errors"]] == [(1, "nope")]
    assert accepted.status_code == 200
    assert set(fake_cio.customers) == {"u1", "u2"}
    assert fake_cio.stats()["total"] == 2


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"batch": 1}', b'{"operations": []}', b'{"batch": {"type": "person"}}'],
)
async def test_fake_customerio_batch_malformed_body_is_400(fake_cio, body):
    status, answer, _ = await _raw(fake_cio, "POST", BATCH_PATH, body)

    assert status == 400
    (error,) = answer["errors"]
    assert set(error) == {"reason", "field", "message"}


async def test_fake_customerio_batch_other_methods_are_405(fake_cio):
    status, answer, _ = await _raw(fake_cio, "PUT", BATCH_PATH, b'{"batch": []}')

    assert status == 405
    assert answer["errors"][0]["message"] == "method not allowed"


async def test_fake_customerio_batch_over_500kb_is_400_with_nothing_applied(batch, fake_cio):
    operations = [_identify(f"u{n}", blob="x" * 900) for n in range(600)]

    error = await _refused(batch, operations)

    assert error.startswith("400: ")
    assert "smaller than 500000 bytes" in error
    assert fake_cio.customers == {}
    assert fake_cio.stats()["operations"] == {}


@pytest.mark.parametrize(("size", "status"), [(MAX_BATCH_BYTES - 1, 200), (MAX_BATCH_BYTES, 400)])
async def test_fake_customerio_batch_size_limit_is_on_the_raw_body(fake_cio, size, status):
    operations = [_identify(f"u{n}", blob="x" * 900) for n in range(400)]
    body = json.dumps({"batch": operations}).encode()
    body += b" " * (size - len(body))

    answer_status, _, _ = await _raw(fake_cio, "POST", BATCH_PATH, body)

    assert answer_status == status
    assert len(fake_cio.customers) == (400 if status == 200 else 0)


def _person(action: str, identifiers: Any = None, **fields: Any) -> dict[str, Any]:
    identifiers = {"id": "u"} if identifiers is None else identifiers
    operation = {"type": "person", "identifiers": identifiers, "action": action}
    return {**operation, **fields}


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ({**_person("identify"), "type": "company"}, "type"),
        ({**_person("identify", {"object_id": "o"}), "type": "object"}, "type"),
        (_person("shout"), "action"),
        (_person("merge"), "action"),
        ({"type": "person", "action": "identify"}, "identifiers"),
        (_person("identify", identifiers=[]), "identifiers"),
        (_person("delete", {"id": "u", "email": "e@example.com"}), "identifiers"),
        (_person("delete", {"phone_id": "u"}), "identifiers"),
        (_person("delete", {"id": " "}), "identifiers.id"),
        (_person("delete", {"id": "u" * 151}), "identifiers.id"),
        (_person("delete", {"id": 42}), "identifiers.id"),
        (_person("event"), "name"),
        (_person("page", name=" "), "name"),
        (_person("event", name="e", attributes=[]), "attributes"),
        (_person("event", name="e", timestamp="now"), "timestamp"),
        (_person("event", name="e", id=7), "id"),
        (_person("identify", attributes=1), "attributes"),
        (_identify("u", **{"n" * 151: 1}), "attributes"),
        (_identify("u", big="x" * 1001), "attributes.big"),
        (_identify("u", **{f"a{n}": n for n in range(301)}), "attributes"),
        ("not an operation", ""),
    ],
)
async def test_fake_customerio_batch_refuses_an_invalid_operation_alone(
    batch, fake_cio, operation, field
):
    response = await batch([_identify("ok", a=1), operation])

    assert response.status_code == 207
    (error,) = response.json()["errors"]
    assert (error["batch_index"], error["field"]) == (1, field)
    assert error["reason"] == "invalid" and error["message"]
    assert fake_cio.customers == {"ok": {"a": 1}}
    assert fake_cio.deleted == [] and fake_cio.events == []


async def test_fake_customerio_batch_bad_credentials_are_401(make_client, fake_cio):
    client = make_client(api_key="wrong")

    # Kept on purpose: the exception holds the answer and its connection past the fake's
    # shutdown, which must close the connection all the same (no ResourceWarning later).
    with pytest.raises(CustomerIOException) as raised:
        await asyncio.to_thread(client.batch, [_identify("u1")])

    assert str(raised.value).startswith("401: ")
    assert fake_cio.customers == {}
    assert fake_cio.requests_for("POST", BATCH_PATH)[0].auth_ok is False


async def test_fake_customerio_batch_rate_limit_answers_429_with_retry_after(batch, fake_cio):
    fake_cio.set_rate_limit(2, retry_after="3")

    statuses = [await _status(batch, [_identify(f"u{n}")]) for n in range(5)]

    assert statuses[:2] == [200, 200]
    assert 429 in statuses
    assert fake_cio.stats()["by_status"]["429"] == statuses.count(429)
    assert len(fake_cio.customers) == statuses.count(200)
    status, _, headers = await _raw(fake_cio, "POST", BATCH_PATH, b'{"batch": []}')
    assert (status, headers["Retry-After"]) == (429, "3")


async def test_fake_customerio_batch_fail_next_matches_the_batch_path(make_client, batch, fake_cio):
    fake_cio.fail_next(503, method="POST", path=BATCH_PATH)
    client = make_client()

    await asyncio.to_thread(client.identify, id="v1", a=1)
    error = await _refused(batch, [_identify("u1")])
    retried = await batch([_identify("u1")])

    assert error.startswith("503: ")
    assert retried.status_code == 200
    assert set(fake_cio.customers) == {"v1", "u1"}
    assert [r.status for r in fake_cio.requests_for("POST", BATCH_PATH)] == [503, 200]


async def test_fake_customerio_batch_slow_next_holds_the_batch(batch, fake_cio):
    fake_cio.slow_next(0.3, path=BATCH_PATH)

    started = asyncio.get_running_loop().time()
    response = await batch([_identify("u1")])

    assert response.status_code == 200
    assert asyncio.get_running_loop().time() - started >= 0.3


async def test_fake_customerio_batch_fault_mix_applies_to_the_batch(batch, fake_cio):
    fake_cio.fault_mix(1.0, seed=3, hold=0.0)

    outcomes = [await _status(batch, [_identify(f"u{n}")]) for n in range(8)]

    assert set(outcomes) <= {200, 429, 500, 503, 504}
    assert sum(fake_cio.faults.values()) == 8
    # Held answers wait 0 s here: an applied "timeout" is a 200 the client saw.
    assert outcomes.count(200) == fake_cio.faults["applied_timeout"] == len(fake_cio.customers)


async def test_fake_customerio_batch_refusal_control_rejects_bad_rules(fake_cio):
    for body in (
        b"[1]",
        b'{"customer_ids": "u2"}',
        b'{"times": "x"}',
        b'{"times": 0}',
        b'{"predicate": 1}',
    ):
        status, answer, _ = await _raw(fake_cio, "POST", "/__fake/refuse", body, auth=False)
        assert status == 400, body
        assert answer["meta"]["error"]


async def test_fake_customerio_batch_runs_as_a_process_with_refusals(tmp_path):
    script = Path(__file__).parent / "fake_customerio.py"
    ca_file = tmp_path / "ca.pem"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--port",
        "0",
        "--ca-file",
        str(ca_file),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        _, host, written_ca = line.decode().split()
        fake = FakeCustomerIO()
        fake.host, fake.ca_file = host, written_ca
        rule = json.dumps({"customer_ids": ["u2"]}).encode()
        assert (await _raw(fake, "POST", "/__fake/refuse", rule, auth=False))[0] == 200
        body = json.dumps({"batch": [_identify("u1"), _identify("u2")]}).encode()

        status, answer, _ = await _raw(fake, "POST", BATCH_PATH, body)

        assert status == 207
        assert [e["batch_index"] for e in answer["errors"]] == [1]
        _, stats, _ = await _raw(fake, "GET", "/__fake/stats", auth=False)
        assert stats["by_status"] == {"207": 1}
        assert stats["operations"] == {"identify": 1, "refused": 1}
    finally:
        process.terminate()
        await process.wait()
    assert process.returncode == 0
