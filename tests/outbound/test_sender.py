import asyncio
import base64
import socket
import ssl
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import requests
from customerio import CustomerIOException

from connector.config import CustomerioConfig
from connector.outbound.operations import DeleteCustomer, Identify, Track
from connector.outbound.ratelimit import TokenBucket
from connector.outbound.sender import (
    CredentialCheck,
    CustomerIOSender,
    DryRunSender,
    parse_track_host,
    result_from_exception,
)
from connector.rules.delivery import SendOutcome

from ..fake_customerio import FakeCustomerIO

SECRET = "SECRET-VALUE-7f3a9c"


class CountingBucket(TokenBucket):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.acquired = 0

    async def acquire(self) -> None:
        self.acquired += 1
        await super().acquire()


@pytest.fixture
async def make_sender(fake_cio):
    senders: list[CustomerIOSender] = []

    def build(
        *,
        api_key: str | None = None,
        region: str = "us",
        ca_file: str | None = None,
        track_host: str | None = None,
        timeout: float = 5.0,
        concurrency: int = 4,
        bucket: TokenBucket | None = None,
        throttle_base_seconds: float = 1.0,
    ) -> CustomerIOSender:
        config = CustomerioConfig(
            track_host=fake_cio.host if track_host is None else track_host,
            ca_file=fake_cio.ca_file if ca_file is None else ca_file,
            timeout_seconds=timeout,
        )
        sender = CustomerIOSender(
            fake_cio.site_id,
            fake_cio.api_key if api_key is None else api_key,
            region,
            config,
            concurrency=concurrency,
            bucket=bucket or TokenBucket(1000, capacity=100),
            throttle_base_seconds=throttle_base_seconds,
        )
        senders.append(sender)
        return sender

    yield build
    for sender in senders:
        await sender.close()


@pytest.fixture
async def sender(make_sender):
    return make_sender()


def event(**overrides) -> Track:
    fields = {
        "name": "Signed Up",
        "data": {"plan": "pro"},
        "timestamp": 1_700_000_000,
        "id": "01HF7YAT00R8KXN9GZJ2VQ3T4M",
        "source_event_id": "evt-1",
    }
    fields.update(overrides)
    return Track(**fields)


# -- payloads and paths ---------------------------------------------------------------


async def test_sender_identify_puts_attributes_on_url_encoded_customer_path(sender, fake_cio):
    result = await sender.send(Identify("a b/c", {"email": "a@example.com", "created_at": 1}))

    assert result.outcome is SendOutcome.OK
    assert result.status == 200
    (request,) = fake_cio.requests
    assert request.method == "PUT"
    assert request.raw_path == "/api/v1/customers/a%20b%2Fc"
    assert request.path == "/api/v1/customers/a b/c"
    assert request.auth_ok
    assert request.body == {"email": "a@example.com", "created_at": 1}
    assert fake_cio.customers == {"a b/c": {"email": "a@example.com", "created_at": 1}}


async def test_sender_identify_with_reserved_attribute_name_still_sends_it(sender, fake_cio):
    result = await sender.send(Identify("u1", {"id": "x", "self": "y"}))

    assert result.ok
    assert fake_cio.requests_for("PUT", "/api/v1/customers/u1")[0].body == {"id": "x", "self": "y"}


async def test_sender_track_posts_event_with_id_and_timestamp(sender, fake_cio):
    result = await sender.send(event(customer_id="user 1"))

    assert result.ok
    (request,) = fake_cio.requests_for("POST", "/api/v1/customers/user 1/events")
    assert request.raw_path == "/api/v1/customers/user%201/events"
    assert request.body == {
        "name": "Signed Up",
        "data": {"plan": "pro"},
        "id": "01HF7YAT00R8KXN9GZJ2VQ3T4M",
        "timestamp": 1_700_000_000,
    }
    assert fake_cio.events[0]["customer_id"] == "user 1"
    assert fake_cio.events[0]["type"] == "event"


