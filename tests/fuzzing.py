"""Hostile and broken HTTP requests for every route of the service, and a client that sends
them and then checks that nothing stalled.

Shared by ``tests/web/test_fuzz.py`` (against the test server) and ``bench/fuzz.py`` (against a real
``connector serve``). A request is a plain value, drawn deterministically from hypothesis
strategies by :func:`draw_requests`; the strategies cover what attackers and broken clients
send: any JSON value at any level of a notification, a webhook or a settings patch (wrong
types, NUL, lone surrogates, ``NaN``/``Infinity`` as raw tokens, huge numbers, deep nesting,
long strings), random bytes, odd content types and charsets, odd paths and query strings
(``%00``, ``%ff``, long ones), every method on every route, with and without credentials.

Requests without credentials or with wrong ones are sent from a second loopback address
(:data:`HOSTILE_ADDRESS`), so the login throttle they trip (429 after five wrong passwords)
locks out that address and not the trusted client's, whose Basic and session requests keep
reaching the handlers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from html import unescape
from typing import Any
from urllib.parse import quote

import aiohttp
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

HOSTILE_ADDRESS = "127.0.0.2"
# Replaced when a request is sent: the current webhook token, the sender's CSRF token.
CONF = "__FUZZ_CONF__"
CSRF = "__FUZZ_CSRF__"
SECRET_SETTINGS = ("api_key", "webhook_signing_key", "forward_write_key")
_CSRF_IN_HTML = re.compile(r'name="csrf_token" value="([^"]+)"')
REQUEST_TIMEOUT_SECONDS = 60

# -- JSON, including what json.dumps would never write ---------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON token written as it is: ``NaN``, ``Infinity``, a 400-digit number, a deep nest."""

    token: str


