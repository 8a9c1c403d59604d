"""A fake of Segment's HTTP tracking API batch endpoint, served over plain HTTP on loopback.

Follows Segment's documentation of ``POST /v1/batch``:

- HTTP Basic auth with the source's write key as the user name and an empty password; when
  the fake is given a write key, anything else is a 401.
- ``{"batch": [...]}``: a body that is not a JSON object with a ``batch`` list, a request over
  500 KB or a call in the batch over 32 KB is a 400 for the whole batch.
- Success is ``200 {"success": true}``.

Tests control it with :meth:`FakeSegment.fail_next` and ``latency``, and read ``batches``
(every request, refused ones included) and :meth:`FakeSegment.messages` (the calls of the
batches it accepted).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

MAX_BATCH_BYTES = 500 * 1024
MAX_CALL_BYTES = 32 * 1024
BATCH_PATH = "/v1/batch"
WRITE_KEY = "fake-write-key"
"""The write key the ``fake_segment`` fixture expects."""


@dataclass
class RecordedBatch:
    """One request as the fake received it."""

    path: str
    user: str | None
    """The Basic-auth user name (the write key), ``None`` without Basic auth."""
    password: str | None
    content_type: str
    body: Any
    """The parsed JSON body, ``None`` when it was not JSON."""
    status: int


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, _, password = decoded.partition(":")
    return user, password


def _call_bytes(call: Any) -> int:
    return len(json.dumps(call, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


class FakeSegment:
    def __init__(self, write_key: str | None = None, *, latency: float = 0.0):
        self.write_key = write_key
        """Expected Basic-auth user; ``None`` accepts any."""
        self.latency = latency
        """Seconds every request waits before it is answered."""
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.reset()

    def reset(self) -> None:
        self.batches: list[RecordedBatch] = []
        self._failures: list[list[Any]] = []

    def fail_next(self, status: int, times: int = 1, body: Any = None) -> None:
        """Answer ``status`` to the next ``times`` requests (after the auth check).

        ``body`` goes out as JSON, or as plain text when it is a string; by default it is
        ``{"success": false, "message": "injected failure <status>"}``.
        """
        if body is None:
            body = {"success": False, "message": f"injected failure {status}"}
        self._failures.append([times, status, body])

    def accepted(self) -> list[RecordedBatch]:
        return [batch for batch in self.batches if batch.status == 200]

    def messages(self) -> list[dict[str, Any]]:
        """Every call of every accepted batch, in arrival order."""
        return [call for batch in self.accepted() for call in batch.body["batch"]]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        user, password = _basic_credentials(request.headers.get("Authorization", ""))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if self.latency:
            await asyncio.sleep(self.latency)
        response = self._answer(request, raw, body, user)
        self.batches.append(
            RecordedBatch(
                path=request.path,
                user=user,
                password=password,
                content_type=request.headers.get("Content-Type", ""),
                body=body,
                status=response.status,
            )
        )
        return response

    def _answer(
        self, request: web.Request, raw: bytes, body: Any, user: str | None
    ) -> web.Response:
        if request.method != "POST" or request.path != BATCH_PATH:
            return web.json_response({"success": False, "message": "not found"}, status=404)
        if self.write_key is not None and user != self.write_key:
            return web.json_response({"success": False, "message": "invalid write key"}, status=401)
        if self._failures:
            rule = self._failures[0]
            rule[0] -= 1
            if rule[0] <= 0:
                self._failures.pop(0)
            status, failure = rule[1], rule[2]
            if isinstance(failure, str):
                return web.Response(status=status, text=failure)
            return web.json_response(failure, status=status)
        problem = self._check(raw, body)
        if problem:
            return web.json_response({"success": False, "message": problem}, status=400)
        return web.json_response({"success": True})

    @staticmethod
    def _check(raw: bytes, body: Any) -> str | None:
        if len(raw) > MAX_BATCH_BYTES:
            return "batch larger than 500KB"
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            return "invalid JSON: expected an object with a batch list"
        if any(_call_bytes(call) > MAX_CALL_BYTES for call in body["batch"]):
            return "call larger than 32KB"
        # Like Segment, one invalid call fails the whole batch.
        for call in body["batch"]:
            if not isinstance(call, dict) or (
                call.get("type") == "track" and not call.get("event")
            ):
                return "Track event is missing name"
        return None

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a port the system picks; ``url`` is the batch endpoint."""
        app = web.Application(client_max_size=MAX_BATCH_BYTES * 4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        # Binding the socket here tells us the port the system picked for port 0.
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}{BATCH_PATH}"
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@asynccontextmanager
async def serving(write_key: str | None = WRITE_KEY) -> AsyncIterator[FakeSegment]:
    """A started fake batch endpoint, closed on the way out."""
    fake = FakeSegment(write_key=write_key)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_segment() -> AsyncIterator[FakeSegment]:
    """A started fake batch endpoint expecting :data:`WRITE_KEY`, closed after the test."""
    async with serving() as fake:
        yield fake
