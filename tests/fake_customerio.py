"""A faithful fake of Customer.io's Track API (v1 and the v2 batch), served over HTTPS on loopback.

Follows Customer.io's documentation (Journeys Track API and "Invalid API requests"):

- HTTP Basic auth with the workspace's site id and API key; anything else is a 401.
- ``PUT /api/v1/customers/{id}`` (identify, attributes merged, ``null`` removes one),
  ``DELETE /api/v1/customers/{id}``, ``POST /api/v1/customers/{id}/events``,
  ``POST /api/v1/events`` (anonymous: ``anonymous_id`` is optional, without it the event is
  an "invite" event) and ``GET /api/v1/accounts/region``.
- The documented limits, answered with a 400 and ``{"meta": {"error": ...}}``: customer id
  and attribute names up to 150 bytes, attribute values up to 1000 bytes, up to 300
  attributes per identify, event names not blank and up to 100 bytes (page and screen names,
  which are URLs and screen titles, under 500 characters), event ``data`` an object of at most
  100,000 bytes, event ``type`` one of ``event``/``page``/``screen``.
- ``POST /api/v2/batch`` (``{"batch": [operation, ...]}``, the Track v2 API's own words: "Your
  batch request must be smaller than 500kb. Each of the requests within the batch must also
  be 32kb or smaller"). Person operations ``identify``, ``event``, ``page``, ``screen`` and
  ``delete``, the person named by exactly one of ``identifiers.id``/``email``/``cio_id``,
  write the same workspace as v1 (attributes merged, events deduplicated on ``id``), in order.
  A raw body of :data:`MAX_BATCH_BYTES` or more, or one that is not a JSON object with a
  ``batch`` list, is a 400 for the whole request, nothing applied; an operation over
  :data:`MAX_OPERATION_BYTES` (its compact UTF-8 JSON) or invalid (the v1 limits above, an
  unknown or unmodelled type or action, missing identifiers or name) is refused alone: 207
  with ``{"errors": [{"batch_index", "reason", "field", "message"}]}``, the others applied;
  all applied: 200 ``{}``. The batch's own 400s (and a 405) carry the v2 error list
  ``{"errors": [{"reason", "field", "message"}]}``; 401, 429 and injected failures answer as
  on v1. ``fail_next``/``slow_next`` rules with ``path="/api/v2/batch"`` match the batch.
- Optionally the fair-use rate limit (a token bucket with one second of burst): 429, with a
  ``Retry-After`` when one is set (not a documented figure, so none by default).
- Optionally a seeded mix of faults (:meth:`FakeCustomerIO.fault_mix`): 429, 500, 503 and
  answers held past the client's timeout, some of them applied all the same.

Tests control it directly (:meth:`FakeCustomerIO.fail_next`, :meth:`FakeCustomerIO.slow_next`,
:meth:`FakeCustomerIO.fault_mix`, :meth:`FakeCustomerIO.refuse_operations`, ``latency``,
:meth:`FakeCustomerIO.reset`) and read ``requests``, ``customers``, ``deleted``, ``events`` and
``faults``. Run as a script it serves benchmarks, keeping counts only::

    python tests/fake_customerio.py --port 0 --latency-ms 50 --rate-limit 100 --ca-file ca.pem

prints ``ready 127.0.0.1:PORT CAFILE`` once listening. The controls need no auth:
``GET /__fake/stats``, ``POST /__fake/reset``, ``POST /__fake/refuse`` (a JSON object with
the keyword arguments of :meth:`FakeCustomerIO.refuse_operations` but ``predicate``) and
``DELETE /__fake/refuse`` (:meth:`FakeCustomerIO.clear_refusals`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import shutil
import signal
import socket
import ssl
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import trustme
from aiohttp import web

MAX_ID_BYTES = 150
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000
MAX_ATTRIBUTES_PER_REQUEST = 300
MAX_EVENT_NAME_BYTES = 100
MAX_PAGE_NAME_CHARS = 500
MAX_EVENT_DATA_BYTES = 100_000
# Not a documented Track API v1 figure: the fake's own guard so a runaway client shows up as
# a 400 instead of eating memory. Generous enough for any valid request.
MAX_BODY_BYTES = 1_000_000
EVENT_TYPES = ("event", "page", "screen")
# The v2 batch limits as the Track API documents them ("smaller than 500kb", "32kb or
# smaller"), read as decimal kilobytes: a request must stay under 500,000 bytes, one of its
# operations at or under 32,000.
MAX_BATCH_BYTES = 500_000
REFUSED_KEY = web.ResponseKey("refused", tuple)
"""On a 207's response: the ``batch_index`` of each refused operation, for the recording."""
MAX_OPERATION_BYTES = 32_000
PERSON_IDENTIFIERS = ("id", "email", "cio_id")
BATCH_EVENT_ACTIONS = ("event", "page", "screen")
BATCH_ACTIONS = ("identify", "delete", *BATCH_EVENT_ACTIONS)
# Documented v2 types and person actions that the fake does not model: refused, not ignored,
# so a test that sends one finds out.
UNMODELLED_TYPES = ("object", "delivery")
UNMODELLED_ACTIONS = (
    "add_relationships",
    "delete_relationships",
    "add_device",
    "delete_device",
    "merge",
    "suppress",
    "unsuppress",
)
FAULT_KINDS = ("429", "500", "503", "timeout", "applied_timeout")
"""What :meth:`FakeCustomerIO.fault_mix` draws from, equally often: ``timeout`` holds the
answer past the client's timeout without applying the request, ``applied_timeout`` applies
it first (the client cannot tell the two apart)."""
REGION_URLS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    """The path with every segment percent-decoded (``/api/v1/customers/a b/c``)."""
    raw_path: str
    auth_ok: bool
    body: Any
    """The parsed JSON body, ``None`` when empty or not JSON."""
    at: float
    """``time.monotonic()`` when it arrived."""
    status: int | None = None
    refused: tuple[int, ...] = ()
    """A v2 batch answered 207: the ``batch_index`` of each operation it refused."""


