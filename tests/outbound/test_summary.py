"""A pass's summary counts each user under one named outcome."""

from __future__ import annotations

import pytest

from connector.outbound.engine import SyncSummary

COUNTS = ["sent", "skipped", "deleted", "failed", "retrying"]


@pytest.mark.parametrize("outcome", COUNTS)
def test_summary_count_adds_to_its_outcome_only(outcome):
    summary = SyncSummary()
    summary.count(outcome)
    summary.count(outcome, 2)
    counted = {name: summary.as_dict()[name] for name in COUNTS}
    assert counted == {name: 3 if name == outcome else 0 for name in COUNTS}
    assert summary.users == 3
    assert (summary.events_sent, summary.api_calls) == (0, 0)


@pytest.mark.parametrize("outcome", ["synced", "anonymous", "events_sent", "api_calls", "users"])
def test_summary_count_refuses_what_is_no_user_outcome(outcome):
    summary = SyncSummary()
    with pytest.raises(ValueError):
        summary.count(outcome)
    assert summary == SyncSummary()