async def test_sender_track_without_timestamp_leaves_it_out(sender, fake_cio):
    await sender.send(event(customer_id="u1", timestamp=None))

    assert "timestamp" not in fake_cio.requests[0].body


async def test_sender_track_page_sends_type_page(sender, fake_cio):
    page = event(
        customer_id="u/1",
        name="https://example.com/pricing?x=1",
        data={"referrer": "https://google.com"},
        page=True,
    )

    result = await sender.send(page)

    assert result.ok
    (request,) = fake_cio.requests
    assert request.raw_path == "/api/v1/customers/u%2F1/events"
    assert request.body == {
        "type": "page",
        "name": "https://example.com/pricing?x=1",
        "data": {"referrer": "https://google.com"},
        "id": "01HF7YAT00R8KXN9GZJ2VQ3T4M",
        "timestamp": 1_700_000_000,
    }
    assert fake_cio.events[0]["type"] == "page"


async def test_sender_track_anonymous_posts_to_events_with_anonymous_id(sender, fake_cio):
    result = await sender.send(event(anonymous_id="anon-42"))

    assert result.ok
    (request,) = fake_cio.requests
    assert (request.method, request.path) == ("POST", "/api/v1/events")
    assert request.body == {
        "name": "Signed Up",
        "data": {"plan": "pro"},
        "id": "01HF7YAT00R8KXN9GZJ2VQ3T4M",
        "timestamp": 1_700_000_000,
        "anonymous_id": "anon-42",
    }
    assert fake_cio.events[0]["anonymous_id"] == "anon-42"
    assert fake_cio.events[0]["customer_id"] is None


async def test_sender_track_anonymous_page_sends_type_page(sender, fake_cio):
    await sender.send(event(anonymous_id="anon-42", name="https://example.com/", page=True))

    body = fake_cio.requests_for("POST", "/api/v1/events")[0].body
    assert body["type"] == "page"
    assert body["anonymous_id"] == "anon-42"


async def test_sender_delete_deletes_the_customer(sender, fake_cio):
    await sender.send(Identify("a b/c", {"email": "a@example.com"}))

    result = await sender.send(DeleteCustomer("a b/c"))

    assert result.ok
    request = fake_cio.requests_for("DELETE")[0]
    assert request.raw_path == "/api/v1/customers/a%20b%2Fc"
    assert fake_cio.customers == {}
    assert fake_cio.deleted == ["a b/c"]


async def test_sender_concurrent_sends_all_arrive(make_sender, fake_cio):
    sender = make_sender(concurrency=4)

    results = await asyncio.gather(*(sender.send(Identify(f"u{n}", {"n": n})) for n in range(40)))

    assert all(r.ok for r in results)
    assert {c: a["n"] for c, a in fake_cio.customers.items()} == {f"u{n}": n for n in range(40)}


# -- outcomes -------------------------------------------------------------------------


async def test_sender_wrong_api_key_is_unauthorized(make_sender, fake_cio):
    sender = make_sender(api_key="wrong")

    result = await sender.send(Identify("u1", {"email": "a@example.com"}))

    assert result.outcome is SendOutcome.UNAUTHORIZED
    assert result.status == 401
    assert result.reason == "HTTP 401: Unauthorized request"
    assert fake_cio.requests[0].auth_ok is False
    assert fake_cio.customers == {}


async def test_sender_429_is_throttled_and_pauses_every_later_request(make_sender, fake_cio):
    sender = make_sender(bucket=TokenBucket(1000), concurrency=4)
    fake_cio.fail_next(429, headers={"Retry-After": "1"})

    result = await sender.send(event(customer_id="u1"))
    others = await asyncio.gather(*(sender.send(Identify(f"u{n}", {"n": n})) for n in range(3)))

    assert result.outcome is SendOutcome.THROTTLED
    assert result.status == 429
    assert result.retry_after == 1.0
    assert all(r.ok for r in others)
    first, *later = fake_cio.requests
    # Retry-After holds the whole sender, not just the throttled operation.
    assert min(r.at for r in later) - first.at >= 0.9


