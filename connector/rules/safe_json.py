"""JSON from outside the service, read so that whatever is accepted can be stored and sent on.

Python's :func:`json.loads` takes ``NaN`` and ``Infinity`` (which PostgreSQL, SQLite's JSON
functions and Customer.io all refuse), integers of thousands of digits (which fail later, in
``int()`` or a driver), nesting until the interpreter's recursion limit, and ``\\u`` escapes
that decode to NUL or to lone UTF-16 surrogates (which PostgreSQL refuses and which cannot be
encoded as UTF-8 at all). :func:`loads` refuses the first three with :class:`UnsafeJSON`;
:func:`unstorable_text` finds the fourth, so that an endpoint can refuse a field by name, and
:func:`clean` makes a copy without it, for what must never be refused (Customer.io's webhooks).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted; real payloads stay under ten."""
MAX_INTEGER = 2**63 - 1
"""Integers beyond 64 bits fit in no database column and in no Customer.io attribute."""
REPLACEMENT = "\ufffd"

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Only these escapes can put NUL or a lone surrogate into parsed text (raw control characters
# and invalid UTF-8 are syntax errors already), so a body without them needs no walk.
_RISKY_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


# orjson takes integers up to 2**64 - 1 exactly and longer ones as floats, and nests up to 1,024
# levels: a document with a run of 19 digits (9,223,372,036,854,775,807 has 19), or more brackets
# than MAX_DEPTH, is read by the strict parser instead.
_DIGITS_AS_ZEROS = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGIT_RUN = b"0" * 19


class UnsafeJSON(ValueError):
    """The body is not JSON that the service accepts; the message says why."""


def _integer(text: str) -> int:
    # Checked on the digits before int() so that a 100,000-digit number costs nothing.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) > MAX_INTEGER:
        raise UnsafeJSON(f"integer {text[:20]}… is out of range (at most 64 bits)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJSON(f"number {text[:20]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise UnsafeJSON(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """Parse ``data``; raises :class:`UnsafeJSON` for anything :mod:`json` would refuse, and
    for NaN/Infinity, integers beyond 64 bits, infinite floats and nesting deeper than
    :data:`MAX_DEPTH`. Text holding NUL or lone surrogates is returned as it is (see
    :func:`unstorable_text`)."""
    value = _fast_loads(data)
    return _strict_loads(data) if value is _UNDECIDED else value


_UNDECIDED = object()


def _fast_loads(data: bytes | str) -> Any:
    """The document parsed by orjson, when that is certain to be what :func:`_strict_loads`
    returns; else :data:`_UNDECIDED`.

    orjson refuses by itself what the strict parser refuses: NaN and Infinity, infinite floats,
    invalid UTF-8 (UTF-8-encoded surrogates too), a byte-order mark, and every syntax error. It
    also refuses lone surrogate escapes (``\\ud800``), which the strict parser takes; so a
    refusal is never final here, the strict parser decides (refusals are rare, and cost no
    more than before). What orjson takes that the strict parser does not, long integers and
    deep nesting, is ruled out on the raw bytes first: two C scans, cheaper than a walk.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            return _UNDECIDED
    if _LONG_DIGIT_RUN in data.translate(_DIGITS_AS_ZEROS):
        return _UNDECIDED
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _UNDECIDED
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and _depth_over(value, MAX_DEPTH):
        return _UNDECIDED
    return value


def _strict_loads(data: bytes | str) -> Any:
    try:
        # Strict UTF-8 here: given bytes, json.loads would also take UTF-16 and UTF-32 (told by
        # their first bytes) and UTF-8-encoded lone surrogates, which the raw body, stored as
        # text, cannot be (RFC 8259 §8.1: JSON between systems is UTF-8).
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        value = json.loads(text, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except RecursionError as exc:
        raise UnsafeJSON(f"nesting deeper than {MAX_DEPTH} levels") from exc
    except UnicodeDecodeError as exc:
        raise UnsafeJSON(f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise UnsafeJSON(f"malformed JSON: {exc}") from exc
    if _depth_over(value, MAX_DEPTH):
        raise UnsafeJSON(f"nesting deeper than {MAX_DEPTH} levels")
    return value


def may_hold_unstorable_text(document: str) -> bool:
    """False when the JSON ``document`` (valid UTF-8 text) cannot decode to text holding NUL
    or a lone surrogate, so that it needs no :func:`clean`."""
    return _RISKY_ESCAPE.search(document) is not None


def is_storable(text: str) -> bool:
    """Whether ``text`` is valid Unicode without NUL: what every database and UTF-8 can take."""
    if text.isascii():
        return "\x00" not in text
    return _UNSTORABLE.search(text) is None


def clean_text(text: str) -> str:
    """``text`` with NUL removed and lone surrogates replaced by U+FFFD."""
    if is_storable(text):
        return text
    return _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else REPLACEMENT, text)


def unstorable_text(value: Any, path: str = "") -> str | None:
    """The path (``user.plan``, ``events[2].name``) of the first text in ``value``, key or
    value, that is not storable, with what is wrong with it; None when all of it is."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not is_storable(item):
                return f"{where or 'value'}: {_what_is_wrong(item)}"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and not is_storable(key):
                    return f"{clean_text(child_path)}: the name {_what_is_wrong(key)}"
                stack.append((child_path, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def clean(value: Any) -> Any:
    """A copy of ``value`` whose every key and text is :func:`clean_text`-ed."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


def _what_is_wrong(text: str) -> str:
    if "\x00" in text:
        return "text holds a NUL character"
    return "text holds a lone UTF-16 surrogate (not valid Unicode)"


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
