"""A flush's summary counts each message under one named outcome."""

from __future__ import annotations

import pytest

from connector.forwarding.outbox import FlushSummary

OUTCOMES = ["sent", "retrying", "failed"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_summary_count_adds_to_its_outcome_only(outcome):
    summary = FlushSummary()
    summary.count(outcome, 2)
    summary.count(outcome)
    assert summary.as_dict() == {
        **{name: 3 if name == outcome else 0 for name in OUTCOMES},
        "batches": 0,
        "error": None,
    }


@pytest.mark.parametrize("outcome", ["pending", "batches", "error"])
def test_summary_count_refuses_what_is_no_message_outcome(outcome):
    summary = FlushSummary()
    with pytest.raises(ValueError):
        summary.count(outcome)
    assert summary == FlushSummary()
