"""Where a no-op plan's time goes, phase by phase, in one process, each phase next to the measured
alternative it was chosen over (or, for the second domain XML, what restart detection costs). Run by
bench.py at the largest fleet, after its apply; prints one JSON object. Targets come from the same
RECONCILER_* environment the CLI reads.

    python bench/levers.py MANIFEST_DIR
"""
from __future__ import annotations

import gc
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
    from reconciler import manifests as manifest, planner
    from reconciler.manifests.build import fast_validator, validator
    from reconciler.model import Options
    out["import_core_s"] = clock() - t

    texts = [(f, manifest.read_text(f)) for f in manifest.find_files([mdir])]

    def parse_texts(texts):
        src = manifest.YamlSource()
        return [d for f, t in texts for d in src.documents(f, t)]

    # YAML: libyaml's composer with the collector at Python's default thresholds, then at the CLI's,
    # both without the parse cache; then from a warm cache (manifests/cache.py) in a temp folder.
    import tempfile
    from reconciler.manifests import cache as parse_cache
    parse_cache._state["folder"] = None
    gc.set_threshold(700, 10, 10)
    t = clock()
    parse_texts(texts)
    out["yaml_default_gc_s"] = clock() - t
    gc.collect()
    gc.set_threshold(200_000, 50, 100)   # what reconciler.cli.main sets
    t = clock()
    docs = parse_texts(texts)
    out["yaml_s"] = clock() - t
    out["documents"] = len(docs)
    with tempfile.TemporaryDirectory() as d:
        os.environ["RECONCILER_CACHE_DIR"] = d
        os.environ.pop("RECONCILER_CACHE", None)
        parse_cache._state.clear()
        parse_texts(texts)                 # fills it
        t = clock()
        docs = parse_texts(texts)
        out["yaml_cached_s"] = clock() - t
    # Back to the user's cache folder (the temp one is gone): the reads below use the libvirt XML
    # cache as a plan does.
    os.environ.pop("RECONCILER_CACHE_DIR", None)
    parse_cache._state.clear()

    # JSON Schema: jsonschema-rs's "valid?" (used) vs jsonschema's full validation (the error path).
    for doc in docs:
        validator(doc.data["kind"])
        fast_validator(doc.data["kind"])
    t = clock()
    for doc in docs:
        fast_validator(doc.data["kind"]).is_valid(doc.data)
    out["schema_rs_s"] = clock() - t
    t = clock()
    for doc in docs:
        for _ in validator(doc.data["kind"]).iter_errors(doc.data):
            pass
    out["schema_py_s"] = clock() - t

    t = clock()
    resources = manifest.build(docs)
    out["build_s"] = clock() - t

    from reconciler.config import Targets
    from reconciler.run import make_providers, unique as _unique
    targets = Targets(os.environ.get("RECONCILER_LIBVIRT_URI", "qemu:///system"),
                      os.environ.get("RECONCILER_MQTT_URL", "mqtt://127.0.0.1:1883"),
                      os.environ.get("RECONCILER_MQTT_USERNAME"), os.environ.get("RECONCILER_MQTT_PASSWORD"))
    t = clock()
    providers = make_providers({r.id.kind for r in resources}, targets)
    out["import_providers_s"] = clock() - t
    from reconciler.model import Snapshot
    snap = Snapshot()
    for p in _unique(providers):
        mine = frozenset(x for x, q in providers.items() if q is p)
        t = clock()
        snap = snap.merged(p.read(mine))
        out["read_" + ("libvirt" if "VirtualMachine" in mine else "mqtt") + "_s"] = clock() - t
        if "VirtualMachine" in mine:
            # The second XML of each running domain (its live view) is what restart detection costs.
            import libvirt
            conn = p.conn
            running = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)
            t = clock()
            for dom in running:
                dom.XMLDesc(0)
            out["live_xml_sequential_s"] = clock() - t
            out["running_domains"] = len(running)

    t = clock()
    plan = planner.plan(resources, snap, Options(scope=os.environ.get("RECONCILER_SCOPE", "default")))
    out["plan_s"] = clock() - t
    out["plan_actions"] = len(plan.actions)
    for p in _unique(providers):
        p.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