async def test_sender_429_without_retry_after_pauses_with_a_growing_backoff(make_sender, fake_cio):
    sender = make_sender(bucket=TokenBucket(1000), concurrency=1, throttle_base_seconds=0.05)
    pauses = []
    fake_cio.fail_next(429, times=3)

    for _ in range(3):
        pauses.append((await sender.send(Identify("u1", {"n": 1}))).retry_after)
    assert (await sender.send(Identify("u1", {"n": 1}))).ok
    fake_cio.fail_next(429)
    after_success = (await sender.send(Identify("u1", {"n": 1}))).retry_after

    # The sender's own backoff, doubling while 429s keep coming...
    assert pauses == pytest.approx([0.05, 0.1, 0.2])
    # ...and back to the start once a request went through.
    assert after_success == pytest.approx(0.05)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_sender_5xx_is_retry_after_exactly_one_request(sender, fake_cio, status):
    fake_cio.fail_next(status)

    result = await sender.send(Identify("u1", {"email": "a@example.com"}))

    assert result.outcome is SendOutcome.RETRY
    assert result.status == status
    # The package would retry 5xx itself through urllib3; the sync owns retries instead.
    assert len(fake_cio.requests) == 1
    assert fake_cio.customers == {}


async def test_sender_400_fails_with_customerio_error_text(sender, fake_cio):
    fake_cio.fail_next(400, body={"meta": {"error": "event name must not be blank"}})

    result = await sender.send(event(customer_id="u1"))

    assert result.outcome is SendOutcome.FAIL
    assert result.status == 400
    assert result.reason == "HTTP 400: event name must not be blank"


async def test_sender_404_is_fail(sender, fake_cio):
    fake_cio.fail_next(404, body={"errors": [{"detail": "not found"}]})

    result = await sender.send(DeleteCustomer("u1"))

    assert result.outcome is SendOutcome.FAIL
    assert result.reason == 'HTTP 404: {"detail": "not found"}'


async def test_sender_timeout_is_retry(make_sender, fake_cio):
    sender = make_sender(timeout=0.3)
    fake_cio.slow_next(3)

    result = await sender.send(Identify("u1", {"email": "a@example.com"}))

    assert result.outcome is SendOutcome.RETRY
    assert result.status is None
    assert result.reason == "timeout"
    assert len(fake_cio.requests) == 1


async def test_sender_connection_refused_is_retry(make_sender):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    sender = make_sender(track_host=f"127.0.0.1:{closed_port}")

    result = await sender.send(Identify("u1", {"email": "a@example.com"}))

    assert result.outcome is SendOutcome.RETRY
    assert result.reason == "connection error"


async def test_sender_verifies_tls_against_the_configured_ca(make_sender, fake_cio, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    import trustme

    trustme.CA().cert_pem.write_to_path(str(other_ca))
    sender = make_sender(ca_file=str(other_ca))

    result = await sender.send(Identify("u1", {"email": "a@example.com"}))

    assert result.outcome is SendOutcome.RETRY
    assert result.reason == "TLS error"
    assert fake_cio.requests == []


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, None),
        (401, None),
        (429, None),
        (500, None),
        (400, "<html>proxy error</html>"),
        (400, {"meta": {"error": "bad request"}}),
    ],
)
async def test_sender_reason_never_contains_sent_data(sender, fake_cio, status, body):
    fake_cio.fail_next(status, body=body)

    result = await sender.send(Identify("u1", {"api_token": SECRET, "nested": {"k": SECRET}}))

    assert result.status == status
    assert SECRET not in (result.reason or "")
    assert SECRET not in repr(result)