@dataclass
class _Rule:
    """A scripted answer or delay for the next ``times`` matching requests."""

    times: int
    method: str | None
    path: str | None
    status: int = 0
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] | None = None
    when: Callable[[Any], bool] | None = None
    """Only requests whose parsed JSON body this is true of."""

    def matches(self, method: str, path: str, body: Any = None) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path is not None and not path.startswith(self.path):
            return False
        return self.when is None or bool(self.when(body))


@dataclass
class _RateLimiter:
    rate: float
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def allow(self) -> bool:
        now = time.monotonic()
        # One second of burst, as Customer.io's fair-use limit is stated per second.
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _FaultMix:
    """A seeded share of faulty answers, the same whatever order requests arrive in.

    The fate of a request depends only on the seed, the request (method, path, body) and how
    many times that same request came before, so a run is reproducible with any concurrency.
    """

    rate: float
    seed: int
    hold: float
    retry_after: str | None
    seen: Counter[str] = field(default_factory=Counter)

    def draw(self, method: str, raw_path: str, body: bytes) -> str | None:
        key = hashlib.sha256(f"{self.seed}\0{method}\0{raw_path}\0".encode() + body).hexdigest()
        occurrence = self.seen[key]
        self.seen[key] += 1
        rng = random.Random(f"{key}:{occurrence}")
        if rng.random() >= self.rate:
            return None
        return rng.choice(FAULT_KINDS)


@dataclass
class _Refusal:
    """Operations of a v2 batch to refuse whatever they hold (see ``refuse_operations``)."""

    customer_ids: frozenset[str] | None
    actions: frozenset[str] | None
    predicate: Callable[[dict[str, Any]], bool] | None
    times: int | None
    reason: str
    message: str
    whole_request: bool = False

    def matches(self, operation: dict[str, Any]) -> bool:
        if self.actions is not None and operation.get("action") not in self.actions:
            return False
        if self.customer_ids is not None:
            identifiers = operation.get("identifiers")
            values = identifiers.values() if isinstance(identifiers, dict) else ()
            if self.customer_ids.isdisjoint(v for v in values if isinstance(v, str)):
                return False
        return self.predicate is None or bool(self.predicate(operation))


class _Rejected(Exception):
    def __init__(self, status: int, message: str, *, field: str = "", reason: str = "invalid"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        """The offending field, as a v2 error names it."""
        self.reason = reason
        """A v2 error's short reason."""


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return _utf8_len(value)
    return _utf8_len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _compact_bytes(value: Any) -> int:
    return _utf8_len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"meta": {"error": message}}, status=status)


def _v2_error(status: int, rejected: _Rejected) -> web.Response:
    error = {"reason": rejected.reason, "field": rejected.field, "message": rejected.message}
    return web.json_response({"errors": [error]}, status=status)


