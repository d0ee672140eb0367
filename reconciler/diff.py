"""Compare a declared spec with a live one: only declared fields, lists keyed by identity, secrets write-only."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from .model import FieldChange


def keyed(items: Iterable[dict], key: Callable[[dict], Any]) -> dict:
    """A list as a mapping by identity, so that order never shows as drift."""
    return {key(i): i for i in items}


def field_changes(desired: dict, live: dict, fields: Iterable[str], *, mode: Callable[[str], str] | str = "live",
                  secret: frozenset = frozenset()) -> list[FieldChange]:
    """A FieldChange for each of `fields` whose desired and live values differ."""
    out = []
    for f in fields:
        d, l = desired.get(f), live.get(f)
        if d != l:
            m = mode(f) if callable(mode) else mode
            out.append(FieldChange(f"spec.{f}", l, d, m, secret=f in secret))
    return out