async def test_sender_reason_of_timeout_never_contains_sent_data(make_sender, fake_cio):
    sender = make_sender(timeout=0.3)
    fake_cio.slow_next(3)

    result = await sender.send(event(customer_id="u1", data={"token": SECRET}))

    assert SECRET not in repr(result)


async def test_sender_reason_ignores_a_non_json_body(sender, fake_cio):
    fake_cio.fail_next(502, body="<html><body>Bad gateway</body></html>")

    result = await sender.send(DeleteCustomer("u1"))

    assert result.reason == "HTTP 502"


async def test_sender_reason_is_truncated_and_single_line(sender, fake_cio):
    fake_cio.fail_next(400, body={"meta": {"error": "line one\nline two " + "x" * 1000}})

    result = await sender.send(DeleteCustomer("u1"))

    assert len(result.reason) <= len("HTTP 400: ") + 200
    assert "\n" not in result.reason
    assert result.reason.startswith("HTTP 400: line one line two x")


async def test_sender_every_request_waits_for_a_token(make_sender, fake_cio):
    rate = 40.0
    created = time.monotonic()
    bucket = CountingBucket(rate)
    sender = make_sender(bucket=bucket, concurrency=8)

    sends = asyncio.gather(*(sender.send(Identify(f"u{n}", {"n": n})) for n in range(21)))
    await asyncio.sleep(0.2)
    arrived_early = len(fake_cio.requests)
    ceiling_early = 1 + (time.monotonic() - created) * rate
    results = await sends

    assert all(r.ok for r in results)
    assert bucket.acquired == 21
    # A request reaches the fake only after its token: never more than the bucket allows.
    assert arrived_early <= ceiling_early
    arrivals = sorted(r.at for r in fake_cio.requests)
    assert arrivals[-1] - created >= 20 / rate * 0.9


# -- credential check -----------------------------------------------------------------


async def test_sender_check_credentials_reports_the_region(sender, fake_cio):
    check = await sender.check_credentials()

    assert check == CredentialCheck(ok=True, region="us", reason=None, unauthorized=False)
    assert fake_cio.requests_for("GET", "/api/v1/accounts/region")[0].auth_ok


async def test_sender_check_credentials_wrong_key_is_unauthorized(make_sender):
    check = await make_sender(api_key="wrong").check_credentials()

    assert check.ok is False
    assert check.unauthorized is True
    assert check.reason == "Invalid credentials"


async def test_sender_check_credentials_notices_another_region(make_sender, fake_cio):
    fake_cio.data_center = "eu"

    check = await make_sender(region="us").check_credentials()

    assert check.ok is True
    assert check.region == "eu"
    assert "eu" in check.reason


async def test_sender_check_credentials_server_error_is_not_ok(sender, fake_cio):
    fake_cio.fail_next(503)

    check = await sender.check_credentials()

    assert check.ok is False
    assert check.unauthorized is False
    assert check.reason.startswith("HTTP 503")


async def test_sender_check_credentials_timeout_is_not_ok(make_sender, fake_cio):
    fake_cio.slow_next(3)

    check = await make_sender(timeout=0.3).check_credentials()

    assert check == CredentialCheck(ok=False, reason="timeout")


# -- life cycle and helpers -------------------------------------------------------------


async def test_sender_close_refuses_further_sends(make_sender):
    sender = make_sender()
    await sender.close()
    await sender.close()

    with pytest.raises(RuntimeError):
        await sender.send(DeleteCustomer("u1"))


def test_sender_rejects_unknown_region():
    with pytest.raises(ValueError):
        CustomerIOSender("s", "k", "mars", CustomerioConfig(), concurrency=1, bucket=TokenBucket(1))


def test_sender_rejects_a_missing_ca_file(tmp_path):
    config = CustomerioConfig(ca_file=str(tmp_path / "missing.pem"))

    with pytest.raises(ValueError, match="ca_file"):
        CustomerIOSender("s", "k", "us", config, concurrency=1, bucket=TokenBucket(1))


