"""Packing operations into /api/v2/batch requests: the byte budget, each user's order, splits."""

from __future__ import annotations

import itertools
import json

import pytest

from connector.outbound.operations import DeleteCustomer, Identify, Operation, Track
from connector.outbound.packing import (
    MAX_OPERATION_BYTES,
    MAX_REQUEST_BYTES,
    encoded_size,
    pack,
    request_size,
    v2_operation,
)


def track(customer_id: str | None, name: str = "Signed Up", **data: object) -> Track:
    return Track(
        name=name,
        data=dict(data),
        timestamp=1_700_000_000,
        id=f"01HULID{name}",
        source_event_id=f"evt-{name}",
        customer_id=customer_id,
        anonymous_id=None if customer_id else "anon-1",
    )


def user_ops(n: int, attributes: int = 3, events: int = 1) -> list[Operation]:
    cid = f"user-{n}"
    identify = Identify(cid, {f"a{i}": f"value {i}" for i in range(attributes)})
    return [identify, *(track(cid, f"E{e}") for e in range(events))]


def encoded(request) -> str:
    return json.dumps({"batch": [entry.body for entry in request.entries]})


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        (
            Identify("u1", {"plan": "pro"}),
            {
                "type": "person",
                "identifiers": {"id": "u1"},
                "action": "identify",
                "attributes": {"plan": "pro"},
            },
        ),
        (
            DeleteCustomer("u1"),
            {"type": "person", "identifiers": {"id": "u1"}, "action": "delete"},
        ),
        (
            track("u1", "Signed Up", plan="pro"),
            {
                "type": "person",
                "identifiers": {"id": "u1"},
                "action": "event",
                "name": "Signed Up",
                "id": "01HULIDSigned Up",
                "timestamp": 1_700_000_000,
                "attributes": {"plan": "pro"},
            },
        ),
        (
            Track(
                name="https://example.com/pricing",
                data={"referrer": "https://google.com"},
                timestamp=None,
                id="01HPAGE",
                source_event_id="evt-page",
                customer_id="u1",
                page=True,
            ),
            {
                "type": "person",
                "identifiers": {"id": "u1"},
                "action": "page",
                "name": "https://example.com/pricing",
                "id": "01HPAGE",
                "attributes": {"referrer": "https://google.com"},
            },
        ),
    ],
    ids=["identify", "delete", "event", "page without timestamp"],
)
def test_v2_operation_forms(operation, expected):
    assert v2_operation(operation) == expected


def test_anonymous_event_has_no_v2_form():
    with pytest.raises(TypeError):
        v2_operation(track(None))


@pytest.mark.parametrize(
    "value", ["plain", "é", "😀", 'quote " and \\ backslash', "\u2028", 12, None, [1, {"a": 2}]]
)
def test_sizes_are_those_of_the_json_the_package_sends(value):
    body = v2_operation(Identify("u1", {"v": value}))
    # requests encodes json= with json.dumps' defaults: ASCII with escapes.
    assert encoded_size(body) == len(json.dumps(body).encode("utf-8"))
    assert request_size([encoded_size(body)] * 3) == len(json.dumps({"batch": [body] * 3}))


@pytest.mark.parametrize("users", [1, 7, 400])
def test_every_request_stays_within_the_budget_and_keeps_each_users_order(users):
    packing = pack(
        [(f"id-{n}", user_ops(n, attributes=20, events=2)) for n in range(users)],
        max_bytes=20_000,
        max_operations=50,
    )
    seen: dict[str, list[Operation]] = {}
    for request in packing.requests:
        assert len(encoded(request)) == request.size <= 20_000
        assert len(request.entries) <= 50
        for entry in request.entries:
            seen.setdefault(entry.user_id, []).append(entry.operation)
    assert seen == {f"id-{n}": user_ops(n, attributes=20, events=2) for n in range(users)}
    # Users are never cut in two when they fit in a request of their own.
    owners = [{entry.user_id for entry in request.entries} for request in packing.requests]
    for a, b in itertools.pairwise(owners):
        assert not a & b
    assert all(request.after is None for request in packing.requests)


