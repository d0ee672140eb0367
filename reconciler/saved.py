"""Saved plans (`plan --out FILE`, `show FILE`, `apply FILE`): the reviewed plan as a stable,
versioned JSON file with no secret in it, and the check that lets `apply FILE` do exactly what was
reviewed or nothing at all.

How staleness is judged. A saved action holds, besides its verb, fields and reason, the live values
it was planned against (the `before` side of each field it changes, secrets as "changed" only) and a
fingerprint of them. `apply FILE` re-reads the manifests (their digest must be the one saved),
re-reads live state and plans again with the saved flags; then each saved action must come out of
that plan identical: same verb, same fields, same live values. A VM resized by hand, a retained
message overwritten, an object that appeared or vanished, a plan applied once already (its objects
now in sync) all make some action differ, and the whole file is refused naming each one. Live
changes the plan never compared (an undeclared field) do not make it stale: the reviewed actions
would still do the same. Actions the new plan has beyond the saved ones are not applied.

The file's own integrity: a sha256 over its canonical JSON body. A hand edit that keeps the hash
right still cannot add an action, because every action must also be in the fresh plan.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import Targets
from .errors import ReconcilerError
from .model import Action, FieldChange, Options, Plan, Resource, ResourceId
from .outcome import Outcome
from .render.jsonout import field_diff
from .render.values import as_json

FORMAT = "reconciler-plan"
VERSION = 1


class StalePlan(ReconcilerError):
    """A saved plan that no longer describes what apply would do, or a damaged or foreign file."""


# --------------------------------------------------------------------------- writing

def _action(a: Action) -> dict:
    d: dict[str, Any] = {"action": a.verb, "kind": a.id.kind, "name": a.id.name, "reason": a.reason}
    if a.verb == "noop":
        return d
    d["fields"] = a.fields
    d["diff"] = [field_diff(a, c) for c in a.changes]
    if a.refused:
        d["refused"] = a.refused
    if a.held:
        d["held"] = a.held
    d["live"] = fingerprint(a)
    if a.verb == "create" and a.desired is not None:
        # What a create creates, as `plan --diff` shows it (secrets as "(secret)", never a value).
        d["creates"] = {key: as_json(a.id.kind, f"spec.{key}", a.desired.spec.get(key))
                        for key in sorted(a.desired.declared)}
        if a.desired.labels:
            d["labels"] = dict(a.desired.labels)
    return d


def fingerprint(a: Action) -> str:
    """sha256 of what this action compared in live state: the object's existence, its ownership and
    the live (`before`) value of every field it changes; secret fields count as "differs", no value."""
    live = a.live
    facts = {"exists": live is not None,
             "managed": bool(live and live.managed),
             "before": [[c.path, "secret" if c.secret else field_diff(a, c).get("before"), c.mode] for c in a.changes],
             "verb": a.verb}
    return "sha256:" + hashlib.sha256(_canonical(facts)).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _targets_used(plan: Plan, targets: Targets, scope: str) -> dict:
    from .kinds.registry import BY_NAME
    used = {BY_NAME[a.id.kind].target for a in plan.steps}
    return {"libvirt": targets.libvirt_uri if "libvirt" in used else None,
            "mqtt": targets.mqtt_url if "mqtt" in used else None,
            "scope": scope}


def document(o: Outcome, paths: list[str], targets: Targets, options: Options,
             password_source: dict | None = None) -> dict:
    """The saved plan of an Outcome (of a plan run) as a JSON-ready dict, integrity included."""
    if o.plan is None:
        raise StalePlan("there is no plan to save (the run stopped before planning)")
    body = {
        "format": FORMAT,
        "version": VERSION,
        "reconciler": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": o.host,
        "target": {**_targets_used(o.plan, targets, options.scope), "mqttUsername": targets.mqtt_username},
        "flags": {"prune": options.prune, "force": options.force, "allow_restart": options.allow_restart,
                  "allow_replace": options.allow_replace},
        "manifests": {"paths": list(paths), "digest": o.digest},
        "steps": [_action(a) for a in o.plan.steps],
        "orphans": [{"kind": i.kind, "name": i.name, "reason": r} for i, r in o.plan.orphans],
        "summary": o.plan.summary(),
    }
    if password_source is not None:
        # Where the broker password comes from, never its value (inventory hosts).
        body["target"]["mqttPasswordSource"] = password_source
    body["integrity"] = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    return body


def write(path: str, doc: dict) -> None:
    """Atomically: a CI artifact is never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class SavedPlan:
    file: str
    doc: dict

    @property
    def paths(self) -> list[str]:
        return list(self.doc["manifests"]["paths"])

    @property
    def digest(self) -> str:
        return self.doc["manifests"]["digest"]

    @property
    def host(self) -> str | None:
        return self.doc.get("host")

    def options(self, shutdown_timeout: float = 60.0) -> Options:
        f = self.doc["flags"]
        return Options(prune=f["prune"], force=f["force"], allow_restart=f["allow_restart"],
                       allow_replace=f["allow_replace"], scope=self.doc["target"]["scope"],
                       shutdown_timeout=shutdown_timeout)

    def plan(self) -> Plan:
        """The saved plan as a Plan value, for rendering (`show`): actions without live objects."""
        steps = []
        for s in self.doc["steps"]:
            rid = ResourceId(s["kind"], s["name"])
            changes = tuple(FieldChange(d["path"], d.get("before"), d.get("after"), d.get("mode", "live"),
                                        bool(d.get("secret"))) for d in s.get("diff", []))
            desired = None
            if "creates" in s:
                desired = Resource(rid, s["creates"], s.get("labels") or {}, frozenset(s["creates"]))
            steps.append(Action(s["action"], rid, s["reason"], changes, desired=desired, refused=s.get("refused"),
                                held=s.get("held")))
        orphans = tuple((ResourceId(o["kind"], o["name"]), o["reason"]) for o in self.doc.get("orphans", []))
        return Plan(tuple(steps), orphans)


