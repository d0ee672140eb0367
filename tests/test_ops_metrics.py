"""--metrics-file: Prometheus text format for node_exporter's textfile collector, parsed after real
plan and apply runs on libvirt's test hypervisor; atomic (nothing half-written, no temp files left)."""
from __future__ import annotations

import re

import pytest

from helpers import cli, doc, write

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? '
                    r'(-?[0-9.]+(?:e[+-]?[0-9]+)?)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict:
    """{(name, frozenset(labels)): value}; fails on anything that is not exposition format."""
    assert text.endswith("\n")
    out: dict = {}
    typed: set = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge"
            typed.add(name)
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels = m.group(1), frozenset(LABEL.findall(m.group(3) or ""))
        assert name in typed, f"{name} has no # TYPE line before it"
        assert (name, labels) not in out, f"duplicate series {line!r}"
        out[(name, labels)] = float(m.group(4))
    return out


def get(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, frozenset(labels.items()))]


@pytest.mark.libvirt
def test_metrics_after_plan_and_apply(test_unix_uri, prefix, tmp_path):
    m = write(tmp_path / "m" / "vms.yaml",
              doc("VirtualMachine", f"{prefix}a", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1}),
              doc("VirtualMachine", f"{prefix}b", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1}))
    path = tmp_path / "textfile" / "reconciler.prom"
    path.parent.mkdir()
    uri = ["--libvirt-uri", test_unix_uri, "--metrics-file", str(path)]

    plan = cli("plan", str(m), *uri)
    assert plan.code == 2
    after_plan = parse(path.read_text())
    assert get(after_plan, "reconciler_drift", kind="VirtualMachine") == 2
    assert get(after_plan, "reconciler_drift", kind="Disk") == 0
    assert get(after_plan, "reconciler_changes", kind="VirtualMachine", action="create") == 0
    assert get(after_plan, "reconciler_last_run_success") == 1

    apply = cli("apply", str(m), *uri)
    assert apply.code == 0, apply.out + apply.err
    applied = parse(path.read_text())
    assert get(applied, "reconciler_changes", kind="VirtualMachine", action="create") == 2
    assert get(applied, "reconciler_failures", kind="VirtualMachine") == 0
    assert get(applied, "reconciler_last_run_success") == 1
    assert get(applied, "reconciler_last_run_timestamp_seconds") >= get(after_plan, "reconciler_last_run_timestamp_seconds")
    # Every kind and every kind x action is present, zeros included (alerts see the series).
    from reconciler.kinds.registry import NAMES
    from reconciler.model import VERBS
    assert sum(1 for (n, _) in applied if n == "reconciler_changes") == len(NAMES) * len(VERBS)

    again = cli("apply", str(m), *uri)
    assert again.code == 0 and "changed=0" in again.recap
    synced = parse(path.read_text())
    assert get(synced, "reconciler_drift", kind="VirtualMachine") == 0
    assert get(synced, "reconciler_changes", kind="VirtualMachine", action="create") == 0
    last_ok = get(synced, "reconciler_last_success_timestamp_seconds")

    # A run that cannot reach its target: success 0, the last success time is kept.
    down = cli("apply", str(m), "--libvirt-uri", f"qemu+unix:///system?socket={tmp_path}/none",
               "--metrics-file", str(path))
    assert down.code == 1
    failed = parse(path.read_text())
    assert get(failed, "reconciler_last_run_success") == 0
    assert get(failed, "reconciler_last_success_timestamp_seconds") == last_ok
    assert sorted(p.name for p in path.parent.iterdir()) == ["reconciler.prom"], "a temporary file was left"


def test_failed_and_refused_changes_are_counted():
    """The metrics renderer itself: refused actions count as failures of a plan, failed results of an apply."""
    from reconciler.model import Action, Plan, ResourceId, Result
    from reconciler.outcome import Outcome
    from reconciler.render.metrics import write_metrics
    import tempfile, os
    a = Action("update", ResourceId("Disk", "d"), "shrink", refused="shrinking is refused")
    b = Action("create", ResourceId("MqttRole", "r"), "new")
    plan = Plan((a, b))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.prom")
        write_metrics(p, [Outcome(False, plan, host='edge "1"')], by_host=True)
        m = parse(open(p).read())
        assert get(m, "reconciler_failures", kind="Disk", host='edge \\"1\\"') == 1
        assert get(m, "reconciler_last_run_success", host='edge \\"1\\"') == 0
        write_metrics(p, [Outcome(True, plan, (Result(a, "failed", "x"), Result(b, "applied")))])
        m = parse(open(p).read())
        assert get(m, "reconciler_failures", kind="Disk") == 1
        assert get(m, "reconciler_changes", kind="MqttRole", action="create") == 1
        assert get(m, "reconciler_drift", kind="MqttRole") == 1


def test_backup_age_per_vm_is_in_the_run_metrics():
    """plan/apply's metrics carry reconciler_backup_age_seconds{vm}: from what the plan read, and 0 for a
    VM whose backup this run made, so an alert on the age fires when scheduled backups stop."""
    import os
    import tempfile
    import time
    from reconciler.kinds.backup import Backup
    from reconciler.model import Action, Live, Plan, Resource, ResourceId, Result
    from reconciler.outcome import Outcome
    from reconciler.render.metrics import write_metrics
    t = time.time()
    pol, pol2 = ResourceId("BackupPolicy", "gw-nightly"), ResourceId("BackupPolicy", "db-nightly")
    backups = (Backup("gw", "gw-nightly", "b", "s1", t - 7200, True), Backup("gw", "gw-nightly", "b", "s2", t - 60, False))
    noop = Action("noop", pol, "fresh enough", live=Live(pol, {}, managed=True, facts={"backups": backups}))
    made = Action("create", pol2, "due", desired=Resource(pol2, {"vm": "db"}), live=Live(pol2, {}, managed=True))
    outcome = Outcome(True, Plan((noop, made)), (Result(noop, "ok"), Result(made, "applied")))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.prom")
        write_metrics(p, [outcome])
        m = parse(open(p).read())
    assert 7100 < get(m, "reconciler_backup_age_seconds", vm="gw") < 7400   # the failed newer one does not count
    assert get(m, "reconciler_backup_age_seconds", vm="db") == 0
