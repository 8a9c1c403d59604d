"""``POST /webhook?conf=<token>``: Customer.io reporting webhooks, committed before the 200.

Customer.io gives a receiver 4 seconds and, after any non-2xx answer, holds back every later
webhook for an hour; so the handler does the least it can (verify, store, answer) and leaves
mapping to the processor. Only requests that are not Customer.io's (wrong token or signature,
unreadable bodies) are refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from connector.inbound.signing import WebhookVerificationError
from connector.rules import safe_json
from connector.runtime import Runtime
from connector.web.responses import json_error

WEBHOOK_PATH = "/webhook"
# Customer.io's reporting webhooks are a few KB; anything near this is not one of them.
MAX_WEBHOOK_BYTES = 1024 * 1024
# Kept with the raw body: what is needed to re-verify or debug a delivery later.
KEPT_HEADERS = ("X-CIO-Signature", "X-CIO-Timestamp", "Content-Type", "User-Agent")
MAX_EVENT_ID_LENGTH = 255


async def _read_body(request: web.BaseRequest) -> bytes | None:
    """The whole body, or None when it is over :data:`MAX_WEBHOOK_BYTES`."""
    if request.content_length is not None and request.content_length > MAX_WEBHOOK_BYTES:
        return None
    stream = request.content
    # Nearly always the whole body at once; a body that came in several pieces (a large one,
    # or chunked) is read to its end.
    body = await stream.readany()
    if not stream.at_eof():
        chunks, size = [body], len(body)
        while chunk := await stream.readany():
            size += len(chunk)
            if size > MAX_WEBHOOK_BYTES:
                return None
            chunks.append(chunk)
        body = b"".join(chunks)
    return None if len(body) > MAX_WEBHOOK_BYTES else body


def delivery_key(payload: dict[str, Any], body: bytes) -> str:
    """Customer.io's ``event_id``; a payload without a usable one (missing, too long, or text
    that cannot be stored) is keyed by its content."""
    event_id = payload.get("event_id")
    if isinstance(event_id, int) and not isinstance(event_id, bool):
        event_id = str(event_id)
    if (
        isinstance(event_id, str)
        and event_id.strip()
        and len(event_id) <= MAX_EVENT_ID_LENGTH
        and safe_json.is_storable(event_id)
    ):
        return event_id.strip()
    return "sha256:" + hashlib.sha256(body).hexdigest()


# The two answers Customer.io gets nearly always, serialised once.
_STORED = b'{"ok": true}'
_DUPLICATE = b'{"ok": true, "duplicate": true}'


def _ok(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


class WebhookReceiver:
    """Does what must happen before the 200, and nothing else: the token, the size, the
    signature, the JSON, the commit. Mapping waits for the processor.

    Served in a lane of its own (:mod:`connector.web.serving`): no route lookup and no
    middleware, so every outcome is answered here."""

    def __init__(self, runtime: Runtime):
        self._gate = runtime.gate
        self._inbox = runtime.inbox
        self._processor = runtime.processor
        counted = runtime.metrics.webhooks_received
        self._counted = counted
        self._stored = counted["stored"]
        self._duplicate = counted["duplicate"]

    async def receive(self, request: web.BaseRequest) -> web.Response:
        gate = self._gate.fresh() or await self._gate.current()
        if not gate.token_matches(request.query.get("conf", "")):
            self._counted["unauthorized"].inc()
            return json_error(401, "unknown webhook token")
        body = await _read_body(request)
        if body is None:
            self._counted["too_large"].inc()
            return json_error(413, f"webhook bodies are limited to {MAX_WEBHOOK_BYTES} bytes")
        headers = request.headers
        if gate.verifier is not None:
            try:
                gate.verifier.verify(
                    body, headers.get("X-CIO-Signature"), headers.get("X-CIO-Timestamp")
                )
            except WebhookVerificationError as exc:
                self._counted["bad_signature"].inc()
                return json_error(401, f"signature check failed: {exc}")
        try:
            # Text holding NUL or lone surrogates is not refused (Customer.io backlogs after any
            # non-2xx): the raw body is stored as it came, and the processor maps a cleaned copy.
            payload = safe_json.loads(body)
        except safe_json.UnsafeJSON as exc:
            self._counted["malformed"].inc()
            return json_error(400, str(exc))
        if not isinstance(payload, dict):
            self._counted["malformed"].inc()
            return json_error(400, "a webhook body must be a JSON object")
        kept = {
            name: safe_json.clean_text(value)
            for name in KEPT_HEADERS
            if (value := headers.get(name)) is not None
        }
        # loads() succeeded, so the body is valid UTF-8; escapes keep NUL out of its raw text.
        stored = await self._inbox.store(delivery_key(payload, body), body.decode(), kept)
        if not stored:
            self._duplicate.inc()
            return _ok(_DUPLICATE)
        self._stored.inc()
        self._processor.wake()
        return _ok(_STORED)


webhook_receiver_key = web.AppKey("webhook_receiver", WebhookReceiver)


def setup_webhook(app: web.Application, runtime: Runtime) -> None:
    receiver = app[webhook_receiver_key] = WebhookReceiver(runtime)
    # Served by the lane (connector.web.serving); the route answers GET with a 405, and serves
    # webhooks where the app runs without the lane.
    app.router.add_post(WEBHOOK_PATH, receiver.receive)