def looks_saved(path: str) -> bool:
    """A file that is a saved plan rather than a manifest (a JSON object with our format tag)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(200).lstrip()
    except OSError:
        return False
    return head.startswith(b"{") and FORMAT.encode() in head


def read(path: str) -> SavedPlan:
    """A saved plan, its format, version and integrity checked."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise StalePlan(f"{path}: cannot read the plan file: {e.strerror}") from None
    except ValueError as e:
        raise StalePlan(f"{path}: not a plan file (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StalePlan(f"{path}: not a reconciler plan file")
    if doc.get("version") != VERSION:
        raise StalePlan(f"{path}: plan file version {doc.get('version')!r}; this reconciler reads version {VERSION}: "
                        "plan again with this version")
    claimed = doc.pop("integrity", None)
    actual = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()
    doc["integrity"] = claimed
    if claimed != actual:
        raise StalePlan(f"{path}: the plan file was altered after it was written (integrity check failed): "
                        "plan again and review the new plan")
    return SavedPlan(path, doc)


# --------------------------------------------------------------------------- checking

def check_target(saved: SavedPlan, targets: Targets, scope: str, explicit_scope: bool) -> None:
    """A plan made for another libvirt host, broker or scope is refused."""
    t = saved.doc["target"]
    wrong = []
    if t.get("libvirt") and t["libvirt"] != targets.libvirt_uri:
        wrong.append(f"libvirt {t['libvirt']} (this run: {targets.libvirt_uri})")
    if t.get("mqtt") and t["mqtt"] != targets.mqtt_url:
        wrong.append(f"broker {t['mqtt']} (this run: {targets.mqtt_url})")
    if explicit_scope and t["scope"] != scope:
        wrong.append(f"scope {t['scope']} (this run: {scope})")
    if wrong:
        raise StalePlan(f"{saved.file}: the plan was made for {', '.join(wrong)}: refusing to apply it here")


def check_flags(saved: SavedPlan, options: Options, given: set[str]) -> None:
    """Flags given to `apply FILE` must be the plan's own: they would plan differently."""
    f = saved.doc["flags"]
    now = {"prune": options.prune, "force": options.force, "allow_restart": options.allow_restart,
           "allow_replace": options.allow_replace}
    differ = [k for k in given if k in now and now[k] != f[k]]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} ({'given' if now[k] else 'not given'} now, "
                          f"{'given' if f[k] else 'not given'} at plan time)" for k in sorted(differ))
        raise StalePlan(f"{saved.file}: {shown}: these flags change the plan; plan again with the flags you want")


def reviewer(saved: SavedPlan):
    """The function run.reconcile calls with the fresh plan and the manifests' digest: the saved
    actions (as freshly planned, so they carry today's live objects) in the saved order, or
    StalePlan naming what changed."""

    def review(fresh: Plan, digest: str | None) -> Plan:
        if digest != saved.digest:
            raise StalePlan(f"{saved.file}: the manifests changed since the plan (their content differs): "
                            "plan again and review the new plan")
        # One object may have two actions (an update and the restart it needs): key by both.
        by_key = {(a.id, a.verb): a for a in fresh.actions}
        verbs: dict[ResourceId, list[str]] = {}
        for a in fresh.actions:
            verbs.setdefault(a.id, []).append(a.verb)
        stale: list[str] = []
        keep: list[Action] = []
        for s in saved.doc["steps"]:
            if s["action"] == "noop":
                continue
            rid = ResourceId(s["kind"], s["name"])
            now = by_key.get((rid, s["action"]))
            if now is None:
                if rid in verbs:
                    stale.append(f"{rid} changed since the plan: now {' and '.join(verbs[rid])} instead of {s['action']}")
                else:
                    stale.append(f"{rid} changed since the plan: now in sync, nothing to do (applied already?)")
                continue
            if now.fields != s.get("fields"):
                what = sorted(set(now.fields) ^ set(s.get("fields", []))) or now.fields
                stale.append(f"{rid} changed since the plan: {', '.join(what)}")
                continue
            if fingerprint(now) != s.get("live"):
                saved_before = {d["path"]: d.get("before") for d in s.get("diff", [])}
                moved = [c.path for c in now.changes
                         if c.secret or field_diff(now, c).get("before") != saved_before.get(c.path)]
                stale.append(f"{rid} changed since the plan: {', '.join(moved) or 'its live state'}")
                continue
            keep.append(now)
        if stale:
            raise StalePlan(f"{saved.file} is stale, nothing was changed: " + "; ".join(stale)
                            + ". Plan again and review the new plan")
        return Plan(tuple(keep), fresh.orphans)

    return review
