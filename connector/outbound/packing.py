"""Packing planned operations of many users into Track API v2 ``/api/v2/batch`` requests.

Pure rules, no I/O. Customer.io takes a request under 500 KB whose operations are 32 KB or
less each; :func:`pack` fills requests up to ``max_bytes`` (measured on the JSON exactly as the
``customerio`` package encodes it) and ``max_operations``:

- a user's operations stay in order and together, in one request whenever they fit: a user
  that does not fit in what is left of a request starts the next one; only a user whose
  operations do not fit in an empty request spans several (consecutive, sent in order);
- an identify operation over :data:`MAX_OPERATION_BYTES` is split into several with fewer
  attributes; an attribute that cannot fit in an operation on its own is left out, with its
  reason (like the other limits);
- operations with no v2 form go back to the caller (:attr:`Packing.v1`): anonymous events,
  and an event over :data:`MAX_OPERATION_BYTES` (the v1 endpoint takes up to 100 KB).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from connector.outbound.operations import DeleteCustomer, Identify, Operation, Track

MAX_REQUEST_BYTES: Final = 500_000
"""Customer.io refuses a whole request of this size or more."""
MAX_OPERATION_BYTES: Final = 32_000
"""Customer.io refuses one operation over this (and accepts the others)."""

_REQUEST_OPEN: Final = '{"batch": ['
_REQUEST_CLOSE: Final = "]}"
_SEPARATOR: Final = ", "
_EMPTY_REQUEST_BYTES: Final = len(_REQUEST_OPEN) + len(_REQUEST_CLOSE)

OPERATION_TOO_LARGE = "over Customer.io's 32 KB limit for one batch operation"


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as the ``customerio`` package sends it (``requests``' ``json=``:
    ``json.dumps`` with its default separators and ``ensure_ascii``, so ASCII only)."""
    # NaN and Infinity have no JSON form: requests refuses them (the package only turns NaN
    # into null), which would fail the whole request; refused here, they set one user aside.
    return len(json.dumps(value, allow_nan=False))


def request_size(operation_sizes: Iterable[int]) -> int:
    """Bytes of ``{"batch": [...]}`` holding operations of these encoded sizes."""
    sizes = list(operation_sizes)
    return _EMPTY_REQUEST_BYTES + sum(sizes) + len(_SEPARATOR) * max(len(sizes) - 1, 0)


def v2_operation(operation: Operation) -> dict[str, Any]:
    """The ``/api/v2/batch`` form of an operation for a customer (not an anonymous event)."""
    if isinstance(operation, Identify):
        return {
            "type": "person",
            "identifiers": {"id": operation.customer_id},
            "action": "identify",
            "attributes": operation.attributes,
        }
    if isinstance(operation, DeleteCustomer):
        return {
            "type": "person",
            "identifiers": {"id": operation.customer_id},
            "action": "delete",
        }
    if isinstance(operation, Track) and operation.customer_id is not None:
        body: dict[str, Any] = {
            "type": "person",
            "identifiers": {"id": operation.customer_id},
            "action": "page" if operation.page else "event",
            "name": operation.name,
            "id": operation.id,
            "attributes": operation.data or {},
        }
        if operation.timestamp is not None:
            body["timestamp"] = operation.timestamp
        return body
    raise TypeError(f"no v2 batch form: {operation!r}")


@dataclass(frozen=True)
class Entry:
    """One v2 operation in a request: whose it is, what it carries out, and its bytes."""

    user_id: str
    operation: Operation
    body: dict[str, Any]
    size: int


@dataclass
class BatchRequest:
    entries: list[Entry] = field(default_factory=list)
    after: int | None = None
    """The index of an earlier request that must be answered first: it holds the start of a
    user whose operations continue here."""

    @property
    def size(self) -> int:
        return request_size(entry.size for entry in self.entries)

    @property
    def users(self) -> int:
        return len({entry.user_id for entry in self.entries})


@dataclass
class Packing:
    requests: list[BatchRequest] = field(default_factory=list)
    v1: list[tuple[str, Operation]] = field(default_factory=list)
    """(user id, operation) that go to the v1 endpoints instead, in each user's order."""
    left_out: dict[str, dict[str, str]] = field(default_factory=dict)
    """User id → attributes left out of its identify operations, with the reason."""
    unpackable: dict[str, str] = field(default_factory=dict)
    """User id → the type of the error its operations raised when encoded."""


