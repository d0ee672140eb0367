"""The ownership marker: how a role, group or client made by the reconciler says so, inside dynsec's
`textdescription`, and how a retained message says so, in MQTT v5 user properties. Pure functions.

textdescription = the user's description, a newline, and one marker line:

    sensor firmware
    reconciler:v1 {"labels":{"site":"plant-3"},"pw":"pbkdf2-sha256$1000$...$...","scope":"edge"}

The description round-trips unchanged (everything before the last line); a text without the marker
line is an unmarked object and all of it is the description. `pw` (clients only) is the salted
fingerprint of the password the reconciler last applied, never the password; `scope` (absent for
the default scope) is the ownership scope of the run that wrote it (--prune keeps to its own scope).

A retained message carries the user properties `managed-by: reconciler` and, when it has labels,
`reconciler-labels: {"k":"v"}`, and outside the default scope `reconciler-scope: NAME`.
"""
from __future__ import annotations

import json
from typing import Any

PREFIX = "reconciler:v1 "
PROPERTY = ("managed-by", "reconciler")
LABELS_PROPERTY = "reconciler-labels"
SCOPE_PROPERTY = "reconciler-scope"
DEFAULT_SCOPE = "default"


def encode(description: str | None, marker: dict[str, Any]) -> str:
    line = PREFIX + json.dumps(marker, separators=(",", ":"), sort_keys=True)
    return f"{description}\n{line}" if description else line


def decode(text: str | None) -> tuple[str | None, dict | None]:
    """(description, marker) of a textdescription; marker is None for an unmarked object."""
    if not text:
        return None, None
    head, sep, last = text.rpartition("\n")
    if last.startswith(PREFIX):
        try:
            marker = json.loads(last[len(PREFIX):])
        except ValueError:
            marker = None
        if isinstance(marker, dict):
            return (head if sep and head else None), marker
    return text, None


def user_properties(labels: dict[str, str], scope: str = DEFAULT_SCOPE) -> list[tuple[str, str]]:
    props = [PROPERTY]
    if labels:
        props.append((LABELS_PROPERTY, json.dumps(dict(sorted(labels.items())), separators=(",", ":"))))
    if scope != DEFAULT_SCOPE:
        props.append((SCOPE_PROPERTY, scope))
    return props


def read_properties(props: list[tuple[str, str]] | None) -> tuple[bool, dict[str, str], str]:
    """(managed, labels, scope) from a retained message's user properties."""
    props = props or []
    managed = tuple(PROPERTY) in [tuple(p) for p in props]
    labels: dict[str, str] = {}
    scope = DEFAULT_SCOPE
    for k, v in props:
        if k == SCOPE_PROPERTY:
            scope = v
        if k == LABELS_PROPERTY:
            try:
                data = json.loads(v)
                if isinstance(data, dict):
                    labels = {str(a): str(b) for a, b in data.items()}
            except ValueError:
                pass
    return managed, (labels if managed else {}), scope
