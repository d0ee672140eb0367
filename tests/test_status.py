"""`reconciler status` against the real services: tiny running QEMU (TCG) VMs on qemu:///system, so
CPU, memory, disk and state figures are real, and a real Mosquitto 2 for the `$SYS` figures and the
declared Topics' retained messages. Drift goes through the same planner as `plan`, checked against
`plan -o json`. A VM whose QEMU is frozen while another client holds its job is shown stale and does
not fail the view (the exporters' bug this design avoids). The metrics file is parsed with the
Prometheus parser, and the shipped Grafana dashboard may only query series that file holds."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, cli, doc, virsh, write
from mqtt_fixtures import mq  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.libvirt]

DASHBOARD = ROOT / "contrib" / "grafana" / "reconciler.json"


def site(prefix: str, pool_dir: str, vms: tuple[str, ...] = ("vm",), topic: bool = False,
         network: str | None = None) -> list[dict]:
    """A pool, a 64 MiB qcow2 disk per VM and tiny running QEMU VMs (nothing bootable: SeaBIOS waits),
    on an isolated network when given (a host device with counters) else user-mode networking,
    optionally a role and a Topic with a retained message."""
    docs = [doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})]
    for v in vms:
        docs.append(doc("Disk", f"{prefix}{v}-root", {"pool": f"{prefix}pool", "capacity": "64MiB", "format": "qcow2"}))
        docs.append(doc("VirtualMachine", f"{prefix}{v}", {
            "hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "running", "graphics": "none",
            "description": "status test VM",
            "interfaces": [{"network": network, "model": "virtio"} if network else {"user": True}],
            "disks": [{"disk": f"{prefix}{v}-root", "target": "vda", "bus": "virtio"}]}))
    if topic:
        docs.append(doc("MqttRole", f"{prefix}sensors", {"description": "status test", "acls": []}))
        docs.append(doc("Topic", f"status/{prefix}gw/config", {
            "retained": {"payload": '{"interval": 30}', "qos": 1}, "publishers": [f"{prefix}sensors"]}))
    return docs


def apply_twice(path: Path, env: dict | None = None, *extra: str) -> None:
    first = cli("apply", str(path), *extra, env=env)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), *extra, env=env)
    assert second.code == 0 and "changed=0" in second.recap and "failed=0" in second.recap, second.out + second.err


def status(*args: str, env: dict | None = None):
    return cli("status", *args, env=env, timeout=180)


def vm_row(report: dict, name: str) -> dict:
    rows = [v for v in report["vms"] if v["name"] == name]
    assert len(rows) == 1, [v["name"] for v in report["vms"]]
    return rows[0]


def metric_samples(path: Path) -> dict:
    """{sample name: [(labels, value)]} through the Prometheus parser (fails on a malformed file);
    a family declared without samples is there with an empty list."""
    out: dict = {}
    for fam in text_string_to_metric_families(path.read_text()):
        out.setdefault(fam.name + ("_total" if fam.type == "counter" else ""), [])
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# Series the dashboard shows that this test's host cannot have: declared in the file (HELP/TYPE),
# their samples proven by the pure test below.
DECLARED_ONLY = {"reconciler_backup_age_seconds"}


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\b(reconciler_[a-z0-9_]+)\b", e)}


@pytest.fixture
def isolated_net(prefix, qemu_uri, tmp_path):
    """A libvirt network with no forward and no address: its bridge reaches nothing but its guests."""
    name = f"{prefix}net"
    xml = tmp_path / "net.xml"
    xml.write_text(f"<network><name>{name}</name><bridge name='vb{prefix[1:9]}'/></network>")
    virsh(qemu_uri, "net-define", str(xml))
    virsh(qemu_uri, "net-start", name)
    yield name
    virsh(qemu_uri, "net-destroy", name, check=False)
    virsh(qemu_uri, "net-undefine", name, check=False)


# --------------------------------------------------------------------------- the real view

def test_status_shows_vm_figures_broker_and_drift(qemu_uri, prefix, pool_dir, tmp_path, mq, isolated_net):  # noqa: F811
    m = write(tmp_path / "site" / "site.yaml", *site(prefix, pool_dir, topic=True, network=isolated_net))
    env = {**mq.env(), "RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": prefix.rstrip("-")}
    apply_twice(m, env)
    vm = f"{prefix}vm"
    topic = f"status/{prefix}gw/config"

    # In sync: every declared object, VM figures from a real guest, the broker's own figures.
    metrics = tmp_path / "status.prom"
    run = status(str(m), "-o", "json", "--metrics-file", str(metrics), env=env)
    assert run.code == 0, run.out + run.err
    rep = run.json
    assert rep["planned"] is True and sum(rep["drift"].values()) == 0
    row = vm_row(rep, vm)
    assert row["state"] == "running" and row["managed"] and row["declared"] and row["sync"] == "in sync"
    assert row["stale"] is None
    # QEMU's own threads count too, so a busy 1-vCPU guest may pass 100 %; never the host's CPUs.
    assert row["cpu_percent"] is not None and 0 <= row["cpu_percent"] <= 100 * rep["host"]["cpus"] + 5
    assert row["cpu_seconds"] > 0 and row["vcpus"] == 1
    assert row["memory_assigned_bytes"] == 64 * 1024 * 1024 and 0 < row["memory_bytes"] < 1024 ** 3
    [disk] = row["disks"]
    assert disk["name"] == "vda" and disk["capacity_bytes"] == 64 * 1024 * 1024 and disk["allocation_bytes"] is not None
    assert row["backup_age_seconds"] is None
    [nic] = row["interfaces"]                        # the tap device on the isolated bridge
    assert nic["name"].startswith("vnet") and nic["receive_bytes"] >= 0 and nic["transmit_bytes"] >= 0
    kinds = {(o["kind"], o["name"]): o for o in rep["objects"]}
    for rid in (("StoragePool", f"{prefix}pool"), ("Disk", f"{vm}-root"), ("VirtualMachine", vm),
                ("MqttRole", f"{prefix}sensors"), ("Topic", topic)):
        assert kinds[rid]["declared"] and kinds[rid]["sync"] == "in sync", kinds[rid]
    assert kinds[("VirtualMachine", vm)]["managed"] and kinds[("MqttRole", f"{prefix}sensors")]["managed"]
    b = rep["broker"]
    assert b["error"] is None and b["version"].startswith("2.") and b["uptime_seconds"] is not None
    assert b["topics"] == [{"name": topic, "retained_declared": True, "retained_present": True}]
    assert rep["host"]["nowait"] is True and rep["host"]["stats_call_seconds"] < 10

    # The metrics file: valid exposition, proper names, the figures above.
    s = metric_samples(metrics)
    assert ({"vm": vm}, 1.0) in s["reconciler_vm_up"] and ({"vm": vm}, 1.0) in s["reconciler_vm_running"]
    assert any(l == {"vm": vm} and v > 0 for l, v in s["reconciler_vm_cpu_seconds_total"])
    assert ({"vm": vm, "disk": "vda"}, float(64 * 1024 * 1024)) in s["reconciler_vm_disk_capacity_bytes"]
    assert any(l == {"vm": vm} and v > 0 for l, v in s["reconciler_vm_memory_bytes"])
    assert ({"kind": "VirtualMachine"}, 0.0) in s["reconciler_drift"]
    assert ({"topic": topic}, 1.0) in s["reconciler_topic_retained_present"]
    assert s["reconciler_broker_up"] == [({}, 1.0)]
    # Every query of the shipped dashboard names series this run wrote.
    names = dashboard_metric_names()
    missing = {n for n in names - DECLARED_ONLY if not s.get(n)} | {n for n in names & DECLARED_ONLY if n not in s}
    assert not missing, f"the dashboard queries series status never writes: {sorted(missing)}"

    # The broker publishes $SYS every 10 s (first values at start): within a few rounds the messages of
    # the applies above are counted.
    deadline = time.monotonic() + 60
    while True:
        b = status(str(m), "-o", "json", "--sample", "0", env=env).json["broker"]
        if b["clients_connected"] is not None and b["retained_messages"] is not None \
                and (b["messages_received_total"] or 0) > 0 and b["received_per_second"] is not None:
            break
        assert time.monotonic() < deadline, b
        time.sleep(3)
    assert b["retained_messages"] >= 1 and b["clients_connected"] >= 0 and b["received_per_second"] >= 0

    # Drift by hand: a description changed with virsh, the retained message cleared by a device.
    virsh(qemu_uri, "desc", vm, "--live", "--config", "changed by hand")
    mq.pub(topic, "", retain=True)
    run = status(str(m), "--metrics-file", str(metrics), env=env)
    assert run.code == 0, run.out + run.err          # drift is shown, not an error
    assert re.search(rf"^{re.escape(vm)}\s+running\s+yes\s+drifted\s", run.out, re.M), run.out
    assert "drifted: spec.description" in run.out
    assert f"topic {topic}: retained message MISSING" in run.out
    rep = status(str(m), "-o", "json", env=env).json
    assert vm_row(rep, vm)["sync"] == "drifted" and "spec.description" in vm_row(rep, vm)["drift"]
    assert rep["broker"]["topics"][0]["retained_present"] is False
    assert rep["drift"]["VirtualMachine"] == 1 and rep["drift"]["Topic"] == 1
    # The same planner as `plan`: the same objects are out of sync.
    plan = cli("plan", str(m), "-o", "json", env=env)
    assert plan.code == 2, plan.out + plan.err
    planned = {(c["kind"], c["name"]) for c in plan.json["changes"]}
    drifted = {(o["kind"], o["name"]) for o in rep["objects"] if o["sync"] not in (None, "in sync", "orphan")}
    assert planned == drifted == {("VirtualMachine", vm), ("Topic", topic)}
    s = metric_samples(metrics)
    assert ({"kind": "VirtualMachine"}, 1.0) in s["reconciler_drift"] and ({"topic": topic}, 0.0) in s["reconciler_topic_retained_present"]
    assert ({"vm": vm}, 0.0) in s["reconciler_vm_in_sync"]

    # Repaired by apply (twice, the second a no-op), status is in sync again.
    apply_twice(m, env)
    rep = status(str(m), "-o", "json", "--sample", "0", env=env).json
    assert vm_row(rep, vm)["sync"] == "in sync" and sum(rep["drift"].values()) == 0
    assert vm_row(rep, vm)["cpu_percent"] is None      # --sample 0: one sample, no CPU %

    # Without PATHs: no drift column, the VM still listed with its figures and ownership; no broker
    # without a login.
    bare = {k: v for k, v in env.items() if not k.startswith("RECONCILER_MQTT")}
    run = status("-o", "json", env={**bare, "RECONCILER_MQTT_USERNAME": ""})
    assert run.code == 0, run.err
    rep = run.json
    assert rep["planned"] is False and rep["broker"] is None and rep["drift"] == {}
    row = vm_row(rep, vm)
    assert row["managed"] and row["sync"] is None and row["state"] == "running" and row["cpu_percent"] is not None
    mq.outputs.append(run.out)


def test_a_frozen_vm_is_stale_and_never_fails_the_view(qemu_uri, prefix, pool_dir, tmp_path):
    """QEMU of one VM is stopped (SIGSTOP) and `virsh domstats` then waits on its monitor forever,
    holding the domain's job. Plain getAllDomainStats would wait behind it; with NOWAIT the stuck VM's
    monitor figures are skipped: it is shown stale, the other VM has all its figures, exit 0."""
    m = write(tmp_path / "site.yaml", *site(prefix, pool_dir, vms=("a", "b")))
    env = {"RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": prefix.rstrip("-")}
    apply_twice(m, env)
    frozen, healthy = f"{prefix}a", f"{prefix}b"
    pid = int(Path(f"/run/libvirt/qemu/{frozen}.pid").read_text().strip())
    holder = None
    os.kill(pid, signal.SIGSTOP)
    try:
        holder = subprocess.Popen(["virsh", "-c", qemu_uri, "domstats", frozen], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(3)            # the holder is now inside its job, waiting on the stopped monitor
        assert holder.poll() is None, "virsh domstats should be stuck on the stopped QEMU"
        started = time.monotonic()
        run = status(str(m), "-o", "json", "--stats-timeout", "20s", env=env)
        took = time.monotonic() - started
        assert run.code == 0, run.out + run.err
        rep = run.json
        stuck, ok = vm_row(rep, frozen), vm_row(rep, healthy)
        assert stuck["stale"] and "busy" in stuck["stale"], stuck
        assert ok["stale"] is None and ok["cpu_percent"] is not None and ok["memory_bytes"] is not None
        assert ok["sync"] == "in sync" and stuck["sync"] == "in sync"   # the plan still reads the stuck VM
        assert rep["host"]["fallback"] is None           # NOWAIT answered; no per-VM fallback needed
        assert took < 20, f"status waited on the stuck VM ({took:.1f}s)"
        text = status(str(m), env=env)
        assert text.code == 0 and re.search(rf"^{re.escape(frozen)}\s+running\s+yes\s+stale\s", text.out, re.M), text.out
        assert "stale: busy: libvirt skipped" in text.out
        metrics = tmp_path / "m.prom"
        assert status(str(m), "--metrics-file", str(metrics), "-o", "json", env=env).code == 0
        s = metric_samples(metrics)
        assert ({"vm": frozen}, 0.0) in s["reconciler_vm_up"] and ({"vm": healthy}, 1.0) in s["reconciler_vm_up"]
    finally:
        os.kill(pid, signal.SIGCONT)
        if holder is not None:
            try:
                holder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                holder.kill()
    # Unfrozen, the VM answers again.
    rep = status(str(m), "-o", "json", env=env).json
    assert vm_row(rep, frozen)["stale"] is None


# --------------------------------------------------------------------------- smaller pieces

def test_status_on_the_test_driver_and_bad_input(test_unix_uri, tmp_path):
    run = status("--libvirt-uri", test_unix_uri, "-o", "json", "--sample", "0")
    assert run.code == 0, run.err
    rep = run.json
    assert rep["host"]["driver"] == "TEST" and rep["vms"], rep
    # The test driver reports no figures: not stale, just none.
    assert all(v["stale"] is None for v in rep["vms"])
    bad = write(tmp_path / "bad.yaml", doc("VirtualMachine", "x", {"memory": "lots"}))
    run = status(str(bad), "--libvirt-uri", test_unix_uri)
    assert run.code == 1 and "Traceback" not in run.err and "bad.yaml" in run.err
    run = status("--libvirt-uri", "test+unix:///nonexistent-driver-xyz")
    assert run.code == 1 and "Traceback" not in run.err and run.err.startswith("error:")
    run = status("--sample", "fast", "--libvirt-uri", test_unix_uri)
    assert run.code == 1 and "not a duration" in run.err


def test_cpu_percent_and_stale_rules_are_computed_from_the_samples():
    """The pure parts: parse() flags a running QEMU domain without its monitor figures as stale, and
    build() turns two samples' CPU time into % of the VM's own vCPUs."""
    from reconciler.model import Snapshot
    from reconciler.providers.libvirt.stats import HostStats, parse
    from reconciler.status import build
    ok = {"state.state": 1, "cpu.time": 2_000_000_000, "balloon.current": 65536, "balloon.rss": 40000,
          "vcpu.current": 2, "block.count": 1, "block.0.name": "vda", "block.0.allocation": 10,
          "block.0.capacity": 100, "net.count": 2, "net.0.name": "vnet0", "net.0.rx.bytes": 5, "net.0.tx.bytes": 7}
    busy = {"state.state": 1, "cpu.time": 1, "balloon.current": 65536}
    assert parse("a", ok, "QEMU").stale is None
    assert "balloon.rss" in parse("b", busy, "QEMU").stale
    assert parse("b", busy, "TEST").stale is None
    assert parse("c", {"state.state": 5}, "QEMU").stale is None          # shut off: nothing to expect
    a1 = parse("a", ok, "QEMU")
    a2 = parse("a", {**ok, "cpu.time": 3_000_000_000}, "QEMU")           # 1 s of CPU in 2 s on 2 vCPUs: 25 %
    h1 = HostStats("u", "h", "QEMU", "9.0.0", 2, 1 << 30, (a1,), 0.01, 100.0, True)
    h2 = HostStats("u", "h", "QEMU", "9.0.0", 2, 1 << 30, (a2,), 0.01, 102.0, True)
    rep = build(h1, h2, [], Snapshot(), None, None, "mqtt://x")
    [vm] = rep.vms
    assert vm.cpu_percent == pytest.approx(25.0) and vm.memory_bytes == 40000 * 1024 and vm.memory_source == "host"
    assert [(i.name, i.receive_bytes, i.transmit_bytes) for i in vm.interfaces] == [("vnet0", 5, 7)]
    assert vm.disks[0].allocation_bytes == 10 and vm.disks[0].capacity_bytes == 100
    # The newest good backup's age, from the BackupPolicy objects the libvirt read gives.
    from reconciler.kinds.backup import Backup
    from reconciler.model import Live, ResourceId
    t = time.time()
    backups = (Backup("a", "p", "pool", "s1", t - 7200, True), Backup("a", "p", "pool", "s2", t - 3600, True),
               Backup("a", "p", "pool", "s3", t - 60, False, problem="unfinished: no manifest"))
    pol = ResourceId("BackupPolicy", "p")
    rep = build(h1, h2, [], Snapshot({pol: Live(pol, {}, managed=True, facts={"backups": backups})}), None, None,
                "mqtt://x")
    assert 3590 < rep.vms[0].backup_age_seconds < 3700      # the unfinished newer one does not count
    from reconciler.render.status_metrics import text
    assert re.search(r'^reconciler_backup_age_seconds\{vm="a"\} 3\d{3}', text(rep), re.M)
    assert build(h1, h2, [], Snapshot(), None, None, "mqtt://x").vms[0].backup_age_seconds is None


def test_grafana_dashboard_is_valid_and_queries_only_written_series():
    from reconciler.render.status_metrics import SERIES
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = dashboard_metric_names()
    assert {"reconciler_vm_cpu_seconds_total", "reconciler_vm_memory_bytes", "reconciler_vm_disk_allocation_bytes",
            "reconciler_broker_clients_connected", "reconciler_drift"} <= names
    assert names <= set(SERIES), sorted(names - set(SERIES))


@pytest.mark.mqtt
def test_a_broker_that_cannot_be_read_is_an_error_beside_the_host(test_unix_uri, mq):  # noqa: F811
    """A dynamic-security login without `subscribe #` (the objects' retained sweep) or refused
    `subscribe $SYS/#` (the figures): the host's VMs are still shown, the broker's part says why,
    and status exits 1."""
    pw = mq.secret("limited-pass-1")
    mq.ctrl("createRole", "limited")
    for acl in ("publishClientSend", "publishClientReceive", "subscribePattern"):
        mq.ctrl("addRoleACL", "limited", acl, "$CONTROL/dynamic-security/#", "allow")
    mq.ctrl("createClient", "limited", "-p", pw)
    mq.ctrl("addClientRole", "limited", "limited")
    env = {"RECONCILER_LIBVIRT_URI": test_unix_uri, "RECONCILER_MQTT_USERNAME": "limited",
           "RECONCILER_MQTT_PASSWORD": pw}
    run = mq.run("status", "-o", "json", "--sample", "0", env=env)
    assert run.code == 1, run.out + run.err
    rep = run.json
    assert rep["vms"] and rep["broker"]["error"] and "may not subscribe to '#'" in rep["broker"]["error"]
    assert "error:" in run.err and "Traceback" not in run.err
    # With `subscribe #` the objects are read; a higher-priority deny on $SYS/# refuses the figures.
    mq.ctrl("addRoleACL", "limited", "subscribePattern", "#", "allow")
    mq.ctrl("addRoleACL", "limited", "subscribePattern", "$SYS/#", "deny", "10")
    run = mq.run("status", "--sample", "0", env=env)
    assert run.code == 1, run.out + run.err
    assert "may not subscribe to $SYS/#" in run.out and "may not subscribe to $SYS/#" in run.err
    assert re.search(r"^MqttClient\s+limited\s+no\s+no\s+-\s+present", run.out, re.M), run.out
    assert run.out.startswith("host ") and "test+unix:///default (TEST" in run.out
    # With the figures allowed too, the view is whole and exits 0.
    mq.ctrl("removeRoleACL", "limited", "subscribePattern", "$SYS/#")
    run = mq.run("status", "-o", "json", "--sample", "0", env=env)
    assert run.code == 0, run.out + run.err
    assert run.json["broker"]["error"] is None and run.json["broker"]["version"]


def test_a_stuck_bulk_call_falls_back_to_each_vm_with_a_deadline(qemu_uri, prefix, pool_dir, tmp_path):
    """QEMU of one VM is stopped and nobody holds its job: the bulk call itself takes the job and waits
    on the stopped monitor (NOWAIT cannot help the first caller). Past --stats-timeout each VM is
    asked on its own with the same deadline: the healthy VM answers, the stuck one is stale."""
    m = write(tmp_path / "site.yaml", *site(prefix, pool_dir, vms=("a", "b")))
    env = {"RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": prefix.rstrip("-")}
    apply_twice(m, env)
    frozen, healthy = f"{prefix}a", f"{prefix}b"
    pid = int(Path(f"/run/libvirt/qemu/{frozen}.pid").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        run = status(str(m), "-o", "json", "--stats-timeout", "3s", env=env)
        took = time.monotonic() - started
        assert run.code == 0, run.out + run.err
        rep = run.json
        assert rep["host"]["fallback"] and "did not answer within 3s" in rep["host"]["fallback"]
        assert vm_row(rep, frozen)["stale"], vm_row(rep, frozen)
        ok = vm_row(rep, healthy)
        assert ok["stale"] is None and ok["memory_bytes"] is not None and ok["state"] == "running"
        print(f"status with a stuck VM took {took:.1f}s; stuck VM: {vm_row(rep, frozen)['stale']}")
        assert took < 60, took
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while vm_row(status(str(m), "-o", "json", "--sample", "0", env=env).json, frozen)["stale"]:
        assert time.monotonic() < deadline, "the VM stays stale after SIGCONT"
        time.sleep(2)
