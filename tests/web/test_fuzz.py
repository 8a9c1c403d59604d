"""A bounded property-based fuzz of every route through the running service: no answer is a
5xx, every webhook acknowledged as new is stored, and afterwards a normal notification is
stored and synced and a normal webhook acknowledged and tracked (nothing stalled).

The requests come from ``tests/fuzzing.py`` (hypothesis strategies, drawn with a fixed seed so
CI sees the same ones every run); ``bench/fuzz.py`` sends 10,000 of them to a real
``connector serve``.
"""

from __future__ import annotations

from typing import Any

from ..conftest import ADMIN_PASSWORD, INGEST_TOKEN
from ..fuzzing import SECRET_SETTINGS, Fuzzer, Outcome, Route, draw_requests, routes_of
from .test_admin import logged_in

# Requests per test and database: the whole file stays within about a minute on SQLite and
# PostgreSQL together (bench/fuzz.py sends 10,000).
EVERY_ROUTE_REQUESTS = 1200
ONE_PIPELINE_REQUESTS = 400


async def started(start_app, fake_cio) -> tuple[Any, Fuzzer, dict[str, Any]]:
    client = await start_app()
    fuzzer = Fuzzer(
        str(client.make_url("/")), admin_password=ADMIN_PASSWORD, ingest_token=INGEST_TOKEN
    )
    await fuzzer.__aenter__()
    baseline = await fuzzer.admin("GET", "/api/settings")
    baseline.update({key: "" for key in SECRET_SETTINGS}, api_key=fake_cio.api_key)
    return client, fuzzer, baseline


async def fuzz(
    start_app, fake_cio, routes: list[Route] | None, seed: int, count: int = ONE_PIPELINE_REQUESTS
) -> Outcome:
    """Send the drawn requests, then check that nothing was lost or stalled."""
    client, fuzzer, baseline = await started(start_app, fake_cio)
    try:
        every_route = routes_of(client.app)
        requests = draw_requests(routes or every_route, count, seed)
        outcome = await fuzzer.run(requests)
        assert not outcome.server_errors, "\n".join(outcome.server_errors)
        assert not outcome.transport_errors, "\n".join(outcome.transport_errors)
        await fuzzer.restore_settings(baseline)
        await fuzzer.check_still_flowing(f"fuzz-after-{seed}")
        # The fuzz's acknowledged webhooks and the normal one, each stored once.
        assert await fuzzer.deliveries() == outcome.webhooks_acknowledged + 1
        return outcome
    finally:
        await fuzzer.__aexit__(None, None, None)


async def test_fuzz_every_route_gets_no_5xx_and_nothing_stalls(start_app, fake_cio):
    outcome = await fuzz(start_app, fake_cio, None, seed=1, count=EVERY_ROUTE_REQUESTS)
    kinds = {kind for kind, _ in outcome.by_kind}
    assert kinds >= {"notification", "webhook", "settings", "admin", "api", "public"}


async def test_fuzz_notifications_get_no_5xx_and_nothing_stalls(start_app, fake_cio):
    routes = [Route("POST", "/smart-notifier"), Route("POST", "/batch")]
    outcome = await fuzz(start_app, fake_cio, routes, seed=2)
    assert outcome.statuses[200] > 0 and outcome.statuses[400] > 0


async def test_fuzz_webhooks_get_no_5xx_and_every_acknowledged_one_is_stored(start_app, fake_cio):
    outcome = await fuzz(start_app, fake_cio, [Route("POST", "/webhook")], seed=3)
    assert outcome.webhooks_acknowledged > 0 and outcome.statuses[400] > 0


async def test_fuzz_settings_and_admin_forms_get_no_5xx(start_app, fake_cio):
    routes = [
        Route("PATCH", "/api/settings"),
        Route("POST", "/admin/settings"),
        Route("POST", "/admin/login"),
        Route("POST", "/admin/test-connection"),
    ]
    outcome = await fuzz(start_app, fake_cio, routes, seed=4)
    assert outcome.statuses[400] > 0


async def test_fuzz_found_a_form_part_header_aiohttp_refuses_is_a_400(start_app):
    """Found by the fuzz: a multipart part header holding NUL and a stray quote was a 500."""
    client = await logged_in(start_app)
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="h"\xc3\x8a\x00\xf3\x93\xb2\x90"'
        b"\r\n\r\n\xed\xa0\x80\r\n--b0undary--\r\n"
    )
    resp = await client.post(
        "/admin/settings",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        allow_redirects=False,
    )
    assert resp.status == 400
    assert "could not be read" in await resp.text()
