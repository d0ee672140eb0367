"""End to end on qemu:///system with real TCG VMs that boot nothing: the CLI is run as a user runs
it, and libvirt is inspected from outside with virsh. Every apply is repeated and must change nothing."""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers import cli, doc, virsh, write

pytestmark = pytest.mark.libvirt


def node(prefix: str, pool_dir: str, *, memory="128MiB", max_memory="256MiB", vcpus=1, max_vcpus=2,
         data_capacity="64MiB", state="running", disks=("root", "data"), extra_vm: dict | None = None,
         labels=None):
    pool = doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})
    root = doc("Disk", f"{prefix}root", {"pool": f"{prefix}pool", "capacity": "128MiB", "format": "qcow2"})
    data = doc("Disk", f"{prefix}data", {"pool": f"{prefix}pool", "capacity": data_capacity, "format": "raw"})
    targets = {"root": "vda", "data": "vdb"}
    vm_spec = {"hypervisor": "qemu", "memory": memory, "maxMemory": max_memory, "vcpus": vcpus,
               "maxVcpus": max_vcpus, "state": state, "graphics": "none",
               "disks": [{"disk": f"{prefix}{d}", "target": targets[d], "bus": "virtio"} for d in disks]}
    vm_spec.update(extra_vm or {})
    vm = doc("VirtualMachine", f"{prefix}vm", vm_spec, labels or {"site": "plant-3"})
    return [pool, root, data, vm]


def apply_twice(path, uri, *extra) -> None:
    first = cli("apply", str(path), "--libvirt-uri", uri, *extra)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), "--libvirt-uri", uri, *extra)
    assert second.code == 0, second.out + second.err
    assert "changed=0" in second.recap and "failed=0" in second.recap, second.out
    scope = list(extra[extra.index("--scope"):extra.index("--scope") + 2]) if "--scope" in extra else []
    plan = cli("plan", str(path), "--libvirt-uri", uri, *scope)
    assert plan.code == 0, plan.out
    return first


def dominfo(uri: str, name: str) -> dict:
    out = virsh(uri, "dominfo", name)
    return {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l)}


