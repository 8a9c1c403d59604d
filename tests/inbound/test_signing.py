"""WebhookVerifier: Customer.io's ``v0:<timestamp>:<body>`` HMAC-SHA256 signature."""

import hashlib
import hmac
import time

import pytest

from connector.inbound.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    WebhookVerificationError,
    WebhookVerifier,
)

KEY = "whsec-8f3c0a"
NOW = 1_700_000_000
BODY = b'{"event_id":"01E4C4CT6YDC7Y5M7FE1GWWPQJ","object_type":"email","metric":"sent"}'


@pytest.fixture
def verifier() -> WebhookVerifier:
    return WebhookVerifier(KEY)


def _signed(verifier: WebhookVerifier, timestamp: int = NOW, body: bytes = BODY) -> str:
    return verifier.sign(timestamp, body)


def test_verifier_sign_matches_known_answer():
    key = "test-signing-key-é"
    timestamp = "1613063089"
    body = b'{"metric":"opened"}'
    expected = hmac.new(key.encode("utf-8"), b"v0:1613063089:" + body, hashlib.sha256).hexdigest()

    signature = WebhookVerifier(key).sign(timestamp, body)

    assert signature == expected
    assert signature == signature.lower()
    assert len(signature) == 64


def test_verifier_sign_fixed_vector():
    # From `printf 'v0:1700000000:{}' | openssl dgst -sha256 -hmac secret`.
    assert WebhookVerifier("secret").sign(1700000000, b"{}") == (
        "84dd7b277ba946b3a34369b43499bfd9258b410b8894583f1288b1911aa6a6d6"
    )


def test_verifier_sign_int_and_str_timestamp_agree(verifier):
    assert verifier.sign(NOW, BODY) == verifier.sign(str(NOW), BODY)


def test_verifier_valid_signature_passes(verifier):
    verifier.verify(BODY, _signed(verifier), str(NOW), now=NOW)


def test_verifier_uppercase_signature_passes(verifier):
    verifier.verify(BODY, _signed(verifier).upper(), str(NOW), now=NOW)


def test_verifier_empty_body_passes(verifier):
    verifier.verify(b"", verifier.sign(NOW, b""), str(NOW), now=NOW)


@pytest.mark.parametrize("offset", [-DEFAULT_TOLERANCE_SECONDS, 0, DEFAULT_TOLERANCE_SECONDS])
def test_verifier_timestamp_within_tolerance_passes(verifier, offset):
    timestamp = NOW + offset
    verifier.verify(BODY, _signed(verifier, timestamp), str(timestamp), now=NOW)


def test_verifier_uses_current_time_by_default(verifier):
    timestamp = int(time.time())
    verifier.verify(BODY, _signed(verifier, timestamp), str(timestamp))


def test_verifier_custom_tolerance():
    verifier = WebhookVerifier(KEY, tolerance_seconds=10)
    verifier.verify(BODY, _signed(verifier, NOW - 10), str(NOW - 10), now=NOW)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(BODY, _signed(verifier, NOW - 11), str(NOW - 11), now=NOW)


def test_verifier_old_timestamp_fails(verifier):
    timestamp = NOW - DEFAULT_TOLERANCE_SECONDS - 1
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(BODY, _signed(verifier, timestamp), str(timestamp), now=NOW)


def test_verifier_new_timestamp_fails(verifier):
    timestamp = NOW + DEFAULT_TOLERANCE_SECONDS + 1
    with pytest.raises(WebhookVerificationError, match="future"):
        verifier.verify(BODY, _signed(verifier, timestamp), str(timestamp), now=NOW)


def test_verifier_invalid_signature_fails(verifier):
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verifier.verify(BODY, "0" * 64, str(NOW), now=NOW)


def test_verifier_tampered_body_fails(verifier):
    signature = _signed(verifier)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verifier.verify(BODY.replace(b"sent", b"spammed"), signature, str(NOW), now=NOW)


def test_verifier_tampered_timestamp_fails(verifier):
    signature = _signed(verifier, NOW)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verifier.verify(BODY, signature, str(NOW + 1), now=NOW)


def test_verifier_other_key_fails(verifier):
    signature = WebhookVerifier("another-key").sign(NOW, BODY)
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verifier.verify(BODY, signature, str(NOW), now=NOW)


@pytest.mark.parametrize("signature", [None, ""])
def test_verifier_missing_signature_fails(verifier, signature):
    with pytest.raises(WebhookVerificationError, match="missing X-CIO-Signature"):
        verifier.verify(BODY, signature, str(NOW), now=NOW)


@pytest.mark.parametrize("timestamp", [None, ""])
def test_verifier_missing_timestamp_fails(verifier, timestamp):
    with pytest.raises(WebhookVerificationError, match="missing X-CIO-Timestamp"):
        verifier.verify(BODY, _signed(verifier), timestamp, now=NOW)


@pytest.mark.parametrize(
    "timestamp",
    [
        "abc",
        "1700000000.5",
        "-1700000000",
        "+1700000000",
        " 1700000000",
        "1700000000\n",
        "1e9",
        "\uff11\uff17" + "\uff10" * 8,  # full-width digits, which str.isdigit() accepts
        "9" * 13,
    ],
)
def test_verifier_non_numeric_timestamp_fails(verifier, timestamp):
    with pytest.raises(WebhookVerificationError, match="not a Unix time"):
        verifier.verify(BODY, _signed(verifier), timestamp, now=NOW)


@pytest.mark.parametrize(
    "signature",
    [
        "abc123",
        "0" * 63,
        "0" * 65,
        "g" * 64,
        "sha256=" + "0" * 57,
        "v0=" + "0" * 61,
        " " + "0" * 63,
        "é" * 64,
    ],
)
def test_verifier_malformed_signature_fails(verifier, signature):
    with pytest.raises(WebhookVerificationError, match="not a hex HMAC-SHA256"):
        verifier.verify(BODY, signature, str(NOW), now=NOW)


def test_verifier_checks_timestamp_before_signature(verifier):
    old = NOW - DEFAULT_TOLERANCE_SECONDS - 1
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(BODY, "not even hex", str(old), now=NOW)


def test_verifier_empty_key_is_refused():
    with pytest.raises(ValueError, match="signing_key"):
        WebhookVerifier("")


def test_verifier_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        WebhookVerifier(KEY, tolerance_seconds=-1)
