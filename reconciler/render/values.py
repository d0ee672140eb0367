"""How a field's value is shown to people and in JSON: each kind says how (its `show`), secrets never."""
from __future__ import annotations

import json
from typing import Any

from ..secrets import Secret


def shown(kind: str, path: str, value: Any) -> Any:
    """A value as a user writes it in a manifest (bytes back to units), through the kind's own `show`."""
    if isinstance(value, Secret):
        return "(secret)"
    from ..kinds.registry import BY_NAME
    show = getattr(BY_NAME.get(kind), "show", None)
    return show(path, value) if show is not None else value


def as_text(kind: str, path: str, value: Any) -> str:
    """One value for a text line, in YAML's spelling: true/false, null as (none), mappings as flow JSON."""
    v = shown(kind, path, value)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "(none)"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(", ", ": "), default=str)
    return str(v)


def as_json(kind: str, path: str, value: Any) -> Any:
    return json.loads(json.dumps(shown(kind, path, value), default=str))