def test_create_is_idempotent_and_leaves_no_false_drift(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    first = apply_twice(m, qemu_uri)
    assert "changed=4" in first.recap
    info = dominfo(qemu_uri, f"{prefix}vm")
    assert info["State"] == "running"
    assert info["Max memory"] == "262144 KiB"
    assert virsh(qemu_uri, "vol-info", "--pool", f"{prefix}pool", f"{prefix}data").count("64.00 MiB") == 1
    # libvirt added PCI addresses, controllers, a versioned machine type: none of it is drift.
    xml = virsh(qemu_uri, "dumpxml", f"{prefix}vm")
    assert "<address type='pci'" in xml and "pc-i440fx" in xml
    assert "reconciler:owner managed=\"true\"" in xml or "reconciler:owner managed='true'" in xml
    js = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json").json
    assert js["changes"] == [] and js["summary"]["unchanged"] == 4


def test_live_changes_keep_uuid_and_do_not_restart(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    write(m, *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    uuid = virsh(qemu_uri, "domuuid", f"{prefix}vm").strip()
    dom_id = dominfo(qemu_uri, f"{prefix}vm")["Id"]
    write(m, *node(prefix, pool_dir, memory="192MiB", vcpus=2, extra_vm={"description": "now live"},
                   labels={"site": "plant-4"}))
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2
    (change,) = plan.json["changes"]
    assert change["action"] == "update"
    assert set(change["fields"]) == {"spec.memory", "spec.vcpus", "spec.description", "metadata.labels"}
    apply_twice(m, qemu_uri)
    info = dominfo(qemu_uri, f"{prefix}vm")
    assert virsh(qemu_uri, "domuuid", f"{prefix}vm").strip() == uuid
    assert info["Id"] == dom_id, "the VM was restarted"
    assert virsh(qemu_uri, "vcpucount", f"{prefix}vm", "--live", "--active").strip() == "2"
    assert "192" in virsh(qemu_uri, "dumpxml", "--inactive", f"{prefix}vm").split("currentMemory")[1][:40] \
        or "196608" in virsh(qemu_uri, "dumpxml", "--inactive", f"{prefix}vm")
    assert virsh(qemu_uri, "desc", f"{prefix}vm").strip() == "now live"


def test_restart_class_change_waits_for_allow_restart(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    write(m, *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    dom_id = dominfo(qemu_uri, f"{prefix}vm")["Id"]
    write(m, *node(prefix, pool_dir, max_memory="384MiB"))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert run.code == 0, run.err
    statuses = {(c["action"], c["status"]) for c in run.json["changes"]}
    assert statuses == {("update", "applied"), ("restart", "skipped")}
    assert dominfo(qemu_uri, f"{prefix}vm")["Id"] == dom_id
    assert "393216" in virsh(qemu_uri, "dumpxml", "--inactive", f"{prefix}vm")
    # Still pending: the running VM differs until it restarts.
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2 and [c["action"] for c in plan.json["changes"]] == ["restart"]
    again = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert "changed=0" in again.recap and "skipped=1" in again.recap
    apply_twice(m, qemu_uri, "--allow-restart")
    info = dominfo(qemu_uri, f"{prefix}vm")
    assert info["Id"] != dom_id and info["State"] == "running"
    assert info["Max memory"] == "393216 KiB"


def test_replace_is_refused_without_flag(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    write(m, *node(prefix, pool_dir, extra_vm={"machine": "pc"}))
    apply_twice(m, qemu_uri)
    uuid = virsh(qemu_uri, "domuuid", f"{prefix}vm").strip()
    write(m, *node(prefix, pool_dir, extra_vm={"machine": "q35"}))
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2 and plan.json["changes"][0]["action"] == "replace"
    refused = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert refused.code == 1 and "--allow-replace" in refused.out
    assert "pc-i440fx" in virsh(qemu_uri, "dumpxml", "--inactive", f"{prefix}vm")
    apply_twice(m, qemu_uri, "--allow-replace")
    assert "q35" in virsh(qemu_uri, "dumpxml", "--inactive", f"{prefix}vm")
    assert virsh(qemu_uri, "domuuid", f"{prefix}vm").strip() == uuid


def test_drift_made_by_hand_is_seen_and_repaired(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    name = f"{prefix}vm"
    # Stopped by hand.
    virsh(qemu_uri, "destroy", name)
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2 and plan.json["changes"][0]["fields"] == ["spec.state"]
    apply_twice(m, qemu_uri)
    assert dominfo(qemu_uri, name)["State"] == "running"
    # Memory changed in the persistent definition by hand.
    virsh(qemu_uri, "setmem", name, "160M", "--config")
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2 and "spec.memory" in plan.json["changes"][0]["fields"]
    apply_twice(m, qemu_uri)
    assert "131072" in virsh(qemu_uri, "dumpxml", "--inactive", name).split("<currentMemory")[1][:40]
    # Undefined by hand.
    virsh(qemu_uri, "destroy", name)
    virsh(qemu_uri, "undefine", name)
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2 and plan.json["changes"][0]["action"] == "create"
    apply_twice(m, qemu_uri)
    assert dominfo(qemu_uri, name)["State"] == "running"


def test_disk_grows_in_place_with_data_kept_and_never_shrinks(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    write(m, *node(prefix, pool_dir, state="shutoff"))
    apply_twice(m, qemu_uri)
    data = os.path.join(pool_dir, f"{prefix}data")
    with open(data, "r+b") as f:
        f.seek(1024 * 1024)
        f.write(b"precious bytes")
    write(m, *node(prefix, pool_dir, state="shutoff", data_capacity="96MiB"))
    apply_twice(m, qemu_uri)
    assert os.path.getsize(data) == 96 * 1024 * 1024
    with open(data, "rb") as f:
        f.seek(1024 * 1024)
        assert f.read(14) == b"precious bytes"
    # Grown while a running VM holds it: through QEMU (blockResize), not qemu-img.
    write(m, *node(prefix, pool_dir, state="running", data_capacity="96MiB"))
    apply_twice(m, qemu_uri)
    write(m, *node(prefix, pool_dir, state="running", data_capacity="128MiB"))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 0 and "running VM" in run.out, run.out
    apply_twice(m, qemu_uri)
    assert "134217728" in virsh(qemu_uri, "domblkinfo", f"{prefix}vm", "vdb")
    # Shrinking is refused before anything is touched.
    write(m, *node(prefix, pool_dir, state="running", data_capacity="32MiB"))
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri)
    assert plan.code == 1 and "shrinking" in plan.out
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri, "--force", "--prune", "--scope", prefix.rstrip("-"))
    assert run.code == 1 and "refused" in run.out
    assert os.path.getsize(data) == 128 * 1024 * 1024


def test_format_change_refused(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    docs = node(prefix, pool_dir, state="shutoff")
    write(m, *docs)
    apply_twice(m, qemu_uri)
    docs[2]["spec"]["format"] = "qcow2"
    write(m, *docs)
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 1 and "format" in run.out
    assert "raw" in virsh(qemu_uri, "vol-dumpxml", "--pool", f"{prefix}pool", f"{prefix}data")


def test_disk_attach_and_detach_on_a_running_vm(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    write(m, *node(prefix, pool_dir, disks=("root",)))
    apply_twice(m, qemu_uri)
    dom_id = dominfo(qemu_uri, f"{prefix}vm")["Id"]
    write(m, *node(prefix, pool_dir, disks=("root", "data")))
    apply_twice(m, qemu_uri)
    assert "vdb" in virsh(qemu_uri, "domblklist", f"{prefix}vm")
    assert dominfo(qemu_uri, f"{prefix}vm")["Id"] == dom_id
    # A guest that boots nothing never releases the disk: the detach is written to the
    # definition and reported as a pending restart, not as a failure.
    write(m, *node(prefix, pool_dir, disks=("root",)))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 0, run.out + run.err
    assert "vdb" not in virsh(qemu_uri, "domblklist", "--inactive", f"{prefix}vm")
    apply_twice(m, qemu_uri, "--allow-restart")
    assert "vdb" not in virsh(qemu_uri, "domblklist", f"{prefix}vm")


def test_disk_absent_refused_while_used_then_deleted(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    docs = node(prefix, pool_dir, state="shutoff")
    write(m, *docs)
    apply_twice(m, qemu_uri)
    docs[2]["spec"]["state"] = "absent"
    write(m, *docs)
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 1 and "still used by VirtualMachine" in run.out
    assert os.path.exists(os.path.join(pool_dir, f"{prefix}data"))
    docs[3]["spec"]["disks"] = docs[3]["spec"]["disks"][:1]
    write(m, *docs)
    apply_twice(m, qemu_uri)
    assert not os.path.exists(os.path.join(pool_dir, f"{prefix}data"))


def test_disk_removed_from_manifests_is_orphaned_and_kept(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    docs = node(prefix, pool_dir, state="shutoff", disks=("root",))
    write(m, *docs)
    apply_twice(m, qemu_uri)
    write(m, docs[0], docs[1], docs[3])
    for flags in ((), ("--prune", "--scope", "tests"), ("--prune", "--force", "--scope", "tests")):
        run = cli("apply", str(m), "--libvirt-uri", qemu_uri, *flags)
        assert run.code == 0 and f"orphan: [Disk/{prefix}data]" in run.out
    assert os.path.exists(os.path.join(pool_dir, f"{prefix}data"))


def test_prune_deletes_only_marked_vms_and_adoption_marks(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    docs = node(prefix, pool_dir, state="shutoff", disks=())
    extra = doc("VirtualMachine", f"{prefix}extra", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1,
                                                    "state": "shutoff"})
    write(m, *docs, extra)
    scope = ("--scope", prefix.rstrip("-"))
    apply_twice(m, qemu_uri, *scope)
    # A VM made by hand, without the marker.
    hand = f"{prefix}hand"
    xml = tmp_path / "hand.xml"
    xml.write_text(f"<domain type='qemu'><name>{hand}</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    virsh(qemu_uri, "define", str(xml))
    write(m, *docs)
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "--prune", *scope, "-o", "json")
    deletes = [c["name"] for c in plan.json["changes"] if c["action"] == "delete"]
    assert deletes == [f"{prefix}extra"]
    apply_twice(m, qemu_uri, "--prune", *scope)
    names = virsh(qemu_uri, "list", "--all", "--name")
    assert f"{prefix}extra" not in names and hand in names
    # Naming the hand-made VM adopts it: it gets the marker and is managed from now on.
    adopt = doc("VirtualMachine", hand, {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff"})
    write(m, *docs, adopt)
    run = apply_twice(m, qemu_uri, "--prune", *scope)
    assert "metadata.managed" in run.out or "adopt" in run.out or "changed=1" in run.recap
    assert "reconciler:owner" in virsh(qemu_uri, "dumpxml", hand)


def test_prune_refuses_when_manifests_declare_nothing(qemu_uri, prefix, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = cli("apply", str(empty), "--libvirt-uri", qemu_uri, "--prune")
    assert run.code == 1 and "declare nothing" in run.err


def test_state_transitions_paused_shutoff_absent(qemu_uri, prefix, pool_dir, tmp_path):
    m = tmp_path / "m" / "node.yaml"
    for state, shown in (("paused", "paused"), ("running", "running"), ("shutoff", "shut off")):
        write(m, *node(prefix, pool_dir, state=state, disks=("root",)))
        apply_twice(m, qemu_uri)
        assert dominfo(qemu_uri, f"{prefix}vm")["State"] == shown
    write(m, *node(prefix, pool_dir, state="absent", disks=("root",)))
    apply_twice(m, qemu_uri)
    assert f"{prefix}vm" not in virsh(qemu_uri, "list", "--all", "--name")
    assert os.path.exists(os.path.join(pool_dir, f"{prefix}root")), "deleting a VM keeps its disks"
