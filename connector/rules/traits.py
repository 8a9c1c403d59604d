"""The platform's ``traits_`` prefix: stored attributes never carry it."""

from __future__ import annotations

TRAITS_PREFIX = "traits_"


def unprefixed(path: str) -> str:
    """The attribute key a path names: without a leading ``traits_``, so that ``traits_x`` and
    ``x`` are one attribute."""
    if path.startswith(TRAITS_PREFIX) and len(path) > len(TRAITS_PREFIX):
        return path[len(TRAITS_PREFIX) :]
    return path
