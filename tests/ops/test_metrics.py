"""The Prometheus output through the running service: label values that come from webhook
payloads stay within a known set, whatever Customer.io (or anyone with the URL) sends; the
series alerts are written on (docs/alerts.yml) hold sane values after a pass and a webhook."""

from __future__ import annotations

import random
import re
import string
import time
from datetime import timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from connector.db.models import WebhookDelivery
from connector.db.types import utcnow
from connector.runtime import open_runtime
from connector.web.keys import runtime_key

from ..helpers import message, webhook
from ..inbound.test_service import post_webhook, wait_processed, webhook_path
from ..web.test_http import notify, sync

WEBHOOK_SAMPLE = re.compile(
    r'^connector_webhooks_total\{event="([^"]*)",outcome="([^"]*)"\} (\S+)$'
)


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase + "_", k=rng.randint(3, 12)))


async def webhook_samples(client) -> dict[tuple[str, str], float]:
    text = await (await client.get("/metrics")).text()
    found = (WEBHOOK_SAMPLE.match(line) for line in text.splitlines())
    return {(m[1], m[2]): float(m[3]) for m in found if m}


async def test_metrics_webhook_event_label_is_bounded_to_known_event_names(start_app):
    client = await start_app()
    path = await webhook_path(client)
    rng = random.Random(20240501)
    known = [("email", "delivered"), ("email", "clicked"), ("push", "opened")]
    unknown = [(_word(rng), _word(rng)) for _ in range(20)]
    unknown += [("email", _word(rng)) for _ in range(10)]
    unknown += [(_word(rng), "delivered") for _ in range(10)]
    pairs = known + unknown
    for number, (object_type, metric) in enumerate(pairs):
        payload = {
            "event_id": f"ev-{number}",
            "object_type": object_type,
            "metric": metric,
            "timestamp": 1714560000,
            "data": {"customer_id": f"c-{number}"},
        }
        assert (await post_webhook(client, path, payload)).status == 200
    await wait_processed(client, len(pairs))

    samples = await webhook_samples(client)
    events = {event for event, outcome in samples if outcome == "processed"}
    assert events == {"Email Delivered", "Email Link Clicked", "Push Opened", "other"}
    assert samples[("other", "processed")] == len(unknown)
    assert {event for event, outcome in samples if outcome == "stored"} == {""}


# -- the alerting series ---------------------------------------------------------------------


async def samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and sorted labels."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await resp.text())
        for sample in family.samples
    }


def value(found, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def test_metrics_alerting_series_after_a_pass_and_a_webhook(start_app, transport):
    client = await start_app()
    before = time.time()
    status, _ = await notify(client, message())
    assert status == 200
    await sync(client)
    after = time.time()
    path = await webhook_path(client)
    assert (await post_webhook(client, path, webhook("ev-1", customer_id="c1"))).status == 200
    await wait_processed(client, 1)

    found = await samples(client)
    assert before <= value(found, "connector_last_successful_sync_timestamp_seconds") <= after
    request = "connector_customerio_request_duration_seconds"
    # Batch: the identify went in one batch request.
    operation = "batch" if transport == "batch" else "identify"
    assert value(found, f"{request}_count", operation=operation) == 1
    assert 0 < value(found, f"{request}_sum", operation=operation) < after - before
    lag = "connector_webhook_processing_lag_seconds"
    assert value(found, f"{lag}_count") == 1
    assert 0 <= value(found, f"{lag}_sum") < 60
    assert value(found, f"{lag}_bucket", le="+Inf") == 1
    for queue in ("outbound_users", "inbound_deliveries", "forward_outbox"):
        assert value(found, "connector_queue_depth", queue=queue) == 0, queue
    assert value(found, "connector_status") == 0


async def test_metrics_queue_depths_count_the_waiting_work(start_app):
    client = await start_app()
    await notify(client, message("u1"), message("u2"))
    runtime = client.app[runtime_key]
    async with runtime.sessionmaker() as session, session.begin():
        # Claimed by another instance: it stays pending while this one looks.
        session.add(
            WebhookDelivery(
                event_id="ev-held",
                body="{}",
                headers={},
                received_at=utcnow(),
                status="pending",
                claimed_until=utcnow() + timedelta(hours=1),
            )
        )
    found = await samples(client)
    assert value(found, "connector_queue_depth", queue="outbound_users") == 2
    assert value(found, "connector_queue_depth", queue="inbound_deliveries") == 1


async def test_metrics_last_successful_sync_counts_a_pass_of_another_process(
    start_app, make_config
):
    client = await start_app()
    found = await samples(client)
    assert value(found, "connector_last_successful_sync_timestamp_seconds") == 0
    # What `connector sync --once` does in its own process, on the same database.
    async with open_runtime(make_config()) as cli:
        summary = await cli.sync.run_once("cli")
    assert summary.error is None
    found = await samples(client)
    assert time.time() - value(found, "connector_last_successful_sync_timestamp_seconds") < 60


async def test_metrics_credentials_error_is_no_successful_sync(start_app):
    client = await start_app(connector={"api_key": "wrong"})
    await notify(client, message())
    summary = await sync(client)
    assert summary["error"] == "Invalid credentials"
    found = await samples(client)
    assert value(found, "connector_last_successful_sync_timestamp_seconds") == 0
    assert value(found, "connector_status") == 2


async def test_metrics_sample_alert_rules_name_only_series_the_service_exports(start_app):
    client = await start_app()
    await notify(client, message())
    await sync(client)
    exported = {name for name, _ in await samples(client)}
    rules = (Path(__file__).parents[2] / "docs" / "alerts.yml").read_text()
    named = set(re.findall(r"\bconnector_[a-z_]+", rules))
    assert named and named <= exported, named - exported
