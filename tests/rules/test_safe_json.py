"""The rules for JSON from outside: what is refused, what is found, what is cleaned."""

from __future__ import annotations

import pytest

from connector.rules import safe_json


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b"NaN", "NaN is not JSON"),
        (b'{"a": [Infinity]}', "Infinity is not JSON"),
        (b"-Infinity", "-Infinity is not JSON"),
        (b"1e400", "number 1e400 is out of range"),
        (b"-1e400", "out of range"),
        (b"9223372036854775808", "out of range (at most 64 bits)"),
        (b"-9223372036854775808", "out of range"),
        (b"1" * 5000, "out of range"),
        # orjson, the fast path, takes these as an integer (up to 2**64 - 1) or a float.
        (b'{"a": 18446744073709551615}', "out of range (at most 64 bits)"),
        (b"[99999999999999999999]", "out of range"),
        (b"-9223372036854775809", "out of range"),
        (b"[" * 65 + b"]" * 65, "nesting deeper than 64 levels"),
        (b"[" * 100_000 + b"]" * 100_000, "nesting deeper than 64 levels"),
        (b'{"a": "\xff"}', "not UTF-8: invalid start byte at byte 7"),
        (b'{"a": ', "malformed JSON"),
        (b'"a\x00b"', "malformed JSON: Invalid control character"),
    ],
)
def test_safe_json_loads_refuses(document, reason):
    with pytest.raises(safe_json.UnsafeJSON, match=reason.replace("(", r"\(").replace(")", r"\)")):
        safe_json.loads(document)


@pytest.mark.parametrize(
    ("document", "value"),
    [
        (b"9223372036854775807", 2**63 - 1),
        (b"-9223372036854775807", -(2**63 - 1)),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        (b"[" * 64 + b"]" * 64, nested(64)),
        (b'{"a": "\\ud800", "b": "\\u0000"}', {"a": "\ud800", "b": "\x00"}),
        ('{"é": "ü"}', {"é": "ü"}),
        # Long digit runs, many brackets and text that is not UTF-8 (a lone surrogate) send the
        # document to the strict parser, which takes these.
        (b'{"id": "12345678901234567890"}', {"id": "12345678901234567890"}),
        (b"[123456789012345678, -0.0, 1.5e10]", [123456789012345678, -0.0, 1.5e10]),
        (b"[" + b"[], " * 70 + b"[]]", [[]] * 71),
        ('{"a": "\ud800"}', {"a": "\ud800"}),
    ],
)
def test_safe_json_loads_accepts(document, value):
    assert safe_json.loads(document) == value


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ({"user": {"plan": "pro"}}, None),
        ({"user": {"plan": "\ud800"}}, "user.plan: text holds a lone UTF-16 surrogate"),
        ({"events": [{"name": "ok"}, {"name": "a\x00"}]}, "events[1].name: text holds a NUL"),
        ({"a": {"b\udfff": 1}}, "a.b\ufffd: the name text holds a lone UTF-16 surrogate"),
        (["x", "\udc00"], "[1]: text holds a lone UTF-16 surrogate"),
        ("\x00", "value: text holds a NUL character"),
        ({"a": 1, "b": None, "c": True, "d": 1.5}, None),
        ("😀", None),
    ],
)
def test_safe_json_unstorable_text_names_the_first_bad_field(value, found):
    result = safe_json.unstorable_text(value)
    if found is None:
        assert result is None
    else:
        assert result is not None and result.startswith(found)


@pytest.mark.parametrize(
    ("value", "cleaned"),
    [
        ("a\x00b", "ab"),
        ("\ud800x", "\ufffdx"),
        ({"k\x00": ["\udfff", 1, None]}, {"k": ["\ufffd", 1, None]}),
        ("fine é 😀", "fine é 😀"),
    ],
)
def test_safe_json_clean(value, cleaned):
    assert safe_json.clean(value) == cleaned
    assert safe_json.unstorable_text(safe_json.clean(value)) is None


@pytest.mark.parametrize(
    ("document", "risky"),
    [
        (r'{"a": "\ud800"}', True),
        (r'{"a": "\uDFFF"}', True),
        (r'{"a": "\u0000"}', True),
        (r'{"a": "\u00e9"}', False),
        ('{"a": "plain"}', False),
    ],
)
def test_safe_json_may_hold_unstorable_text(document, risky):
    assert safe_json.may_hold_unstorable_text(document) is risky
