"""What the service asked of the fake Track API, whichever transport carried it.

A v1 call is one operation; a ``/api/v2/batch`` request holds many. :func:`operations` turns
both into the same :class:`Call` list, in the order they arrived, with v1-shaped bodies, so
that a test states what Customer.io was asked to do once and runs on both transports.
:func:`identify_requests` scripts a fault for the requests that carry identifies on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fake_customerio import FakeCustomerIO, RecordedRequest

CUSTOMERS = "/api/v1/customers/"
BATCH = "/api/v2/batch"


@dataclass(frozen=True)
class Call:
    kind: str
    """``identify``, ``delete``, ``event``, ``page`` or ``anonymous``."""
    customer_id: str | None
    body: dict[str, Any]
    """Identify: the attributes; an event or page view: the v1 body (``name``, ``data``,
    ``id``, ``timestamp``, ``type`` for a page, ``anonymous_id`` for an anonymous one);
    a deletion: ``{}``."""
    status: int | None
    """The answer to this operation: the v1 call's status; in a batch, the request's, or 207
    for an operation the fake refused (400 for all of a refused request)."""
    batch: int | None = None
    """The position of its request among the batch requests; None for a v1 call."""
    at: float = 0.0
    """When its request arrived (``time.monotonic()``)."""


def _v1(request: RecordedRequest) -> Call | None:
    body = request.body if isinstance(request.body, dict) else {}
    if request.path.startswith(CUSTOMERS):
        rest = request.path[len(CUSTOMERS) :]
        if request.method == "PUT" and "/" not in rest:
            return Call("identify", rest, body, request.status, at=request.at)
        if request.method == "DELETE" and "/" not in rest:
            return Call("delete", rest, {}, request.status, at=request.at)
        customer, _, tail = rest.rpartition("/")
        if request.method == "POST" and tail == "events":
            kind = "page" if body.get("type") == "page" else "event"
            return Call(kind, customer, body, request.status, at=request.at)
    if request.method == "POST" and request.path == "/api/v1/events":
        return Call("anonymous", None, body, request.status, at=request.at)
    return None


def _v2(request: RecordedRequest, position: int) -> list[Call]:
    batch = request.body.get("batch") if isinstance(request.body, dict) else None
    refused = set(request.refused)
    calls = []
    for index, operation in enumerate(batch if isinstance(batch, list) else []):
        customer = (operation.get("identifiers") or {}).get("id")
        action = operation.get("action")
        status = 207 if index in refused else request.status
        if action == "identify":
            attributes = operation.get("attributes", {})
            calls.append(Call("identify", customer, attributes, status, position, request.at))
        elif action == "delete":
            calls.append(Call("delete", customer, {}, status, position, request.at))
        elif action in ("event", "page"):
            body: dict[str, Any] = {
                "name": operation["name"],
                "data": operation.get("attributes", {}),
            }
            if action == "page":
                body["type"] = "page"
            for key in ("id", "timestamp"):
                if key in operation:
                    body[key] = operation[key]
            calls.append(Call(action, customer, body, status, position, request.at))
    return calls


def operations(
    fake: FakeCustomerIO, kind: str | None = None, customer_id: str | None = None
) -> list[Call]:
    """Every operation the fake received (answered or not), in order; filtered by kind and
    customer id when given."""
    calls: list[Call] = []
    position = 0
    for request in fake.requests:
        if request.method == "POST" and request.path == BATCH:
            calls += _v2(request, position)
            position += 1
        elif (call := _v1(request)) is not None:
            calls.append(call)
    return [
        call
        for call in calls
        if (kind is None or call.kind == kind)
        and (customer_id is None or call.customer_id == customer_id)
    ]


def accepted(
    fake: FakeCustomerIO, kind: str | None = None, customer_id: str | None = None
) -> list[Call]:
    """The operations Customer.io accepted (a 2xx for them, not refused in a 207)."""
    return [
        call
        for call in operations(fake, kind, customer_id)
        if call.status is not None and 200 <= call.status < 300 and call.status != 207
    ]


def identify_bodies(fake: FakeCustomerIO, customer_id: str) -> list[dict[str, Any]]:
    """The attributes of every accepted identify for ``customer_id``, in order."""
    return [call.body for call in accepted(fake, "identify", customer_id)]


def requests_made(fake: FakeCustomerIO) -> int:
    """HTTP requests to the Track API (a batch is one)."""
    return sum(1 for r in fake.requests if r.path.startswith("/api/"))


def identify_requests(transport: str) -> dict[str, str]:
    """``fail_next``/``slow_next`` keywords that match the requests carrying identifies: on
    ``batch`` every batch request (with all the users and operations it holds), on ``single``
    the v1 PUTs."""
    return {"path": BATCH} if transport == "batch" else {"method": "PUT"}