@pytest.mark.parametrize(
    ("track_host", "expected"),
    [
        ("", (None, None)),
        ("track.customer.io", ("track.customer.io", None)),
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("localhost:443", ("localhost", 443)),
    ],
)
def test_parse_track_host_splits_host_and_port(track_host, expected):
    assert parse_track_host(track_host) == expected


@pytest.mark.parametrize(
    ("message", "outcome", "status", "reason"),
    [
        (
            "400: https://h/api/v1/customers/u {'k': 'SECRET'} "
            '{"meta":{"error":"attribute name cannot be longer than 150 bytes"}}',
            SendOutcome.FAIL,
            400,
            "HTTP 400: attribute name cannot be longer than 150 bytes",
        ),
        ("404: https://h/api/v1/customers/u {} ", SendOutcome.FAIL, 404, "HTTP 404"),
        (
            '500: https://h/api/v1/customers/u {"a\'": \'{"meta": {"error": "SECRET"}}\'} {}',
            SendOutcome.RETRY,
            500,
            "HTTP 500",
        ),
        (
            "429: https://h/api/v1/events {'data': {'x': 'SECRET'}} "
            '{"meta": {"error": "rate limited"}}\n',
            SendOutcome.THROTTLED,
            429,
            "HTTP 429: rate limited",
        ),
        ("customer_id cannot be blank in track", SendOutcome.FAIL, None, "invalid request"),
    ],
)
def test_result_from_exception_keeps_status_and_error_text_only(message, outcome, status, reason):
    result = result_from_exception(CustomerIOException(message))

    assert (result.outcome, result.status, result.reason) == (outcome, status, reason)
    assert "SECRET" not in result.reason


@pytest.mark.parametrize(
    ("cause", "outcome", "status", "reason"),
    [
        (
            requests.exceptions.RetryError(
                "HTTPSConnectionPool(host='h', port=443): Max retries exceeded with url: "
                "/api/v1/customers/SECRET (Caused by ResponseError('too many 503 error "
                "responses'))"
            ),
            SendOutcome.RETRY,
            503,
            "HTTP 503",
        ),
        (requests.exceptions.ReadTimeout("SECRET"), SendOutcome.RETRY, None, "timeout"),
        (requests.exceptions.ConnectTimeout("SECRET"), SendOutcome.RETRY, None, "timeout"),
        (requests.exceptions.SSLError("SECRET"), SendOutcome.RETRY, None, "TLS error"),
        (
            requests.exceptions.ConnectionError("SECRET"),
            SendOutcome.RETRY,
            None,
            "connection error",
        ),
        (TypeError("SECRET is not JSON serializable"), SendOutcome.FAIL, None, "invalid request"),
    ],
)
def test_result_from_exception_classifies_transport_errors(cause, outcome, status, reason):
    try:
        try:
            raise cause
        except Exception as error:
            raise CustomerIOException(f"Failed to receive valid response -- {error}") from error
    except CustomerIOException as exc:
        result = result_from_exception(exc)

    assert (result.outcome, result.status) == (outcome, status)
    assert result.reason.startswith(reason)
    assert "SECRET" not in result.reason


async def test_dry_run_sender_records_operations_and_answers_ok():
    sender = DryRunSender()
    operations = [Identify("u1", {"email": "a@example.com"}), DeleteCustomer("u2")]

    results = [await sender.send(op) for op in operations]
    await sender.close()

    assert all(r.ok for r in results)
    assert sender.operations == operations


