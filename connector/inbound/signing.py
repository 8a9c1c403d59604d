"""Verifying Customer.io's signature on a reporting webhook (pure, no framework).

Customer.io signs every reporting webhook ("Securely verifying requests",
https://customer.io/docs/api/webhooks/#section/Securely-Verifying-Requests):

* ``X-CIO-Timestamp`` holds the Unix time, in seconds, at which the request was signed;
* ``X-CIO-Signature`` holds the lowercase hex HMAC-SHA256 of ``v0:<timestamp>:<raw body>``,
  keyed with the webhook's signing key taken as its raw UTF-8 bytes (no base64, no prefix).

The raw body must be the bytes as received: re-serialised JSON would not match.
:class:`WebhookVerifier` checks both headers and raises :class:`WebhookVerificationError` for
every way a request can fail, so the caller needs one ``except`` to answer ``401``.
"""

from __future__ import annotations

import hashlib
import hmac
import string
import time

SIGNATURE_VERSION = b"v0"
"""Customer.io's scheme version, the start of the signed string; a new scheme gets a new one."""

DEFAULT_TOLERANCE_SECONDS = 300
"""How far ``X-CIO-Timestamp`` may be from our clock, either way.

Five minutes absorbs clock skew between Customer.io and us while keeping the window in which a
captured request could be replayed short (Slack's ``v0`` scheme, which this copies, uses the same).
"""

_SIGNATURE_HEX_LENGTH = hashlib.sha256().digest_size * 2
# Ten digits reach the year 2286; a value of more than twelve is not a Unix time in seconds,
# whatever else it is.
_MAX_TIMESTAMP_DIGITS = 12
_HEX_DIGITS = frozenset(string.hexdigits)


class WebhookVerificationError(Exception):
    """The request is not provably from Customer.io; the message says why (safe to log)."""


class WebhookVerifier:
    """Signs and verifies Customer.io reporting webhooks with one signing key."""

    def __init__(
        self, signing_key: str, tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS
    ) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        if tolerance_seconds < 0:
            raise ValueError("tolerance_seconds must not be negative")
        self._key = signing_key.encode("utf-8")
        self._tolerance = tolerance_seconds
        # Keyed once: a copy per webhook costs two thirds of a fresh HMAC.
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)

    def sign(self, timestamp: int | str, body: bytes) -> str:
        """The ``X-CIO-Signature`` value Customer.io would send for ``timestamp`` and ``body``."""
        message = b":".join((SIGNATURE_VERSION, str(timestamp).encode("ascii"), bytes(body)))
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def verify(
        self,
        body: bytes,
        signature: str | None,
        timestamp: str | None,
        now: float | None = None,
    ) -> None:
        """Return if ``signature`` and ``timestamp`` (the raw header values) prove ``body``.

        Raises :class:`WebhookVerificationError` when a header is missing, the timestamp is not
        whole seconds or lies more than the tolerance before or after ``now`` (default: the
        current time), or the signature is not 64 hex digits or does not match. Hex digits are
        compared as bytes, in constant time, so their case does not matter.
        """
        if not signature:
            raise WebhookVerificationError("missing X-CIO-Signature header")
        if not timestamp:
            raise WebhookVerificationError("missing X-CIO-Timestamp header")
        # Up to twelve ASCII digits: str methods in C, cheaper than the pattern they stand for.
        if not (
            len(timestamp) <= _MAX_TIMESTAMP_DIGITS and timestamp.isascii() and timestamp.isdigit()
        ):
            raise WebhookVerificationError("X-CIO-Timestamp is not a Unix time in seconds")

        current = time.time() if now is None else now
        signed_at = int(timestamp)
        if signed_at < current - self._tolerance:
            raise WebhookVerificationError("X-CIO-Timestamp is too old")
        if signed_at > current + self._tolerance:
            raise WebhookVerificationError("X-CIO-Timestamp is too far in the future")

        if len(signature) != _SIGNATURE_HEX_LENGTH or not _HEX_DIGITS.issuperset(signature):
            raise WebhookVerificationError("X-CIO-Signature is not a hex HMAC-SHA256")
        mac = self._keyed.copy()
        mac.update(b":".join((SIGNATURE_VERSION, timestamp.encode("ascii"), body)))
        expected = mac.digest()
        if not hmac.compare_digest(expected, bytes.fromhex(signature)):
            raise WebhookVerificationError("X-CIO-Signature does not match")