RAW_TOKENS = (
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1E400",
    "-0",
    "0.0000000000000000000000000000000000001",
    "9" * 400,
    "-" + "9" * 30,
    str(2**63),
    str(-(2**63) - 1),
    str(2**64),
    "[" * 70 + "]" * 70,
    '{"a":' * 70 + "1" + "}" * 70,
    "[" * 5000 + "]" * 5000,
)
SPECIAL_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\udbff\udc00",
    "\ufeff",
    "\u202e",
    "\U0001f4a5",
    "%00",
    "%ff",
    "null",
    "true",
    "0",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "{{7*7}}",
    "../../etc/passwd",
    "x" * 300,
    "é" * 5000,
    "y" * 70_000,
)

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SPECIAL_TEXT),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), surrogates, st.text(max_size=5)),
)
sane_numbers = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)
numbers = st.one_of(
    *[sane_numbers] * 8,
    st.integers(),
    st.integers(min_value=2**62, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-(2**62)),
    st.sampled_from([Raw(t) for t in RAW_TOKENS]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=10,
)


def encode(value: Any, *, ascii_only: bool = True) -> str:
    """``value`` as JSON text; :class:`Raw` tokens as they are, lone surrogates as ``\\u``
    escapes (or raw, for :func:`to_bytes` to write as invalid UTF-8, when not ``ascii_only``)."""
    if isinstance(value, Raw):
        return value.token
    if isinstance(value, dict):
        pairs = (
            f"{encode(str(k), ascii_only=ascii_only)}:{encode(v, ascii_only=ascii_only)}"
            for k, v in value.items()
        )
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode(v, ascii_only=ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def to_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """Text as bytes; what the encoding cannot write (a lone surrogate) is written as UTF-8
    would have written it had it been allowed: bytes no decoder accepts."""
    try:
        return text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return text.encode("utf-8", "surrogatepass")


@st.composite
def json_bodies(draw: Callable, document: st.SearchStrategy) -> bytes:
    value = draw(document)
    ascii_only = draw(st.booleans())
    encoding = draw(st.sampled_from(["utf-8"] * 7 + ["latin-1", "utf-16", "utf-8-sig"]))
    body = to_bytes(encode(value, ascii_only=ascii_only), encoding)
    cut = draw(st.sampled_from([None] * 9 + [1, 7, -1, -3]))
    if cut is not None and len(body) > abs(cut):
        body = body[:cut] if cut < 0 else body[: len(body) // cut]
    return body


_ABSENT = object()


def shaped(
    fields: dict[str, st.SearchStrategy], exact: tuple[str, ...] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with each of ``fields`` plausible, replaced by any JSON value (not those named in
    ``exact``), or left out; and sometimes keys nobody expects."""
    known = st.fixed_dictionaries(
        {
            name: st.one_of(good, st.just(_ABSENT))
            if name in exact
            else st.one_of(good, good, good, good, json_values, st.just(_ABSENT))
            for name, good in fields.items()
        }
    ).map(lambda drawn: {k: v for k, v in drawn.items() if v is not _ABSENT})
    extra = st.dictionaries(texts, json_values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, st.one_of(st.just({}), st.just({}), extra))


def maybe_broken(document: st.SearchStrategy) -> st.SearchStrategy:
    """A document as its route expects it, more often than not; else any JSON value."""
    return st.one_of(document, document, document, json_values)


ids = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(min_size=1, max_size=12),
    st.sampled_from(SPECIAL_TEXT),
    sane_numbers,
    numbers,
)
timestamps = st.one_of(
    st.sampled_from(
        [
            "2018-03-30T14:38:02Z",
            "2018-03-30 14:38:02 UTC",
            "2018-02-30T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "yesterday",
            "2018-03-30T14:38:02+99:00",
        ]
    ),
    st.integers(min_value=0, max_value=2**41),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    texts,
)
segment_ids = st.sampled_from(["seg-paying", "seg-trial", ""]) | texts
users = shaped(
    {
        "id": ids,
        "external_id": ids,
        "email": st.sampled_from(["ana@example.com", "not an email", "a@b", ""]) | texts,
        "anonymous_ids": st.lists(ids, max_size=3),
        "created_at": timestamps,
        "indexed_at": timestamps,
        "first_name": texts,
        "traits_salesforce_lead/title": json_values,
        "account": json_values,
    }
)
platform_events = shaped(
    {
        "event_id": ids,
        "event": st.sampled_from(["Signed Up", "page", ""]) | texts,
        "properties": st.dictionaries(texts, json_values, max_size=3),
        "context": st.dictionaries(texts, json_values, max_size=3),
        "created_at": timestamps,
    }
)
messages = shaped(
    {
        "user": users,
        "segments": st.lists(shaped({"id": segment_ids, "name": texts}), max_size=3),
        "account": st.dictionaries(texts, json_values, max_size=3),
        "changes": json_values,
        "events": st.lists(platform_events, max_size=3),
    }
)
notifications = shaped(
    {
        "notification_id": ids,
        "channel": st.sampled_from(["user:update", "user_report:update", "ship:update"]) | texts,
        "messages": st.lists(messages, max_size=4),
    }
)
OBJECT_TYPES = ["email", "customer", "push", "sms", "in_app", "slack", "webhook", "whatsapp"]
METRICS = ["sent", "delivered", "opened", "clicked", "bounced", "spammed", "subscribed"]
webhooks = shaped(
    {
        "event_id": ids,
        "object_type": st.sampled_from(OBJECT_TYPES) | texts,
        "object_type_type": st.sampled_from(OBJECT_TYPES),
        "event_type": st.sampled_from(["email_opened", "email_", "_"]) | texts,
        "metric": st.sampled_from(METRICS) | texts,
        "timestamp": timestamps,
        "data": shaped(
            {
                "identifiers": shaped({"id": ids, "email": texts, "cio_id": ids}),
                "customer_id": ids,
                "email_address": st.sampled_from(["Ana <ana@example.com>", "+15550100"]) | texts,
                "recipient": texts,
                "content": st.one_of(texts, json_values.map(encode)),
                "subject": texts,
            }
        ),
    }
)
# Plausible secrets are only empty ones: a signing key set by the fuzz would refuse every
# later webhook with 401, leaving the receiver's code behind it unfuzzed.
settings_patches = shaped(
    {
        "site_id": texts,
        "api_key": st.sampled_from(["", "\x00", "k" * 201]),
        "region": st.sampled_from(["us", "eu", "US", ""]) | texts,
        "user_id_mapping": st.sampled_from(["external_id", "email", "a b"]) | texts,
        "synchronized_segments": st.lists(segment_ids, max_size=3),
        "synchronized_attributes": st.lists(texts, max_size=3),
        "enable_user_deletion": st.booleans(),
        "events_filter": st.lists(texts, max_size=3),
        "anonymous_events": st.booleans(),
        "max_attributes_per_call": numbers,
        "webhook_signing_key": st.sampled_from(["", "\ud800", "s" * 501, 5, None, [], {}]),
        "webhook_timestamp_tolerance_seconds": numbers,
        "incoming_metrics": st.none() | st.lists(texts, max_size=3),
        "forward_url": st.sampled_from(["", "http://127.0.0.1:9/batch", "not a url"]),
        "forward_write_key": st.sampled_from(["", "\x00"]),
        "forward_event_prefix": texts,
    },
    exact=(*SECRET_SETTINGS, "forward_url"),
)

# -- forms -----------------------------------------------------------------------------------

FORM_FIELDS = (
    "site_id",
    "region",
    "user_id_mapping",
    "max_attributes_per_call",
    "webhook_timestamp_tolerance_seconds",
    "forward_event_prefix",
    "enable_user_deletion",
    "anonymous_events",
    "synchronized_segments",
    "synchronized_segments_other",
    "synchronized_attributes",
    "events_filter",
    "events_filter_other",
    "incoming_metrics",
    "incoming_metrics_all",
    "clear_api_key",
    "password",
)
form_values = st.one_of(texts, st.sampled_from(["on", "off", "us", "eu", "1", "300", "-1"]))
form_pairs = st.lists(
    st.tuples(st.sampled_from(FORM_FIELDS) | texts, form_values)
    # Not a lone surrogate: sent as latin-1 its UTF-8 bytes are a valid key, which would stop
    # the rest of the fuzz's webhooks at the signature check.
    | st.tuples(st.sampled_from(SECRET_SETTINGS), st.sampled_from(["", " ", "\x00"])),
    max_size=8,
)


def urlencoded(pairs: Iterable[tuple[str, str]], encoding: str) -> bytes:
    def q(text: str) -> str:
        return quote(to_bytes(text, encoding), safe="")

    return "&".join(f"{q(k)}={q(v)}" for k, v in pairs).encode()


def multipart(pairs: Iterable[tuple[str, str]], boundary: str) -> bytes:
    parts = [
        to_bytes(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n')
        + to_bytes(v)
        + b"\r\n"
        for k, v in pairs
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


@st.composite
def forms(draw: Callable) -> tuple[bytes, str]:
    """A form body and its content type; usually with the sender's CSRF token."""
    pairs = draw(form_pairs)
    if draw(st.integers(0, 4)):
        pairs = [("csrf_token", CSRF), *pairs]
    kind = draw(st.sampled_from(["urlencoded", "urlencoded", "multipart", "broken"]))
    if kind == "urlencoded":
        charset = draw(st.sampled_from(["", "utf-8", "latin-1", "utf-16", "bogus-charset"]))
        content_type = "application/x-www-form-urlencoded"
        body = urlencoded(pairs, charset if charset.startswith(("utf-8", "latin")) else "utf-8")
        return body, content_type + (f"; charset={charset}" if charset else "")
    if kind == "multipart":
        boundary = draw(st.sampled_from(["b0undary", "x" * 80]))
        body = multipart(pairs, boundary)
        given_boundary = draw(st.sampled_from([boundary, boundary, "", "other"]))
        suffix = f"; boundary={given_boundary}" if given_boundary else ""
        return body, "multipart/form-data" + suffix
    return draw(st.binary(max_size=200)), draw(content_types)


# -- requests --------------------------------------------------------------------------------

content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
        "application/json; charset=bogus",
        "text/plain",
        "text/html; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "application/octet-stream",
        "*/*",
        ";;;",
        'application/json; charset=""',
    ]
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """aiohttp's canonical form, ``{name}`` for a variable part."""


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    target: str
    """The path and query exactly as sent (percent-encoded; may hold :data:`CONF`)."""
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    auth: str
    """``none`` or ``wrong`` (sent from :data:`HOSTILE_ADDRESS`), ``basic``, ``session``,
    ``ingest``."""
    kind: str

    def describe(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 300 else self.body[:300] + b"..."
        return (
            f"{self.method} {self.target[:300]} auth={self.auth} "
            f"headers={dict(self.headers)!r} body={body!r}"
        )


def routes_of(app: Any) -> list[Route]:
    """The app's routes (the ``HEAD`` aiohttp adds for each ``GET`` and static files left out)."""
    found = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path is None or route.method == "HEAD":
            continue
        found.append(Route(route.method, path))
    return sorted(set(found), key=lambda r: (r.path, r.method))


def route_kind(path: str) -> str:
    if path in ("/smart-notifier", "/batch"):
        return "notification"
    if path == "/webhook":
        return "webhook"
    if path == "/api/settings":
        return "settings"
    if path.startswith("/admin"):
        return "admin"
    if path.startswith("/api/"):
        return "api"
    return "public"


AUTHS = {
    "notification": ["ingest", "ingest", "ingest", "none", "wrong", "basic"],
    "webhook": ["none"],
    "settings": ["basic", "basic", "session", "none", "wrong"],
    "admin": ["session", "session", "session", "none", "wrong", "basic"],
    "api": ["basic", "basic", "session", "none", "wrong"],
    "public": ["none", "none", "wrong", "basic"],
}
BODIES = {
    "notification": maybe_broken(notifications),
    "webhook": maybe_broken(webhooks),
    "settings": maybe_broken(settings_patches),
}

segment_chars = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from("é\x00\x01 \ud800"),
    max_size=20,
)
escapes = st.sampled_from(["%00", "%ff", "%FF%FE", "%zz", "%", "%2f", "%c0%af", "%ed%a0%80", "."])


@st.composite
def path_segments(draw: Callable) -> str:
    if draw(st.integers(0, 3)) == 0:
        return draw(escapes)
    if draw(st.integers(0, 30)) == 0:
        return "a" * draw(st.sampled_from([300, 5000, 9000]))
    return quote(to_bytes(draw(segment_chars)), safe="")


@st.composite
def queries(draw: Callable, kind: str) -> str:
    pairs = []
    if kind == "webhook":
        conf = draw(st.sampled_from([CONF, CONF, CONF, CONF, "", "wrong-token", CONF + "%00"]))
        pairs.append(f"conf={conf}")
    if kind == "api" and draw(st.booleans()):
        name = draw(st.sampled_from(["limit", "after", "user_id", "email", "wait", "full", "name"]))
        value = draw(
            st.sampled_from(["1", "-1", "0", "9" * 40, "1e3", "true", "%00", "%ff", ""])
            | path_segments()
        )
        pairs.append(f"{name}={value}")
    for _ in range(draw(st.integers(0, 2))):
        pairs.append(f"{draw(path_segments())}={draw(path_segments())}")
    return "?" + "&".join(pairs) if pairs else ""


@st.composite
def requests_for(draw: Callable, routes: Sequence[Route]) -> FuzzRequest:
    route = draw(st.sampled_from(routes))
    method = route.method
    path = route.path
    roll = draw(st.integers(0, 19))
    if roll == 0:
        method = draw(
            st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE", "OPTIONS", "TRACE"])
        )
    elif roll == 1:
        path = "/" + "/".join(draw(st.lists(path_segments(), min_size=1, max_size=4)))
    elif roll == 2:
        path = path + "/" + draw(path_segments())
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        value = draw(st.sampled_from(["u1", "fuzz-after"]) | path_segments())
        path = path[:start] + value + path[end + 1 :]
    kind = route_kind(route.path)
    auth = draw(st.sampled_from(AUTHS[kind]))
    headers: dict[str, str] = {}
    body: bytes | None = None
    if method in ("POST", "PATCH", "PUT") or draw(st.integers(0, 9)) == 0:
        shape = draw(st.integers(0, 9))
        if kind == "admin" and shape < 7:
            body, headers["Content-Type"] = draw(forms())
        elif kind in BODIES and shape < 7:
            body = draw(json_bodies(BODIES[kind]))
            headers["Content-Type"] = draw(
                st.sampled_from(["application/json"] * 4) | content_types
            )
        elif shape < 8:
            body = draw(json_bodies(json_values))
            headers["Content-Type"] = draw(content_types)
        else:
            body = draw(st.binary(max_size=300))
            headers["Content-Type"] = draw(content_types)
    if auth == "wrong":
        headers["Authorization"] = draw(
            st.sampled_from(["Basic ", "Bearer ", "Basic !!!", "Digest x", "Bearer wrong"])
            | st.builds(
                lambda user, pw: "Basic " + base64.b64encode(to_bytes(f"{user}:{pw}")).decode(),
                st.sampled_from(["admin", "", "root", "admin\x00"]),
                texts,
            )
            | header_text
        )
    for _ in range(draw(st.integers(0, 2) if draw(st.integers(0, 4)) == 0 else st.just(0))):
        name = draw(
            st.sampled_from(
                ["Origin", "X-CIO-Signature", "X-CIO-Timestamp", "X-CSRF-Token", "Accept", "Cookie"]
            )
        )
        headers[name] = draw(st.sampled_from(["null", "http://evil.example", CSRF]) | header_text)
    if kind == "admin" and auth == "session" and method == "POST" and draw(st.booleans()):
        headers.setdefault("X-CSRF-Token", CSRF)
    if kind in ("settings", "api") and auth == "session":
        headers.setdefault("X-CSRF-Token", CSRF)
    target = quote(path, safe="/%") + draw(queries(kind))
    return FuzzRequest(method, target, tuple(headers.items()), body, auth, kind)


# The pipelines the issue is about get more of the requests than the other routes.
WEIGHTS = {"notification": 3, "webhook": 4, "settings": 2}


def draw_requests(routes: Sequence[Route], count: int, seed: int = 0) -> list[FuzzRequest]:
    """About ``count`` requests, the same ones for the same arguments: each route gets its
    share (by :data:`WEIGHTS`), drawn by a hypothesis run of its own, and the routes take
    turns in the result, so that what one request changes meets the next ones."""
    weights = [WEIGHTS.get(route_kind(route.path), 1) for route in routes]
    quotas = [max(1, count * w // sum(weights)) for w in weights]
    drawn = [_draw(route, quota, seed) for route, quota in zip(routes, quotas, strict=True)]
    mixed = []
    for turn in range(max(quotas)):
        mixed.extend(requests[turn] for requests in drawn if turn < len(requests))
    return mixed


def _draw(route: Route, count: int, seed: int) -> list[FuzzRequest]:
    drawn: list[FuzzRequest] = []

    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    @given(requests_for([route]))
    def collect(request: FuzzRequest) -> None:
        drawn.append(request)

    collect()
    return drawn[:count]


# -- sending ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    webhooks_acknowledged: int = 0
    """Answered 200 as new: each must be a row in ``webhook_deliveries``."""
    webhook_event_ids: set[str] = field(default_factory=set)
    """The plain ``event_id`` of each of those (the others are keyed by content)."""

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def _csrf(html: str) -> str:
    found = _CSRF_IN_HTML.search(html)
    if found is None:
        raise AssertionError("no CSRF token on the page")
    return unescape(found.group(1))


class Fuzzer:
    """Sends :class:`FuzzRequest` values to a running service at ``base_url``.

    The trusted client (from ``127.0.0.1``) holds the admin's session and sends the Basic,
    session and ingest requests; the hostile one (from :data:`HOSTILE_ADDRESS`) holds an
    anonymous session and sends the rest.
    """

    def __init__(self, base_url: str, *, admin_password: str, ingest_token: str):
        self.base_url = base_url.rstrip("/")
        self.admin_password = admin_password
        self.ingest_token = ingest_token
        self.conf = ""
        self.csrf = ""
        self.hostile_csrf = ""

    async def __aenter__(self) -> Fuzzer:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        self.trusted = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=timeout
        )
        self.hostile = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(HOSTILE_ADDRESS, 0)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=timeout,
        )
        await self.log_in()
        async with self.hostile.get(self.url("/admin/login")) as resp:
            self.hostile_csrf = _csrf(await resp.text())
        await self.refresh_conf()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.trusted.close()
        await self.hostile.close()

    def url(self, target: str) -> URL:
        return URL(self.base_url + target, encoded=True)

    @property
    def basic(self) -> dict[str, str]:
        token = base64.b64encode(f"admin:{self.admin_password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def log_in(self) -> None:
        async with self.trusted.get(self.url("/admin/login")) as resp:
            token = _csrf(await resp.text())
        form = {"csrf_token": token, "password": self.admin_password}
        async with self.trusted.post(
            self.url("/admin/login"), data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303, f"login answered {resp.status}"
        async with self.trusted.get(self.url("/admin")) as resp:
            assert resp.status == 200, f"the settings page answered {resp.status}"
            self.csrf = _csrf(await resp.text())

    async def admin(self, method: str, target: str, **kwargs: Any) -> Any:
        async with self.trusted.request(
            method, self.url(target), headers=self.basic, **kwargs
        ) as resp:
            text = await resp.text()
            assert resp.status < 300, f"{method} {target}: {resp.status} {text[:500]}"
            return json.loads(text)

    async def refresh_conf(self) -> None:
        url = URL((await self.admin("GET", "/api/webhook-url"))["url"])
        self.conf = quote(url.query["conf"], safe="")

    def _prepare(self, request: FuzzRequest) -> tuple[aiohttp.ClientSession, str, dict, Any]:
        # A wrong password on the login form counts against the sender's address.
        login = request.target.startswith("/admin/login")
        trusted = request.auth in ("basic", "session", "ingest") and not login
        token = self.csrf if trusted else self.hostile_csrf
        headers = {k: v.replace(CSRF, token) for k, v in request.headers}
        if request.auth == "basic":
            headers.update(self.basic)
        elif request.auth == "ingest":
            headers["Authorization"] = f"Bearer {self.ingest_token}"
        body = request.body
        if body is not None:
            body = body.replace(CSRF.encode(), token.encode())
        target = request.target.replace(CONF, self.conf)
        return (self.trusted if trusted else self.hostile), target, headers, body

    async def send(self, request: FuzzRequest, outcome: Outcome) -> int:
        session, target, headers, body = self._prepare(request)
        skip = () if "Content-Type" in headers else ("Content-Type",)
        try:
            async with session.request(
                request.method,
                self.url(target),
                headers=headers,
                data=body,
                skip_auto_headers=skip,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                answer = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome.transport_errors.append(f"{type(exc).__name__}: {exc} <- {request.describe()}")
            return 0
        outcome.statuses[status] += 1
        outcome.by_kind[(request.kind, status)] += 1
        if status >= 500:
            outcome.server_errors.append(f"{status} {answer[:200]!r} <- {request.describe()}")
        if request.kind == "webhook" and status == 200 and b'"duplicate"' not in answer:
            outcome.webhooks_acknowledged += 1
            event_id = _plain_event_id(body)
            if event_id is not None:
                outcome.webhook_event_ids.add(event_id)
        await self._after(request, status)
        return status

    async def _after(self, request: FuzzRequest, status: int) -> None:
        """Keep the trusted client able to go on: log in again after the fuzz logged it out,
        and follow a rotated webhook token."""
        if status >= 400 or request.method != "POST":
            return
        path = request.target.split("?", 1)[0]
        if request.auth == "session" and path == "/admin/logout":
            await self.log_in()
        if path.endswith("/webhook-url/rotate"):
            await self.refresh_conf()

    async def run(
        self,
        requests: Iterable[FuzzRequest],
        outcome: Outcome | None = None,
        *,
        concurrency: int = 1,
        progress: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Send ``requests`` in order, ``concurrency`` at a time."""
        outcome = outcome or Outcome()
        queue = iter(requests)

        async def worker() -> None:
            for request in queue:
                await self.send(request, outcome)
                if progress is not None:
                    progress(outcome.sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcome

    # -- afterwards: nothing stalled -------------------------------------------------------

    async def restore_settings(self, baseline: dict[str, Any]) -> None:
        """Undo what the fuzz saved: ``baseline`` is ``GET /api/settings`` from before, with
        the secrets it masks given in clear."""
        await self.admin("PATCH", "/api/settings", json=baseline)

    async def wait_processed(self, timeout: float = 60) -> dict[str, Any]:
        """Inbound stats once no delivery is pending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            current = await self.admin("GET", "/api/inbound/stats")
            if not current["deliveries"].get("pending"):
                return current
            if loop.time() > deadline:
                raise AssertionError(f"deliveries still pending after {timeout:g} s: {current}")
            await asyncio.sleep(0.1)

    async def check_still_flowing(self, user_id: str) -> dict[str, Any]:
        """A normal notification is stored and synced, a normal webhook acknowledged and
        tracked on that user; returns the user as ``GET /api/users/{id}`` shows it."""
        external_id = f"ext-{user_id}"
        body = {
            "notification_id": f"n-{user_id}",
            "channel": "user:update",
            "messages": [
                {
                    "user": {
                        "id": user_id,
                        "external_id": external_id,
                        "email": f"{user_id}@example.com",
                        "created_at": "2018-03-30T14:38:02Z",
                        "first_name": "Ana",
                    },
                    "segments": [{"id": "seg-paying", "name": "Paying"}],
                    "events": [],
                }
            ],
        }
        headers = {"Authorization": f"Bearer {self.ingest_token}"}
        async with self.trusted.post(self.url("/smart-notifier"), json=body, headers=headers) as r:
            answer = await r.json()
            assert r.status == 200 and answer["accepted"] == 1, (r.status, answer)
        await self.admin("POST", "/api/sync?wait=1")
        await self.refresh_conf()
        webhook = {
            "event_id": f"ev-{user_id}",
            "object_type": "email",
            "metric": "opened",
            "timestamp": 1613063089,
            "data": {"identifiers": {"id": external_id}, "subject": "Hello"},
        }
        async with self.trusted.post(self.url(f"/webhook?conf={self.conf}"), json=webhook) as r:
            answer = await r.json()
            assert r.status == 200 and answer == {"ok": True}, (r.status, answer)
        await self.wait_processed()
        user = await self.admin("GET", f"/api/users/{quote(user_id, safe='')}")
        assert user["sync"]["status"] == "synced", user["sync"]
        tracked = [e["event_id"] for e in user["tracked_events"]]
        assert f"ev-{user_id}" in tracked, tracked
        return user

    async def deliveries(self) -> int:
        stats = await self.admin("GET", "/api/inbound/stats")
        return sum(stats["deliveries"].values())


def _plain_event_id(body: bytes | None) -> str | None:
    try:
        payload = json.loads(body or b"")
    except ValueError:
        return None
    event_id = payload.get("event_id") if isinstance(payload, dict) else None
    if isinstance(event_id, str) and event_id.isascii() and event_id.isalnum():
        return event_id
    return None