# -- the fake's own enforcement of Customer.io's documented limits ----------------------


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        (Identify("x" * 151, {}), "id attribute cannot be longer than 150 bytes"),
        (Identify("é" * 76, {}), "id attribute cannot be longer than 150 bytes"),
        (Identify("u", {"n" * 151: 1}), "attribute name cannot be longer than 150 bytes"),
        (Identify("u", {"v": "x" * 1001}), "value for attribute 'v' cannot be longer than 1000"),
        (Identify("u", {"v": "é" * 501}), "value for attribute 'v' cannot be longer than 1000"),
        (Identify("u", {"v": {"k": "x" * 995}}), "value for attribute 'v' cannot be longer"),
        (
            Identify("u", {f"a{n}": n for n in range(301)}),
            "cannot identify more than 300 attributes in one request",
        ),
        (event(customer_id="u", name=""), "event name must not be blank"),
        (event(customer_id="u", name="e" * 101), "event name cannot be longer than 100 bytes"),
        (
            event(customer_id="u", name="https://x/" + "p" * 500, page=True),
            "event name must be less than 500 characters",
        ),
        (
            event(customer_id="u", data={"blob": "x" * 100_000}),
            "event data cannot be longer than 100000 bytes",
        ),
        (DeleteCustomer("x" * 151), "id attribute cannot be longer than 150 bytes"),
    ],
)
async def test_fake_customerio_rejects_over_the_limit(sender, fake_cio, operation, error):
    result = await sender.send(operation)

    assert result.outcome is SendOutcome.FAIL
    assert result.status == 400
    assert error in result.reason
    assert fake_cio.customers == {}
    assert fake_cio.events == []


@pytest.mark.parametrize(
    "operation",
    [
        Identify("x" * 150, {}),
        Identify("é" * 75, {}),
        Identify("u", {"n" * 150: "v" * 1000}),
        Identify("u", {f"a{n}": n for n in range(300)}),
        event(customer_id="u", name="e" * 100),
        event(customer_id="u", name="https://x/" + "p" * 300, page=True),
    ],
)
async def test_fake_customerio_accepts_up_to_the_limit(sender, operation):
    result = await sender.send(operation)

    assert result.ok


async def test_fake_customerio_merges_attributes_and_null_removes(sender, fake_cio):
    await sender.send(Identify("u", {"a": 1, "b": 2}))
    await sender.send(Identify("u", {"b": None, "c": 3}))

    assert fake_cio.customers == {"u": {"a": 1, "c": 3}}


async def test_fake_customerio_deduplicates_events_on_id(sender, fake_cio):
    first = await sender.send(event(customer_id="u"))
    second = await sender.send(event(customer_id="u"))

    assert first.ok and second.ok
    assert len(fake_cio.requests) == 2
    assert len(fake_cio.events) == 1


async def test_fake_customerio_identify_after_delete_restores_customer(sender, fake_cio):
    await sender.send(DeleteCustomer("u"))
    await sender.send(Identify("u", {"a": 1}))

    assert fake_cio.deleted == []
    assert fake_cio.customers == {"u": {"a": 1}}


async def test_fake_customerio_fail_next_matches_method_and_path(sender, fake_cio):
    fake_cio.fail_next(503, times=2, method="DELETE", path="/api/v1/customers/b")

    results = [
        await sender.send(DeleteCustomer("a")),
        await sender.send(DeleteCustomer("b")),
        await sender.send(Identify("b", {})),
        await sender.send(DeleteCustomer("b")),
        await sender.send(DeleteCustomer("b")),
    ]

    assert [r.status for r in results] == [200, 503, 200, 503, 200]


async def test_fake_customerio_reset_forgets_everything(sender, fake_cio):
    await sender.send(Identify("u", {"a": 1}))
    fake_cio.fail_next(500)

    fake_cio.reset()

    assert fake_cio.requests == [] and fake_cio.customers == {}
    assert (await sender.send(Identify("u", {}))).ok


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