def _entry(user_id: str, operation: Operation) -> Entry:
    body = v2_operation(operation)
    return Entry(user_id, operation, body, encoded_size(body))


def _identify_entries(
    user_id: str, operation: Identify, limit: int, left_out: dict[str, str]
) -> list[Entry]:
    """``operation`` as entries of at most ``limit`` bytes each, in attribute order."""
    entry = _entry(user_id, operation)
    if entry.size <= limit:
        return [entry]
    names = list(operation.attributes)
    if len(names) == 1:
        size = entry.size
        left_out[names[0]] = f"the attribute makes a {size}-byte operation, {OPERATION_TOO_LARGE}"
        return []
    half = len(names) // 2
    parts = (names[:half], names[half:])
    entries: list[Entry] = []
    for part in parts:
        attributes = {name: operation.attributes[name] for name in part}
        entries += _identify_entries(
            user_id, Identify(operation.customer_id, attributes), limit, left_out
        )
    return entries


def user_entries(
    user_id: str, operations: Sequence[Operation], *, operation_limit: int = MAX_OPERATION_BYTES
) -> tuple[list[Entry], list[Operation], dict[str, str]]:
    """A user's operations as v2 entries (in order), those for the v1 endpoints, and the
    attributes left out because no operation could hold them."""
    entries: list[Entry] = []
    v1: list[Operation] = []
    left_out: dict[str, str] = {}
    for operation in operations:
        if isinstance(operation, Track) and operation.customer_id is None:
            v1.append(operation)
        elif isinstance(operation, Identify):
            entries += _identify_entries(user_id, operation, operation_limit, left_out)
        else:
            entry = _entry(user_id, operation)
            if entry.size > operation_limit:
                v1.append(operation)
            else:
                entries.append(entry)
    return entries, v1, left_out


def pack(
    users: Iterable[tuple[str, Sequence[Operation]]],
    *,
    max_bytes: int,
    max_operations: int,
    operation_limit: int = MAX_OPERATION_BYTES,
) -> Packing:
    """Requests for the operations of ``users`` (user id, operations in order).

    A user whose operations cannot be encoded is left out of every request and named in
    :attr:`Packing.unpackable`, with the type of the error: the others are packed.
    """
    if max_bytes >= MAX_REQUEST_BYTES:
        raise ValueError(f"max_bytes must stay under {MAX_REQUEST_BYTES}")
    if max_operations < 1:
        raise ValueError("max_operations must be at least 1")
    operation_limit = min(operation_limit, max_bytes - _EMPTY_REQUEST_BYTES)
    packing = Packing()
    current = BatchRequest()
    current_bytes = _EMPTY_REQUEST_BYTES

    def close() -> None:
        nonlocal current, current_bytes
        if current.entries:
            packing.requests.append(current)
        current = BatchRequest()
        current_bytes = _EMPTY_REQUEST_BYTES

    def add(entry: Entry) -> None:
        nonlocal current_bytes
        if current.entries:
            current_bytes += len(_SEPARATOR)
        current.entries.append(entry)
        current_bytes += entry.size

    def fits(sizes: Sequence[int]) -> bool:
        separators = len(sizes) - (0 if current.entries else 1)
        return (
            len(current.entries) + len(sizes) <= max_operations
            and current_bytes + sum(sizes) + len(_SEPARATOR) * separators <= max_bytes
        )

    for user_id, operations in users:
        try:
            entries, v1, left_out = user_entries(
                user_id, operations, operation_limit=operation_limit
            )
        except (TypeError, ValueError) as exc:  # a value json cannot encode
            packing.unpackable[user_id] = type(exc).__name__
            continue
        packing.v1 += [(user_id, operation) for operation in v1]
        if left_out:
            packing.left_out[user_id] = left_out
        if not entries:
            continue
        sizes = [entry.size for entry in entries]
        if not fits(sizes):
            close()
        if fits(sizes):
            for entry in entries:
                add(entry)
            continue
        # Larger than an empty request: spread over consecutive requests, sent in order.
        for entry in entries:
            if not fits([entry.size]):
                close()
                current.after = len(packing.requests) - 1
            add(entry)
    close()
    return packing
