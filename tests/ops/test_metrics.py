"""The Prometheus output through the running service: label values that come from webhook
payloads stay within a known set, whatever Customer.io (or anyone with the URL) sends."""

from __future__ import annotations

import random
import re
import string

from ..inbound.test_service import post_webhook, wait_processed, webhook_path

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
