"""Where a no-op plan's time goes, phase by phase, in one process, next to the cheaper alternative of
each lever (measured here, not guessed). Run by bench.py at the largest fleet, after its apply; prints
one JSON object. Targets come from the same RECONCILER_* environment the CLI reads.

    python bench/levers.py MANIFEST_DIR

Phases: imports, YAML (the current pure-Python composer vs libyaml's C one), JSON Schema
validation, kind rules, libvirt read, broker read, planning (with the time in password
verification and in per-role Topic ACL collection split out).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clock():
    return time.perf_counter()


def main(mdir: str) -> dict:
    out: dict = {}
    t = clock()
    import yaml  # noqa: F401
    from reconciler import manifest, planner
    from reconciler.model import Options
    out["import_core_s"] = clock() - t

    files = manifest.find_files([mdir])
    # YAML: the loader manifest.load uses now ...
    t = clock()
    docs = [(f, d, n) for f in files for d, n in manifest.load_documents(f)]
    out["yaml_current_s"] = clock() - t
    out["documents"] = len(docs)
    # ... vs libyaml's C composer + constructor, keeping the same Python checks on the node tree.
    t = clock()
    for f in files:
        loader = yaml.CSafeLoader(Path(f).read_text(encoding="utf-8"))
        try:
            while loader.check_node():
                node = loader.get_node()
                manifest._check_nodes(node, f)
                loader.construct_document(node)
        finally:
            loader.dispose()
    out["yaml_libyaml_s"] = clock() - t
    # A depth guard for the C composer: walk libyaml's event stream (C) counting nesting.
    t = clock()
    for f in files:
        depth = 0
        for ev in yaml.parse(Path(f).read_text(encoding="utf-8"), Loader=yaml.CSafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    out["yaml_libyaml_depth_guard_s"] = clock() - t

    t = clock()
    for _, d, _ in docs:
        manifest.validator(d["kind"])
    out["schema_compile_s"] = clock() - t
    t = clock()
    for _, d, _ in docs:
        for _ in manifest.validator(d["kind"]).iter_errors(d):
            pass
    out["schema_validate_s"] = clock() - t

    t = clock()
    resources = manifest.load([mdir])
    out["manifest_load_total_s"] = clock() - t

    from reconciler.run import Targets, make_providers
    pw = os.environ.get("RECONCILER_MQTT_PASSWORD")
    targets = Targets(os.environ.get("RECONCILER_LIBVIRT_URI", "qemu:///system"),
                      os.environ.get("RECONCILER_MQTT_URL", "mqtt://127.0.0.1:1883"),
                      os.environ.get("RECONCILER_MQTT_USERNAME"), pw)
    kinds = {r.id.kind for r in resources}
    t = clock()
    providers = make_providers(kinds, targets)
    out["import_providers_s"] = clock() - t
    from reconciler.model import Snapshot
    snap = Snapshot()
    seen = []
    for k, p in providers.items():
        if any(p is q for q in seen):
            continue
        seen.append(p)
        mine = frozenset(x for x, q in providers.items() if q is p)
        t = clock()
        snap = snap.merged(p.read(mine))
        out["read_" + ("libvirt" if "VirtualMachine" in mine else "mqtt") + "_s"] = clock() - t

    # Planning, with the two hot spots timed through wrappers.
    spent = {"verify": 0.0, "topic_acls": 0.0, "verify_calls": 0, "topic_acls_calls": 0}
    try:
        from reconciler.kinds import mqtt as kmqtt

        def wrap(name):
            real = getattr(kmqtt, name)

            def timed(*a, **kw):
                t0 = clock()
                try:
                    return real(*a, **kw)
                finally:
                    spent[name] += clock() - t0
                    spent[name + "_calls"] += 1
            setattr(kmqtt, name, timed)
        for name in ("verify", "topic_acls"):
            if hasattr(kmqtt, name):
                wrap(name)
    except ImportError:
        pass
    t = clock()
    plan = planner.plan(resources, snap, Options())
    out["plan_s"] = clock() - t
    out.update({f"plan_{k}_s" if not k.endswith("calls") else f"plan_{k}": v for k, v in spent.items()})
    out["plan_actions"] = len(plan.actions)

    # Alternatives for the two hot spots.
    import hashlib
    from reconciler import secrets
    n = spent["verify_calls"]
    if n:
        iters = getattr(secrets, "FINGERPRINT_ITERATIONS", 0)
        t = clock()
        for _ in range(n):
            hashlib.pbkdf2_hmac("sha256", b"x", b"0123456789abcdef", 1000)
        out["alt_verify_1000_iterations_s"] = clock() - t
        out["fingerprint_iterations"] = iters
    if spent["topic_acls_calls"]:
        # One pass over the Topics building a role -> ACLs index, instead of one sorted pass per role.
        t = clock()
        index: dict = {}
        by_id = {r.id: r for r in resources}
        for rid in sorted(by_id):
            if rid.kind != "Topic":
                continue
            spec = by_id[rid].spec
            for role in spec.get("publishers", ()):
                index.setdefault(role, []).append({"type": "publishClientSend", "topic": rid.name, "allow": True, "priority": 0})
            for role in spec.get("subscribers", ()):
                index.setdefault(role, []).append({"type": "subscribeLiteral", "topic": rid.name, "allow": True, "priority": 0})
        out["alt_topic_acls_index_s"] = clock() - t
    for p in seen:
        p.close()
    return out


def yaml_only(mdir: str) -> dict:
    import yaml
    from reconciler import manifest
    files = manifest.find_files([mdir])
    t = clock()
    for f in files:
        manifest.load_documents(f)
    now = clock() - t
    t = clock()
    for f in files:
        loader = yaml.CSafeLoader(Path(f).read_text(encoding="utf-8"))
        try:
            while loader.check_node():
                node = loader.get_node()
                manifest._check_nodes(node, f)
                loader.construct_document(node)
        finally:
            loader.dispose()
    return {"yaml_current_s": now, "yaml_libyaml_s": clock() - t}


if __name__ == "__main__":
    if sys.argv[1] == "--yaml-only":
        print(json.dumps(yaml_only(sys.argv[2])))
    else:
        print(json.dumps(main(sys.argv[1])))
