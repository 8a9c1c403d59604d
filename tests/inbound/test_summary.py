"""A processing round's summary counts each delivery under one named outcome."""

from __future__ import annotations

import dataclasses

import pytest

from connector.inbound.processor import ProcessSummary

OUTCOMES = ["processed", "ignored", "unmatched", "invalid"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_summary_count_adds_to_its_outcome_only(outcome):
    summary = ProcessSummary()
    summary.count(outcome)
    summary.count(outcome, 4)
    assert dataclasses.asdict(summary) == {name: 5 if name == outcome else 0 for name in OUTCOMES}


@pytest.mark.parametrize("outcome", ["pending", "failed", ""])
def test_summary_count_refuses_what_is_no_delivery_outcome(outcome):
    summary = ProcessSummary()
    with pytest.raises(ValueError):
        summary.count(outcome)
    assert summary == ProcessSummary()
