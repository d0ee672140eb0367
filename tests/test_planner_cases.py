"""Planner cases as data: each tests/cases/**/*.yaml holds `desired` (manifest documents), `live`
(objects as a provider reads them), optional `options` and `context`, and `expect`: the non-noop
actions in order. One generic runner, one test per file, no I/O."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reconciler import manifests, planner
from reconciler.model import HostFacts, Live, Options, ResourceId, Snapshot
from reconciler.units import parse_bytes

CASES = sorted((Path(__file__).parent / "cases").rglob("*.yaml"))
BYTE_FIELDS = {"memory", "maxMemory", "capacity"}


def _live(entry: dict) -> Live:
    spec = {k: parse_bytes(v) if k in BYTE_FIELDS and isinstance(v, str) else v
            for k, v in (entry.get("spec") or {}).items()}
    facts = dict(entry.get("facts") or {})
    if "running" in entry:
        facts["running_spec"] = entry["running"]
    if "running_spec" in facts:
        facts["running_spec"] = {k: parse_bytes(v) if k in BYTE_FIELDS and isinstance(v, str) else v
                                 for k, v in facts["running_spec"].items()}
    scope = facts.pop("scope", "default")     # the marker's scope: typed ownership, not a fact
    return Live(ResourceId(entry["kind"], entry["name"]), spec, entry.get("labels") or {},
                entry.get("managed", True), facts, scope)


def load_case(path: Path):
    case = yaml.safe_load(path.read_text())
    docs = case.get("desired") or []
    resources = manifests.build(manifests.YamlSource().documents(str(path), yaml.safe_dump_all(docs))) if docs else []
    live = {l.id: l for l in map(_live, case.get("live") or [])}
    return case, resources, Snapshot(live, HostFacts(**(case.get("host") or {}))), Options(**(case.get("options") or {}))


@pytest.mark.parametrize("path", CASES, ids=[str(p.relative_to(p.parent.parent)) for p in CASES])
def test_case(path: Path):
    case, resources, snapshot, options = load_case(path)
    expect = case["expect"]
    if isinstance(expect, dict) and "error" in expect:
        with pytest.raises(planner.PlanError, match=expect["error"]):
            planner.plan(resources, snapshot, options)
        return
    plan = planner.plan(resources, snapshot, options)
    got = []
    for a in plan.actions:
        entry = {"verb": a.verb, "kind": a.id.kind, "name": a.id.name}
        got.append(entry)
    want = [{k: e[k] for k in ("verb", "kind", "name")} for e in expect]
    assert got == want, f"actions differ\n got: {got}\nwant: {want}"
    for a, e in zip(plan.actions, expect):
        if "fields" in e:
            assert sorted(a.fields) == sorted(e["fields"]), f"{a.id}: fields {a.fields}"
        if "modes" in e:
            assert {c.path: c.mode for c in a.changes} == e["modes"], f"{a.id}: modes"
        assert bool(a.refused) == bool(e.get("refused", False)), f"{a.id}: refused={a.refused!r}"
        assert bool(a.held) == bool(e.get("held", False)), f"{a.id}: held={a.held!r}"
    # Every decision explains itself, no-ops too.
    assert all(a.reason for a in plan.steps)
    if "unchanged" in case:
        assert len(plan.unchanged) == case["unchanged"]


def test_there_are_cases():
    assert len(CASES) >= 10