async def _raw(fake: FakeCustomerIO, method: str, path: str, body: bytes = b"", auth=True):
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
            ssl=_ssl_context(fake.ca_file),
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/v1/customers/u/events", b'{"name": "e", "data": ""}', "event data must be a hash"),
        ("/api/v1/customers/u/events", b'{"name": "e", "type": "click"}', "event type"),
        ("/api/v1/customers/u/events", b'{"name": "e", "timestamp": "soon"}', "timestamp"),
        ("/api/v1/events", b'{"data": {}}', "event name must not be blank"),
        ("/api/v1/events", b"{not json", "invalid JSON"),
        ("/api/v1/events", b'["name"]', "JSON object"),
        ("/api/v1/events", b'{"name": "e", "x": "' + b"x" * 1_000_001 + b'"}', "body"),
    ],
)
async def test_fake_customerio_rejects_malformed_bodies(fake_cio, path, body, error):
    status, answer = await _raw(fake_cio, "POST", path, body)

    assert status == 400
    assert error in answer["meta"]["error"]
    assert fake_cio.events == []


async def test_fake_customerio_anonymous_event_without_anonymous_id_is_accepted(fake_cio):
    status, _ = await _raw(fake_cio, "POST", "/api/v1/events", b'{"name": "invite"}')

    assert status == 200
    assert fake_cio.events[0]["anonymous_id"] is None


async def test_fake_customerio_missing_auth_is_401(fake_cio):
    status, answer = await _raw(fake_cio, "PUT", "/api/v1/customers/u", b"{}", auth=False)

    assert status == 401
    assert answer == {"meta": {"error": "Unauthorized request"}}


async def test_fake_customerio_unknown_route_is_404(fake_cio):
    status, _ = await _raw(fake_cio, "GET", "/api/v1/nothing")

    assert status == 404


async def test_fake_customerio_region_answer_has_documented_shape(fake_cio):
    status, answer = await _raw(fake_cio, "GET", "/api/v1/accounts/region")

    assert status == 200
    assert answer == {
        "url": "https://track.customer.io",
        "data_center": "us",
        "environment_id": fake_cio.environment_id,
    }


async def test_fake_customerio_rate_limit_answers_429_beyond_one_second_burst(fake_cio):
    fake_cio.set_rate_limit(5)
    started = time.monotonic()

    statuses = [
        (await _raw(fake_cio, "PUT", f"/api/v1/customers/u{n}", b"{}"))[0] for n in range(12)
    ]

    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}
    assert statuses[:5] == [200] * 5
    assert statuses.count(200) <= 5 + elapsed * 5 + 1
    assert 429 in statuses


async def test_fake_customerio_stats_and_reset_need_no_auth(fake_cio):
    await _raw(fake_cio, "PUT", "/api/v1/customers/u", b"{}")
    await _raw(fake_cio, "PUT", "/api/v1/customers/u", b"{}", auth=False)

    _, stats = await _raw(fake_cio, "GET", "/__fake/stats", auth=False)
    assert stats["total"] == 2
    assert stats["by_status"] == {"200": 1, "401": 1}

    await _raw(fake_cio, "POST", "/__fake/reset", auth=False)
    assert fake_cio.customers == {}
    assert fake_cio.stats()["total"] == 0


async def test_fake_customerio_runs_as_a_process_keeping_counts_only(tmp_path):
    script = Path(__file__).parent.parent / "fake_customerio.py"
    ca_file = tmp_path / "ca.pem"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--port",
        "0",
        "--latency-ms",
        "1",
        "--ca-file",
        str(ca_file),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        word, host, written_ca = line.decode().split()
        assert (word, written_ca) == ("ready", str(ca_file))
        fake = FakeCustomerIO()
        fake.host, fake.ca_file = host, written_ca
        for n in range(3):
            status, _ = await _raw(fake, "PUT", f"/api/v1/customers/u{n}", b'{"a": 1}')
            assert status == 200
        _, stats = await _raw(fake, "GET", "/__fake/stats", auth=False)
        assert stats["by_status"] == {"200": 3}
        assert stats["operations"] == {"identify": 3}
        await _raw(fake, "POST", "/__fake/reset", auth=False)
        _, stats = await _raw(fake, "GET", "/__fake/stats", auth=False)
        assert stats["total"] == 0
    finally:
        process.terminate()
        await process.wait()
    assert process.returncode == 0