def test_a_user_that_does_not_fit_what_is_left_starts_the_next_request():
    small = [("a", user_ops(1, attributes=1, events=0))]
    big = [("b", user_ops(2, attributes=30, events=3))]
    one_big = pack(big, max_bytes=100_000, max_operations=1000).requests[0].size
    packing = pack(small + big, max_bytes=one_big, max_operations=1000)
    assert [[e.user_id for e in r.entries] for r in packing.requests] == [["a"], ["b"] * 4]


def test_operation_count_limit_closes_a_request():
    packing = pack(
        [(f"id-{n}", user_ops(n, attributes=1, events=1)) for n in range(5)],
        max_bytes=400_000,
        max_operations=4,
    )
    assert [len(r.entries) for r in packing.requests] == [4, 4, 2]


def test_a_user_larger_than_a_request_spans_consecutive_requests_sent_in_order():
    operations = [Identify("u", {f"a{i}": "x" * 900}) for i in range(12)]
    packing = pack([("u", operations), ("v", user_ops(3))], max_bytes=5_000, max_operations=100)
    assert len(packing.requests) > 1
    assert [e.operation for r in packing.requests for e in r.entries if e.user_id == "u"] == (
        operations
    )
    # Each request holding a continuation waits for the one before it.
    assert packing.requests[0].after is None
    assert [r.after for r in packing.requests[1:]] == list(range(len(packing.requests) - 1))


def test_an_identify_over_32_kb_is_split_in_attribute_order():
    attributes = {f"attr_{i:02}": "😀" * 240 for i in range(30)}  # ~2.9 KB each, escaped
    operation = Identify("u", attributes)
    assert encoded_size(v2_operation(operation)) > MAX_OPERATION_BYTES
    packing = pack([("u", [operation, track("u")])], max_bytes=450_000, max_operations=1000)
    entries = [e for r in packing.requests for e in r.entries]
    identifies = [e.operation for e in entries if isinstance(e.operation, Identify)]
    assert len(identifies) > 1
    assert all(e.size <= MAX_OPERATION_BYTES for e in entries)
    merged: dict[str, object] = {}
    for part in identifies:
        merged.update(part.attributes)
    assert list(merged) == list(attributes) and merged == attributes
    assert isinstance(entries[-1].operation, Track)
    assert packing.left_out == {}


def test_an_attribute_that_cannot_fit_any_operation_is_left_out_with_its_reason():
    operation = Identify("u", {"ok": "fine", "huge": "x" * 40_000, "also_ok": 1})
    packing = pack([("u", [operation])], max_bytes=450_000, max_operations=1000)
    sent = {}
    for entry in packing.requests[0].entries:
        sent.update(entry.operation.attributes)
    assert sent == {"ok": "fine", "also_ok": 1}
    assert list(packing.left_out) == ["u"]
    assert "32 KB" in packing.left_out["u"]["huge"]


def test_anonymous_events_and_events_over_32_kb_go_to_v1_in_order():
    anonymous = [track(None, "A1"), track(None, "A2")]
    oversized = track("u", "Huge", blob="x" * 40_000)
    packing = pack(
        [("anon", anonymous), ("u", [Identify("u", {"a": 1}), oversized, track("u", "Small")])],
        max_bytes=450_000,
        max_operations=1000,
    )
    assert packing.v1 == [("anon", anonymous[0]), ("anon", anonymous[1]), ("u", oversized)]
    assert [
        e.operation.name for e in packing.requests[0].entries if isinstance(e.operation, Track)
    ] == ["Small"]


@pytest.mark.parametrize(
    ("value", "error"),
    [(object(), "TypeError"), (float("inf"), "ValueError"), (float("nan"), "ValueError")],
)
def test_a_user_whose_operations_cannot_be_encoded_is_set_aside_alone(value, error):
    packing = pack(
        [("bad", [Identify("bad", {"x": value})]), ("good", user_ops(1))],
        max_bytes=450_000,
        max_operations=1000,
    )
    assert packing.unpackable == {"bad": error}
    assert {e.user_id for r in packing.requests for e in r.entries} == {"good"}


@pytest.mark.parametrize("max_bytes", [MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 1])
def test_the_budget_stays_under_customerios_limit(max_bytes):
    with pytest.raises(ValueError, match="under 500000"):
        pack([], max_bytes=max_bytes, max_operations=10)


def test_nothing_to_pack_makes_no_request():
    assert pack([("u", [])], max_bytes=1000, max_operations=10).requests == []
