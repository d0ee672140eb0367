"""The JSON object of `-o json` (contract section 3), made from an Outcome."""
from __future__ import annotations

import json
from typing import IO

from ..model import Action, FieldChange
from ..outcome import Outcome
from .values import as_json


def field_diff(a: Action, c: FieldChange) -> dict:
    """One field's before/after as JSON values (quantities in the units a user writes); a secret's never."""
    if c.secret:
        return {"path": c.path, "mode": c.mode, "secret": True}
    return {"path": c.path, "before": as_json(a.id.kind, c.path, c.before),
            "after": as_json(a.id.kind, c.path, c.after), "mode": c.mode}


def change(a: Action, status: str, message: str | None = None) -> dict:
    d = {"action": a.verb, "kind": a.id.kind, "name": a.id.name, "fields": a.fields,
         "status": status, "reason": a.reason, "diff": [field_diff(a, c) for c in a.changes]}
    if a.refused:
        d["error"] = a.refused
    elif a.held:
        d["held"] = a.held
    if message and status == "failed":
        d["error"] = message
    return d


def outcome_json(o: Outcome) -> dict:
    """The contract's object: changes, summary (and recap for apply), orphans; or the error."""
    d: dict = {}
    if o.plan is not None:
        if o.results is None:
            d["changes"] = [change(a, "failed" if a.refused else "planned") for a in o.plan.actions]
        else:
            d["changes"] = [change(r.action, r.status, r.message) for r in o.results if r.status != "ok"]
        d["summary"] = o.plan.summary()
        if o.results is not None:
            d["recap"] = o.recap.as_dict()
        d["orphans"] = [{"kind": i.kind, "name": i.name, "reason": r} for i, r in o.plan.orphans]
    elif o.skipped is not None:
        d.update({"changes": [], "summary": None, "skipped": True, "reason": o.skipped})
    if o.error is not None:
        d.update(o.error.as_dict())
    return d


def write(obj: dict, out: IO) -> None:
    json.dump(obj, out, indent=2, sort_keys=False)
    out.write("\n")
    out.flush()
