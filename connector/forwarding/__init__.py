"""Forwarding inbound events to a Segment-compatible destination (SPEC §7)."""
