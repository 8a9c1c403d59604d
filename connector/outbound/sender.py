"""Carries out planned operations against Customer.io's Track API with the ``customerio`` package.

The package is synchronous, so calls run in a bounded thread pool, each worker thread with
its own client (a ``requests`` session is not meant to be shared between threads). Every
request first waits for a token from the shared :class:`TokenBucket`; a 429 pauses that
bucket (``Retry-After`` when Customer.io sends one, else a growing backoff), so the whole pass
slows down instead of piling more requests onto a busy workspace.

The package's exceptions embed the request payload (``"{status}: {url} {data} {text}"``):
their text is never logged or returned. Results carry the status and at most a short,
sanitised part of Customer.io's answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import requests
from customerio import CustomerIO, CustomerIOException, Regions
from urllib3.util.retry import Retry

from connector.config import CustomerioConfig, SyncConfig
from connector.ops.metrics import Metrics
from connector.outbound.operations import (
    BatchResult,
    DeleteCustomer,
    Identify,
    Operation,
    SendResult,
    Track,
    operation_name,
)
from connector.outbound.ratelimit import TokenBucket
from connector.rules.delivery import SendOutcome, classify_status, parse_retry_after, throttle_pause

REGIONS = {"us": Regions.US, "eu": Regions.EU}
MAX_DETAIL_CHARS = 200
# Customer.io's error bodies are a few hundred bytes; never scan a huge payload echo for one.
_MAX_BODY_SCAN_CHARS = 4096
_STATUS_PREFIX = re.compile(r"^(\d{3}): ")
_RETRY_ERROR_STATUS = re.compile(r"too many (\d{3}) error responses")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
# Keyword names ``CustomerIO.identify`` takes for itself: such attributes go as a raw body.
_IDENTIFY_RESERVED = frozenset({"self", "id"})


@dataclass(frozen=True)
class CredentialCheck:
    """The answer of ``GET /api/v1/accounts/region`` for the configured credentials."""

    ok: bool
    region: str | None = None
    reason: str | None = None
    unauthorized: bool = False


def parse_track_host(track_host: str) -> tuple[str | None, int | None]:
    """``"host[:port]"`` → ``(host, port)``; empty → ``(None, None)`` (the region's host)."""
    if not track_host:
        return None, None
    host, sep, port = track_host.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return track_host, None


def _sanitise(text: str) -> str:
    text = _CONTROL_CHARS.sub(" ", text).strip()
    if len(text) > MAX_DETAIL_CHARS:
        return text[: MAX_DETAIL_CHARS - 1] + "…"
    return text


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _error_detail(body: Any) -> str | None:
    """Customer.io's own error text from a JSON answer (``meta.error``, ``errors``...)."""
    if not isinstance(body, dict):
        return None
    meta = body.get("meta")
    candidates = [body.get("errors"), body.get("error")]
    if isinstance(meta, dict):
        candidates[:0] = [meta.get("error"), meta.get("errors")]
    for found in candidates:
        if isinstance(found, str) and found.strip():
            return _sanitise(found)
        if isinstance(found, list) and found:
            parts = [
                item if isinstance(item, str) else json.dumps(item, sort_keys=True)
                for item in found
            ]
            return _sanitise("; ".join(parts))
        if isinstance(found, dict) and found:
            return _sanitise(json.dumps(found, sort_keys=True))
    return None


def _response_json(message: str) -> Any:
    """The JSON answer at the end of a package error message, or None.

    The message is ``"{status}: {url} {data} {text}"``: the answer is the longest JSON suffix.
    Scanning from the right, the first opening bracket whose value ends the message is the
    answer's own (a nested one is followed by its parent's closing bracket).
    """
    tail = message[-_MAX_BODY_SCAN_CHARS:].rstrip()
    decoder = json.JSONDecoder()
    position = len(tail)
    while True:
        position = max(tail.rfind("{", 0, position), tail.rfind("[", 0, position))
        if position < 0:
            return None
        try:
            value, end = decoder.raw_decode(tail, position)
        except ValueError:
            continue
        if end == len(tail):
            return value


def _transport_result(error: BaseException) -> SendResult:
    if isinstance(error, requests.exceptions.RetryError):
        # Only with the package's own Retry mounted: urllib3 gave up on a status.
        match = _RETRY_ERROR_STATUS.search(str(error))
        if match:
            status = int(match.group(1))
            return SendResult(classify_status(status), status, f"HTTP {status}")
        return SendResult(SendOutcome.RETRY, None, "retries exhausted")
    if isinstance(error, requests.exceptions.Timeout):
        return SendResult(SendOutcome.RETRY, None, "timeout")
    if isinstance(error, requests.exceptions.SSLError):
        return SendResult(SendOutcome.RETRY, None, "TLS error")
    if isinstance(error, requests.exceptions.ConnectionError):
        return SendResult(SendOutcome.RETRY, None, "connection error")
    if isinstance(error, requests.exceptions.RequestException):
        return SendResult(SendOutcome.RETRY, None, f"request error ({type(error).__name__})")
    return SendResult(SendOutcome.FAIL, None, f"invalid request ({type(error).__name__})")


def result_from_exception(exc: CustomerIOException) -> SendResult:
    """Classify a package error without letting any of the request payload through."""
    message = str(exc)
    match = _STATUS_PREFIX.match(message)
    if match:
        status = int(match.group(1))
        detail = _error_detail(_response_json(message))
        reason = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
        return SendResult(classify_status(status), status, reason)
    if exc.__cause__ is not None:
        return _transport_result(exc.__cause__)
    # The package's own argument checks ("customer_id cannot be blank in track").
    return SendResult(SendOutcome.FAIL, None, "invalid request")


class _Backpressure:
    """When to pause after a 429: each pause grows while 429s keep coming, a success resets it.

    Answers to requests that were sent before the current pause ends say nothing new (they
    were on their way when it began), so a burst of them pauses once, not once each.
    """

    def __init__(self, base: float, cap: float):
        self._base = base
        self._cap = cap
        self._consecutive = 0
        self._paused_until = float("-inf")

    def throttled(self, sent_at: float, retry_after: float | None) -> float | None:
        """The pause this 429 calls for (seconds from now), or None when one is under way."""
        if sent_at < self._paused_until:
            return None
        self._consecutive += 1
        pause = throttle_pause(retry_after, self._consecutive, self._base, self._cap)
        self._paused_until = time.monotonic() + pause
        return pause

    def answered(self, sent_at: float) -> None:
        if sent_at >= self._paused_until:
            self._consecutive = 0


class CustomerIOSender:
    """The :class:`~connector.outbound.operations.Sender` for the real Track API."""

    def __init__(
        self,
        site_id: str,
        api_key: str,
        region: str,
        config: CustomerioConfig,
        *,
        concurrency: int,
        bucket: TokenBucket,
        throttle_base_seconds: float = 1.0,
        throttle_max_seconds: float = 60.0,
        metrics: Metrics | None = None,
    ):
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}: expected one of {sorted(REGIONS)}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if config.ca_file and not os.path.isfile(config.ca_file):
            # Caught here, not per request: requests would fail every call with an OSError.
            raise ValueError(f"customerio.ca_file {config.ca_file!r} is not a file")
        self.site_id = site_id
        self.api_key = api_key
        self.region = region
        self.config = config
        self.concurrency = concurrency
        self.bucket = bucket
        self._host, self._port = parse_track_host(config.track_host)
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="customerio")
        self._slots = asyncio.Semaphore(concurrency)
        self._local = threading.local()
        self._clients: list[CustomerIO] = []
        self._clients_lock = threading.Lock()
        self._closed = False
        self._backpressure = _Backpressure(throttle_base_seconds, throttle_max_seconds)
        self._latency = (metrics or Metrics()).track_request_seconds

    @classmethod
    def from_config(
        cls,
        site_id: str,
        api_key: str,
        region: str,
        customerio: CustomerioConfig,
        sync: SyncConfig,
        *,
        bucket: TokenBucket | None = None,
        metrics: Metrics | None = None,
    ) -> CustomerIOSender:
        """A sender paced by ``bucket``; without one, by a bucket of the whole rate limit."""
        return cls(
            site_id,
            api_key,
            region,
            customerio,
            concurrency=sync.concurrency,
            bucket=TokenBucket(sync.rate_limit_per_second) if bucket is None else bucket,
            throttle_base_seconds=sync.backoff_base_seconds,
            throttle_max_seconds=sync.backoff_max_seconds,
            metrics=metrics,
        )

    def _new_client(self) -> CustomerIO:
        client = CustomerIO(
            site_id=self.site_id,
            api_key=self.api_key,
            host=self._host,
            port=self._port,
            region=REGIONS[self.region],
            retries=0,
            timeout=self.config.timeout_seconds,
            use_connection_pooling=True,
        )
        session = client.http
        # Retries belong to the sync (backoff across runs), never to the transport. The
        # package mounts Retry(total=0, status_forcelist=5xx), which still makes one request
        # but turns a 5xx into a bodiless RetryError and a read timeout into a
        # ConnectionError; requests' own default keeps the status, body and ReadTimeout.
        session.get_adapter(client.base_url).max_retries = Retry(0, read=False)
        # The package's error keeps no headers: note Retry-After (this thread's last answer).
        session.hooks["response"].append(self._note_answer)
        if self.config.ca_file:
            session.verify = self.config.ca_file
            # With trust_env, REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE would override session.verify
            # on every request; keep the proxies the environment asks for.
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(client.base_url)
        return client

    def _note_answer(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._local.retry_after = response.headers.get("Retry-After")

    def _client(self) -> CustomerIO:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    async def _run(self, call: Callable[[CustomerIO], Any]) -> Any:
        if self._closed:
            raise RuntimeError("sender is closed")
        loop = asyncio.get_running_loop()
        # The slot is taken before the token, so a token is spent only when a worker is
        # free to use it at once: queued requests cannot burst past the rate later.
        async with self._slots:
            await self.bucket.acquire()
            return await loop.run_in_executor(self._executor, lambda: call(self._client()))

    @staticmethod
    def _call_for(operation: Operation) -> Callable[[CustomerIO], requests.Response]:
        if isinstance(operation, Identify):
            attributes = operation.attributes
            if _IDENTIFY_RESERVED.isdisjoint(attributes):
                return lambda c: c.identify(id=operation.customer_id, **attributes)
            return lambda c: c.send_request(
                "PUT", c.get_customer_query_string(operation.customer_id), attributes
            )
        if isinstance(operation, DeleteCustomer):
            return lambda c: c.delete(operation.customer_id)
        if isinstance(operation, Track):
            if operation.customer_id and not operation.page:
                return lambda c: c.track(
                    operation.customer_id,
                    operation.name,
                    operation.data,
                    id=operation.id,
                    timestamp=operation.timestamp,
                )
            payload = track_payload(operation)
            if operation.customer_id:
                return lambda c: c.send_request(
                    "POST", c.get_event_query_string(operation.customer_id), payload
                )
            return lambda c: c.send_request("POST", c.get_events_query_string(), payload)
        raise TypeError(f"not an operation: {type(operation).__name__}")

    async def _attempt(
        self, call: Callable[[CustomerIO], requests.Response], label: str
    ) -> tuple[SendResult, requests.Response | None]:
        """One request: its result (a 429 pauses the bucket) and, on a 2xx, the response."""
        latency = self._latency.labels(label)

        def attempt(
            client: CustomerIO,
        ) -> tuple[SendResult, requests.Response | None, float, str | None]:
            self._local.retry_after = None
            sent_at = time.monotonic()
            try:
                response = call(client)
            except CustomerIOException as exc:
                latency.observe(time.monotonic() - sent_at)
                return result_from_exception(exc), None, sent_at, self._local.retry_after
            latency.observe(time.monotonic() - sent_at)
            return SendResult(SendOutcome.OK, response.status_code), response, sent_at, None

        result, response, sent_at, retry_after = await self._run(attempt)
        if result.outcome is not SendOutcome.THROTTLED:
            self._backpressure.answered(sent_at)
            return result, response
        pause = self._backpressure.throttled(sent_at, parse_retry_after(retry_after))
        if pause is not None:
            self.bucket.pause(pause)
        return replace(result, retry_after=pause or 0.0), None

    async def send(self, operation: Operation) -> SendResult:
        result, _ = await self._attempt(self._call_for(operation), operation_name(operation))
        return result

    async def send_batch(self, operations: list[dict[str, Any]]) -> BatchResult:
        """``POST /api/v2/batch`` with ``operations`` (one token of the rate limit).

        A 207 names the operations Customer.io refused (``errors[].batch_index``) and the
        reason; the others were applied.
        """
        result, response = await self._attempt(lambda c: c.batch(operations), "batch")
        refused = batch_errors(response) if response is not None else {}
        return BatchResult(result, refused)

    def _region_call(self, client: CustomerIO) -> CredentialCheck:
        try:
            response = client.http.get(f"{client.base_url}/accounts/region", timeout=client.timeout)
        except requests.exceptions.RequestException as exc:
            return CredentialCheck(ok=False, reason=_transport_result(exc).reason)
        status = response.status_code
        outcome = classify_status(status)
        if outcome is SendOutcome.UNAUTHORIZED:
            return CredentialCheck(ok=False, reason="Invalid credentials", unauthorized=True)
        try:
            body = response.json()
        except ValueError:
            body = None
        if outcome is not SendOutcome.OK:
            # "HTTP 500 Internal Server Error": the words Hull's connector shows too.
            with_phrase = f"HTTP {status} {_phrase(status)}".rstrip()
            detail = _error_detail(body)
            reason = f"{with_phrase}: {detail}" if detail else with_phrase
            return CredentialCheck(ok=False, reason=reason)
        region = body.get("data_center") if isinstance(body, dict) else None
        if not isinstance(region, str):
            return CredentialCheck(ok=True, reason="region not reported")
        reason = None
        if region != self.region:
            reason = f"the workspace is in the {region} region, configured {self.region}"
        return CredentialCheck(ok=True, region=region, reason=reason)

    async def check_credentials(self) -> CredentialCheck:
        """Ask Customer.io which region these credentials belong to (401: they are wrong)."""
        return await self._run(self._region_call)

    async def close(self) -> None:
        """Wait for calls in flight, then close every worker's HTTP session."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def batch_errors(response: requests.Response) -> dict[int, str]:
    """Operation index → Customer.io's reason, from a 207's ``errors`` list (short, sanitised)."""
    if response.status_code != 207:
        return {}
    try:
        body = response.json()
    except ValueError:
        body = None
    errors = body.get("errors") if isinstance(body, dict) else None
    refused: dict[int, str] = {}
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        index = error.get("batch_index")
        if not isinstance(index, int) or isinstance(index, bool):
            continue
        words = [
            str(error[key])
            for key in ("reason", "field", "message")
            if isinstance(error.get(key), str | int) and str(error[key]).strip()
        ]
        refused[index] = _sanitise("HTTP 207: " + (": ".join(words) or "refused"))
    return refused


def track_payload(operation: Track) -> dict[str, Any]:
    """The Track API v1 body of a page view or anonymous event (what ``track()`` cannot build)."""
    payload: dict[str, Any] = {"name": operation.name, "data": operation.data or {}}
    if operation.page:
        payload["type"] = "page"
    if operation.id:
        payload["id"] = operation.id
    if operation.timestamp is not None:
        payload["timestamp"] = operation.timestamp
    if operation.customer_id is None and operation.anonymous_id:
        payload["anonymous_id"] = operation.anonymous_id
    return payload


class DryRunSender:
    """Answers OK to everything without any network, keeping what it was asked to send."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    async def send(self, operation: Operation) -> SendResult:
        self.operations.append(operation)
        return SendResult(SendOutcome.OK, None, "dry run")

    async def send_batch(self, operations: list[dict[str, Any]]) -> BatchResult:
        return BatchResult(SendResult(SendOutcome.OK, None, "dry run"))

    async def close(self) -> None:
        return None
