"""Carrying out the planned operations of many users with ``/api/v2/batch`` requests.

:func:`~connector.outbound.packing.pack` decides what goes in which request; this sends them
(each one token of the rate limit, through the sender's slots) and answers, per user, the
result of every operation in order. What Customer.io's answer means for each operation:

- ``200``: every operation done; ``207``: those listed in ``errors`` failed with
  Customer.io's reason, the others done;
- ``400`` (or ``413``) for the whole request: the request is split in halves that are sent
  again, so one bad operation fails alone and never blocks its neighbours (at most
  :data:`MAX_SPLIT_REQUESTS` extra requests for one packed request);
- ``429``: sent again after the sender's pause, up to ``THROTTLE_RESENDS`` times; then, like
  a 5xx or a timeout, every operation of the request gets that result (its users retry);
- ``401``: the pass stops; operations not answered are ``UNAUTHORIZED``.

Operations with no v2 form (anonymous events, an event over 32 KB) go to the v1 endpoints,
each user's in order, after its batched operations.

A user's operations keep their order across requests: once one of them gets an answer after
which the v1 transport would stop (a retry, a failed identify or deletion), its operations in
later requests are not sent this pass (:func:`holds_back`); the user resumes with them later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from connector.ops.metrics import Metrics
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    Operation,
    Sender,
    SendResult,
    operation_name,
)
from connector.outbound.packing import BatchRequest, Entry, pack
from connector.rules.delivery import THROTTLE_RESENDS, SendOutcome

MAX_SPLIT_REQUESTS = 64
"""Extra requests a packed request may be split into after 400s before the rest fails."""
_SPLIT_STATUSES = frozenset({400, 413})
_NOT_SENT = SendResult(SendOutcome.UNAUTHORIZED, None, "not sent: the pass stopped")

Results = dict[str, list[tuple[Operation, SendResult]]]
"""User id → each operation carried out for it (identify chunks as sent), with its result."""


@dataclass
class Delivery:
    """What :meth:`BatchDelivery.deliver` did for a set of users."""

    results: Results = field(default_factory=dict)
    left_out: dict[str, dict[str, str]] = field(default_factory=dict)
    """User id → attributes no operation could hold, with the reason."""
    unpackable: dict[str, str] = field(default_factory=dict)
    """User id → the error type its operations raised when encoded (nothing sent for it)."""
    requests: int = 0
    """HTTP requests made: batch requests (resends and splits included) and v1 calls."""
    batch_requests: int = 0
    batch_users: int = 0
    """The users of each batch request, summed (users per request = this / batch_requests)."""
    held_back: set[str] = field(default_factory=set)
    """Users whose operations stop here, as the v1 transport would stop them (an answer to
    retry, a failed identify or deletion): their operations in later requests are not sent."""

    def add(self, entry_user: str, operation: Operation, result: SendResult) -> None:
        self.results[entry_user].append((operation, result))
        if holds_back(operation, result):
            self.held_back.add(entry_user)


def holds_back(operation: Operation, result: SendResult) -> bool:
    """Whether the rest of a user's operations wait after this answer to one of them."""
    if result.ok:
        return False
    if result.outcome is SendOutcome.FAIL:
        return isinstance(operation, Identify | DeleteCustomer)
    return True


class BatchDelivery:
    """Sends the operations of one slice of users; ``record`` is called with every answer."""

    def __init__(
        self,
        sender: Sender,
        *,
        max_bytes: int,
        max_operations: int,
        stop: asyncio.Event,
        metrics: Metrics,
        record: Callable[[SendResult], None],
    ):
        self._sender = sender
        self._max_bytes = max_bytes
        self._max_operations = max_operations
        self._stop = stop
        self._metrics = metrics
        self._record = record

    async def deliver(self, users: Sequence[tuple[str, Sequence[Operation]]]) -> Delivery:
        packing = pack(users, max_bytes=self._max_bytes, max_operations=self._max_operations)
        delivery = Delivery(left_out=packing.left_out, unpackable=packing.unpackable)
        for user_id, _ in users:
            if user_id not in packing.unpackable:
                delivery.results[user_id] = []
        answered = [asyncio.Event() for _ in packing.requests]

        async def one(index: int, request: BatchRequest) -> None:
            try:
                entries = request.entries
                if request.after is not None:
                    await answered[request.after].wait()
                    # A user whose earlier operations were held back goes no further.
                    entries = [e for e in entries if e.user_id not in delivery.held_back]
                if entries:
                    await self._send(entries, delivery, [MAX_SPLIT_REQUESTS])
            finally:
                answered[index].set()

        await asyncio.gather(*(one(i, request) for i, request in enumerate(packing.requests)))
        by_user: dict[str, list[Operation]] = {}
        for user_id, operation in packing.v1:
            by_user.setdefault(user_id, []).append(operation)
        await asyncio.gather(
            *(
                self._send_v1(user_id, operations, delivery)
                for user_id, operations in by_user.items()
            )
        )
        return delivery

    async def _send(self, entries: list[Entry], delivery: Delivery, splits: list[int]) -> None:
        if self._stop.is_set():
            self._settle(entries, delivery, _NOT_SENT)
            return
        answer = None
        for _ in range(THROTTLE_RESENDS + 1):
            answer = await self._sender.send_batch([entry.body for entry in entries])
            delivery.requests += 1
            delivery.batch_requests += 1
            delivery.batch_users += len({entry.user_id for entry in entries})
            self._record(answer.result)
            self._metrics.api_calls.labels("batch", str(answer.result.status or 0)).inc()
            if answer.result.outcome is not SendOutcome.THROTTLED:
                break
        assert answer is not None
        result = answer.result
        if result.outcome is SendOutcome.UNAUTHORIZED:
            self._stop.set()
        if result.ok:
            for index, entry in enumerate(entries):
                reason = answer.refused.get(index)
                outcome = SendResult(SendOutcome.FAIL, 207, reason) if reason else result
                delivery.add(entry.user_id, entry.operation, outcome)
            return
        if (
            result.outcome is SendOutcome.FAIL
            and result.status in _SPLIT_STATUSES
            and len(entries) > 1
            and splits[0] >= 2
        ):
            # Halves in order, one after the other: a user's operations keep their order.
            splits[0] -= 2
            half = len(entries) // 2
            await self._send(entries[:half], delivery, splits)
            await self._send(entries[half:], delivery, splits)
            return
        self._settle(entries, delivery, result)

    @staticmethod
    def _settle(entries: list[Entry], delivery: Delivery, result: SendResult) -> None:
        for entry in entries:
            delivery.add(entry.user_id, entry.operation, result)

    async def _send_v1(self, user_id: str, operations: list[Operation], delivery: Delivery) -> None:
        """A user's v1 operations in order, after its batched ones; it stops where the v1
        transport would."""
        for operation in operations:
            if user_id in delivery.held_back:
                return
            if self._stop.is_set():
                delivery.add(user_id, operation, _NOT_SENT)
                continue
            for _ in range(THROTTLE_RESENDS + 1):
                result = await self._sender.send(operation)
                delivery.requests += 1
                self._record(result)
                self._metrics.api_calls.labels(
                    operation_name(operation), str(result.status or 0)
                ).inc()
                if result.outcome is not SendOutcome.THROTTLED:
                    break
            if result.outcome is SendOutcome.UNAUTHORIZED:
                self._stop.set()
            delivery.add(user_id, operation, result)