class FakeCustomerIO:
    """The fake Track API server and the workspace it writes to."""

    def __init__(
        self,
        site_id: str = "fake-site-id",
        api_key: str = "fake-api-key",
        *,
        data_center: str = "us",
        environment_id: int = 12345,
        latency: float = 0.0,
        rate_limit: float | None = None,
        rate_limit_retry_after: str | None = None,
        record: bool = True,
    ):
        self.site_id = site_id
        self.api_key = api_key
        self.data_center = data_center
        self.environment_id = environment_id
        self.latency = latency
        """Seconds every API request waits before it is answered."""
        self.rate_limit = rate_limit
        """Requests per second before answering 429 (one second of burst); None: no limit."""
        self.rate_limit_retry_after = rate_limit_retry_after
        """``Retry-After`` of the rate limit's 429s; None: no such header."""
        self.record = record
        """Keep requests and workspace state; False keeps counts only (benchmarks)."""
        self.host = ""
        self.ca_file = ""
        self._expected_auth = self._basic(site_id, api_key)
        self._runner: web.AppRunner | None = None
        self._tmpdir: str | None = None
        self._closing = asyncio.Event()
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self.reset()

    @staticmethod
    def _basic(user: str, password: str) -> str:
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return f"Basic {token}"

    def reset(self) -> None:
        """Forget every request, rule and workspace record; limits and latency stay."""
        self.requests: list[RecordedRequest] = []
        self.customers: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[int] = Counter()
        self.operations: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        """Faults the :meth:`fault_mix` injected, by kind."""
        self._event_ids: set[str] = set()
        self._rules: list[_Rule] = []
        self._refusals: list[_Refusal] = []
        self._mix: _FaultMix | None = None
        self._limiter = _RateLimiter(self.rate_limit) if self.rate_limit else None

    def set_rate_limit(
        self, rate_per_second: float | None, *, retry_after: str | None = None
    ) -> None:
        """Answer 429 beyond ``rate_per_second`` (None: no limit), with ``Retry-After`` if given."""
        self.rate_limit = rate_per_second
        self.rate_limit_retry_after = retry_after
        self._limiter = _RateLimiter(rate_per_second) if rate_per_second else None

    def fail_next(
        self,
        status: int,
        times: int = 1,
        method: str | None = None,
        path: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        when: Callable[[Any], bool] | None = None,
    ) -> None:
        """Answer ``status`` to the next ``times`` API requests matching method and path prefix
        (and ``when``, a test of the request's parsed JSON body, if given).

        ``body`` is sent as JSON, or as plain text when it is a string; by default it is a
        Customer.io-style ``{"meta": {"error": ...}}``. ``headers`` go with the answer
        (``{"Retry-After": "1"}``).
        """
        if body is None:
            body = {"meta": {"error": f"injected failure {status}"}}
        rule = _Rule(times, method, path, status=status, body=body, headers=headers, when=when)
        self._rules.append(rule)

    def fault_mix(
        self,
        rate: float,
        *,
        seed: int = 0,
        hold: float = 1.0,
        retry_after: str | None = None,
    ) -> None:
        """From now on, answer a ``rate`` share of API requests with one of :data:`FAULT_KINDS`.

        Held answers wait ``hold`` seconds (make it longer than the client's timeout); a 429
        carries ``Retry-After: retry_after`` when given. Scripted rules
        (:meth:`fail_next`) go first. ``rate=0`` turns the mix off.
        """
        self._mix = _FaultMix(rate, seed, hold, retry_after) if rate > 0 else None

    def slow_next(
        self, delay: float, times: int = 1, method: str | None = None, path: str | None = None
    ) -> None:
        """Hold the next ``times`` matching API requests ``delay`` extra seconds."""
        self._rules.append(_Rule(times, method, path, delay=delay))

    def refuse_operations(
        self,
        customer_ids: Collection[str] | None = None,
        *,
        actions: Collection[str] | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        times: int | None = None,
        reason: str = "refused",
        message: str = "operation refused by the fake",
        whole_request: bool = False,
    ) -> None:
        """Refuse the v2 batch operations that match, as a 207 lists an invalid one.

        ``whole_request``: a batch holding a matching operation is refused as a whole instead
        (``400``, nothing applied), as Customer.io answers a request it cannot take at all;
        ``times`` then counts refused requests.

        An operation matches when every condition given holds: one of its identifier values is
        in ``customer_ids``, its action is in ``actions``, ``predicate(operation)`` is true.
        ``times`` operations are refused (None: until :meth:`clear_refusals` or :meth:`reset`).
        The error names ``reason``, ``message`` and the field ``identifiers``; nothing of the
        operation is applied. The rest of the batch is, and v1 requests are unaffected.
        """
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (None: until cleared)")
        self._refusals.append(
            _Refusal(
                None if customer_ids is None else frozenset(customer_ids),
                None if actions is None else frozenset(actions),
                predicate,
                times,
                reason,
                message,
                whole_request,
            )
        )

    def clear_refusals(self) -> None:
        self._refusals = []

    def requests_for(
        self, method: str | None = None, path_prefix: str = ""
    ) -> list[RecordedRequest]:
        """Recorded requests with this method (any when None) whose decoded path starts so."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper()) and r.path.startswith(path_prefix)
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "total": sum(self.counts.values()),
            "by_status": {str(status): n for status, n in sorted(self.counts.items())},
            "operations": dict(self.operations),
        }

    # -- server life cycle -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES * 4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, port: int = 0, ca_file: str | None = None) -> None:
        """Listen on 127.0.0.1 over HTTPS with a fresh test CA written to ``ca_file``."""
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        if ca_file is None:
            self._tmpdir = tempfile.mkdtemp(prefix="fake-cio-")
            ca_file = str(Path(self._tmpdir) / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        self.ca_file = ca_file
        self._closing.clear()
        self._runner = web.AppRunner(self.make_app(), shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        # Binding the socket here tells us the port the system picked for port 0.
        sock = socket.create_server(("127.0.0.1", port))
        self.host = f"127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self._runner, sock, ssl_context=context).start()

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            # Cleanup only starts the TLS goodbye; a client that holds its connection open
            # without reading (a test keeping the package's exception, and with it the
            # answer) would leave the socket open past the test, a ResourceWarning later on.
            for transport in list(self._transports):
                transport.abort()
            self._runner = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- request handling --------------------------------------------------------------

    def _take_rules(self, method: str, path: str, body: Any) -> tuple[float, _Rule | None]:
        delay = 0.0
        failure = None
        for rule in self._rules:
            if rule.times <= 0 or not rule.matches(method, path, body):
                continue
            if rule.delay and not delay:
                delay = rule.delay
                rule.times -= 1
            elif rule.status and failure is None:
                failure = rule
                rule.times -= 1
        self._rules = [r for r in self._rules if r.times > 0]
        return delay, failure

    async def _wait(self, seconds: float) -> None:
        if seconds > 0:
            # Returns early when the server closes, so a held request never delays shutdown.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            self._transports.add(request.transport)
        raw_path = request.rel_url.raw_path
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        path = "/" + "/".join(segments)
        if segments[:1] == ["__fake"]:
            return await self._control(request, segments[1:])

        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None
        auth_ok = hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), self._expected_auth.encode()
        )
        entry = RecordedRequest(request.method, path, raw_path, auth_ok, body, time.monotonic())
        if self.record:
            self.requests.append(entry)

        delay, failure = self._take_rules(request.method, path, body)
        fault = None
        if self._mix is not None and failure is None and auth_ok:
            fault = self._mix.draw(request.method, raw_path, raw)
            if fault is not None:
                self.faults[fault] += 1
        await self._wait(self.latency + delay)
        if failure is not None and isinstance(failure.body, str):
            response = web.Response(text=failure.body, status=failure.status)
        elif failure is not None:
            response = web.json_response(failure.body, status=failure.status)
        elif not auth_ok:
            response = _error(401, "Unauthorized request")
        elif fault in ("429", "500", "503"):
            response = _error(int(fault), f"injected fault {fault}")
            if fault == "429" and self._mix is not None and self._mix.retry_after is not None:
                response.headers["Retry-After"] = self._mix.retry_after
        elif fault == "timeout":
            response = _error(504, "injected timeout")
        elif self._limiter is not None and not self._limiter.allow():
            response = _error(429, "rate limit exceeded")
            if self.rate_limit_retry_after is not None:
                response.headers["Retry-After"] = self.rate_limit_retry_after
        else:
            try:
                response = self._route(request.method, segments, raw, body)
            except _Rejected as rejected:
                response = _error(rejected.status, rejected.message)
        if failure is not None and failure.headers:
            response.headers.update(failure.headers)
        if fault in ("timeout", "applied_timeout") and self._mix is not None:
            # Answered only after the client gave up: applied or not, it saw a timeout.
            await self._wait(self._mix.hold)
        entry.status = response.status
        entry.refused = response.get(REFUSED_KEY, ())
        self.counts[response.status] += 1
        return response

    async def _control(self, request: web.Request, segments: list[str]) -> web.Response:
        if request.method == "GET" and segments == ["stats"]:
            return web.json_response(self.stats())
        if request.method == "POST" and segments == ["reset"]:
            self.reset()
            return web.json_response({})
        if request.method == "DELETE" and segments == ["refuse"]:
            self.clear_refusals()
            return web.json_response({})
        if request.method == "POST" and segments == ["refuse"]:
            try:
                self.refuse_operations(**_refusal_arguments(await request.read()))
            except ValueError as exc:
                return _error(400, str(exc))
            return web.json_response({})
        return _error(404, "not found")

    def _route(self, method: str, segments: list[str], raw: bytes, body: Any) -> web.Response:
        if segments == ["api", "v2", "batch"]:
            try:
                self._require(method, "POST")
                return self._batch(raw, body)
            except _Rejected as rejected:
                return _v2_error(rejected.status, rejected)
        if segments[:2] != ["api", "v1"]:
            raise _Rejected(404, "not found")
        rest = segments[2:]
        if rest == ["accounts", "region"]:
            self._require(method, "GET")
            return web.json_response(
                {
                    "url": REGION_URLS.get(self.data_center, REGION_URLS["us"]),
                    "data_center": self.data_center,
                    "environment_id": self.environment_id,
                }
            )
        if len(raw) > MAX_BODY_BYTES:
            raise _Rejected(400, f"request body cannot be longer than {MAX_BODY_BYTES} bytes")
        if raw and body is None:
            raise _Rejected(400, "invalid JSON body")
        payload = {} if body is None else body
        if not isinstance(payload, dict):
            raise _Rejected(400, "request body must be a JSON object")
        if rest == ["events"]:
            self._require(method, "POST")
            self._track(None, payload)
        elif len(rest) == 2 and rest[0] == "customers":
            self._check_customer_id(rest[1])
            if method == "DELETE":
                self._delete(rest[1])
            else:
                self._require(method, "PUT")
                self._identify(rest[1], payload)
        elif len(rest) == 3 and rest[0] == "customers" and rest[2] == "events":
            self._require(method, "POST")
            self._check_customer_id(rest[1])
            self._track(rest[1], payload)
        else:
            raise _Rejected(404, "not found")
        return web.json_response({})

    @staticmethod
    def _require(method: str, expected: str) -> None:
        if method != expected:
            raise _Rejected(405, "method not allowed")

    @staticmethod
    def _check_customer_id(customer_id: str, field: str = "id") -> None:
        if not customer_id.strip():
            raise _Rejected(400, f"{field} attribute cannot be an empty string", field=field)
        if _utf8_len(customer_id) > MAX_ID_BYTES:
            raise _Rejected(
                400, f"{field} attribute cannot be longer than {MAX_ID_BYTES} bytes", field=field
            )

    def _identify(self, customer_id: str, attributes: dict[str, Any]) -> None:
        if len(attributes) > MAX_ATTRIBUTES_PER_REQUEST:
            raise _Rejected(
                400,
                f"cannot identify more than {MAX_ATTRIBUTES_PER_REQUEST} attributes in one request",
                field="attributes",
            )
        for name, value in attributes.items():
            if _utf8_len(name) > MAX_ATTRIBUTE_NAME_BYTES:
                raise _Rejected(
                    400,
                    f"attribute name cannot be longer than {MAX_ATTRIBUTE_NAME_BYTES} bytes",
                    field="attributes",
                )
            if value is not None and _value_bytes(value) > MAX_ATTRIBUTE_VALUE_BYTES:
                raise _Rejected(
                    400,
                    f"value for attribute '{name[:50]}' cannot be longer than "
                    f"{MAX_ATTRIBUTE_VALUE_BYTES} bytes",
                    field=f"attributes.{name[:50]}",
                )
        self.operations["identify"] += 1
        if not self.record:
            return
        profile = self.customers.setdefault(customer_id, {})
        for name, value in attributes.items():
            if value is None:
                profile.pop(name, None)
            else:
                profile[name] = value
        if customer_id in self.deleted:
            self.deleted.remove(customer_id)

    def _batch(self, raw: bytes, body: Any) -> web.Response:
        if len(raw) >= MAX_BATCH_BYTES:
            raise _Rejected(
                400,
                f"batch request must be smaller than {MAX_BATCH_BYTES} bytes",
                field="batch",
                reason="too_large",
            )
        if raw and body is None:
            raise _Rejected(400, "invalid JSON body")
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise _Rejected(400, "the body must be an object with a batch list", field="batch")
        self._take_whole_request_refusal(body["batch"])
        errors = []
        for index, operation in enumerate(body["batch"]):
            try:
                self._operation(operation)
            except _Rejected as rejected:
                self.operations["refused"] += 1
                errors.append(
                    {
                        "batch_index": index,
                        "reason": rejected.reason,
                        "field": rejected.field,
                        "message": rejected.message,
                    }
                )
        if errors:
            response = web.json_response({"errors": errors}, status=207)
            response[REFUSED_KEY] = tuple(error["batch_index"] for error in errors)
            return response
        return web.json_response({})

    def _operation(self, operation: Any) -> None:
        """Check one v2 batch operation and apply it as its v1 request would be, or raise."""
        if not isinstance(operation, dict):
            raise _Rejected(400, "operation must be an object")
        if _compact_bytes(operation) > MAX_OPERATION_BYTES:
            raise _Rejected(
                400,
                f"operation must be {MAX_OPERATION_BYTES} bytes or smaller",
                reason="too_large",
            )
        self._take_refusal(operation)
        entity_type, action = operation.get("type"), operation.get("action")
        if entity_type in UNMODELLED_TYPES:
            raise _Rejected(400, f"type {entity_type!r} is not modelled by the fake", field="type")
        if entity_type != "person":
            raise _Rejected(400, "type must be one of person, object, delivery", field="type")
        if action in UNMODELLED_ACTIONS:
            raise _Rejected(400, f"action {action!r} is not modelled by the fake", field="action")
        if action not in BATCH_ACTIONS:
            raise _Rejected(400, f"unknown action {action!r} for a person", field="action")
        customer_key = self._person_key(operation.get("identifiers"))
        attributes = operation.get("attributes")
        if action == "delete":
            self._delete(customer_key)
        elif action == "identify":
            if attributes is None:
                attributes = {}
            if not isinstance(attributes, dict):
                raise _Rejected(400, "attributes must be an object", field="attributes")
            self._identify(customer_key, attributes)
        else:
            payload = {key: operation.get(key) for key in ("name", "id", "timestamp")}
            payload.update(type=action, data=attributes)
            self._track(customer_key, payload, data_field="attributes")

    def _take_whole_request_refusal(self, batch: list[Any]) -> None:
        for refusal in self._refusals:
            if refusal.whole_request and any(
                isinstance(operation, dict) and refusal.matches(operation) for operation in batch
            ):
                if refusal.times is not None:
                    refusal.times -= 1
                    if refusal.times <= 0:
                        self._refusals.remove(refusal)
                raise _Rejected(400, refusal.message, field="batch", reason=refusal.reason)

    def _take_refusal(self, operation: dict[str, Any]) -> None:
        for refusal in self._refusals:
            if not refusal.whole_request and refusal.matches(operation):
                if refusal.times is not None:
                    refusal.times -= 1
                    if refusal.times <= 0:
                        self._refusals.remove(refusal)
                raise _Rejected(400, refusal.message, field="identifiers", reason=refusal.reason)

    def _person_key(self, identifiers: Any) -> str:
        """The workspace key of the person named: ``id`` and ``email`` as they are (as a v1
        path would name them), ``cio_id`` prefixed ``cio_`` (v1's way to name one)."""
        if not isinstance(identifiers, dict) or not identifiers:
            raise _Rejected(400, "identifiers must name the person", field="identifiers")
        if len(identifiers) > 1:
            raise _Rejected(400, "you cannot pass multiple identifiers", field="identifiers")
        ((kind, value),) = identifiers.items()
        if kind not in PERSON_IDENTIFIERS:
            raise _Rejected(
                400,
                f"identifiers must hold one of {', '.join(PERSON_IDENTIFIERS)}",
                field="identifiers",
            )
        if not isinstance(value, str):
            raise _Rejected(400, f"{kind} must be a string", field=f"identifiers.{kind}")
        self._check_customer_id(value, field=f"identifiers.{kind}")
        return f"cio_{value}" if kind == "cio_id" else value

    def _delete(self, customer_id: str) -> None:
        self.operations["delete"] += 1
        if not self.record:
            return
        self.customers.pop(customer_id, None)
        if customer_id not in self.deleted:
            self.deleted.append(customer_id)

    def _track(
        self, customer_id: str | None, payload: dict[str, Any], *, data_field: str = "data"
    ) -> None:
        name = payload.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _Rejected(400, "event name must not be blank", field="name")
        event_type = payload.get("type", "event")
        if event_type not in EVENT_TYPES:
            raise _Rejected(400, "event type must be one of event, page, screen", field="type")
        if event_type == "event" and _utf8_len(name) > MAX_EVENT_NAME_BYTES:
            raise _Rejected(
                400, f"event name cannot be longer than {MAX_EVENT_NAME_BYTES} bytes", field="name"
            )
        if len(name) >= MAX_PAGE_NAME_CHARS:
            raise _Rejected(
                400, f"event name must be less than {MAX_PAGE_NAME_CHARS} characters", field="name"
            )
        data = payload.get("data", {})
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise _Rejected(
                400,
                f'event {data_field} must be a hash (e.g., send "{data_field}":{{}} instead of "")',
                field=data_field,
            )
        if _value_bytes(data) > MAX_EVENT_DATA_BYTES:
            raise _Rejected(
                400,
                f"event {data_field} cannot be longer than {MAX_EVENT_DATA_BYTES} bytes",
                field=data_field,
            )
        timestamp = payload.get("timestamp")
        if timestamp is not None and (
            isinstance(timestamp, bool) or not isinstance(timestamp, int)
        ):
            raise _Rejected(400, "timestamp must be a unix timestamp in seconds", field="timestamp")
        event_id = payload.get("id")
        if event_id is not None and not isinstance(event_id, str):
            raise _Rejected(400, "event id must be a string", field="id")
        anonymous_id = payload.get("anonymous_id")
        if customer_id is None and anonymous_id is not None and not isinstance(anonymous_id, str):
            raise _Rejected(400, "anonymous_id must be a string")
        self.operations["anonymous_event" if customer_id is None else "event"] += 1
        # Customer.io deduplicates events on their id: a repeated id is accepted, not stored.
        if not self.record or (event_id is not None and event_id in self._event_ids):
            return
        if event_id is not None:
            self._event_ids.add(event_id)
        self.events.append(
            {
                "customer_id": customer_id,
                "anonymous_id": anonymous_id if customer_id is None else None,
                "type": event_type,
                "name": name,
                "data": data,
                "id": event_id,
                "timestamp": timestamp,
            }
        )


def _refusal_arguments(raw: bytes) -> dict[str, Any]:
    """The keyword arguments of ``refuse_operations`` in a ``POST /__fake/refuse`` body."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ValueError("invalid JSON body") from exc
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - {"customer_ids", "actions", "times", "reason", "message", "whole_request"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    for key in ("customer_ids", "actions"):
        value = body.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{key} must be a list of strings")
    times = body.get("times")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int)):
        raise ValueError("times must be an integer")
    for key in ("reason", "message"):
        if not isinstance(body.get(key, ""), str):
            raise ValueError(f"{key} must be a string")
    if not isinstance(body.get("whole_request", False), bool):
        raise ValueError("whole_request must be a boolean")
    return body


@pytest.fixture
async def fake_cio() -> AsyncIterator[FakeCustomerIO]:
    """A started fake Track API with a clean workspace, closed after the test."""
    fake = FakeCustomerIO()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeCustomerIO(
        args.site_id,
        args.api_key,
        latency=args.latency_ms / 1000.0,
        rate_limit=args.rate_limit or None,
        rate_limit_retry_after=args.rate_limit_retry_after,
        record=False,
    )
    await fake.start(port=args.port, ca_file=args.ca_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {fake.host} {fake.ca_file}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Customer.io Track API for benchmarks")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=float, default=0.0, help="requests/s; 0: none")
    parser.add_argument(
        "--rate-limit-retry-after", default=None, help="Retry-After of the rate limit's 429s"
    )
    parser.add_argument("--ca-file", default=None, help="where to write the test CA (PEM)")
    parser.add_argument("--site-id", default="fake-site-id")
    parser.add_argument("--api-key", default="fake-api-key")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
