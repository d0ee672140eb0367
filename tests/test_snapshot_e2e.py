"""Snapshots and restores from them on real TCG VMs (qemu:///system): data written and read back with
qemu-io, a snapshot of a running VM (memory: false), a vanished snapshot reported, a VM with snapshots
not deleted. Every apply is followed by a second one that changes nothing."""
from __future__ import annotations

import json

from backup_fixtures import apply_twice, base_docs, has_pattern, site, write_pattern  # noqa: F401
from helpers import cli, doc, virsh, write


def _disk(base: str, prefix: str) -> str:
    return f"{base}-edge/{prefix}root"


def test_snapshot_overwrite_restore_brings_the_data_back(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, snap = f"{prefix}vm", f"{prefix}before"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base)
    apply_twice(write(m, *docs))
    disk = _disk(base, prefix)
    write_pattern(disk, 0xAB)

    docs.append(doc("Snapshot", snap, {"vm": vm, "description": "before the upgrade"}))
    first = apply_twice(write(m, *docs))
    assert f"[Snapshot/{snap}] create: took an internal snapshot of the shut-off VM" in first.out
    assert snap in virsh(qemu_uri, "snapshot-list", vm, "--name")

    # The description changes in place; the moment does not.
    taken = virsh(qemu_uri, "snapshot-info", vm, snap)
    docs[-1]["spec"]["description"] = "before the firmware upgrade"
    first = apply_twice(write(m, *docs))
    assert f"[Snapshot/{snap}] update: updated spec.description" in first.out
    assert "before the firmware upgrade" in virsh(qemu_uri, "snapshot-dumpxml", vm, snap)
    assert [l for l in virsh(qemu_uri, "snapshot-info", vm, snap).splitlines() if "Creation" in l] == \
        [l for l in taken.splitlines() if "Creation" in l]

    # memory cannot change: refused, nothing retaken.
    docs[-1]["spec"]["memory"] = True
    refused = cli("plan", str(write(m, *docs)))
    assert refused.code == 1 and "spec.memory cannot change" in refused.out
    docs[-1]["spec"].pop("memory")

    write_pattern(disk, 0xCD)
    assert not has_pattern(disk, 0xAB)
    docs.append(doc("Restore", f"{prefix}rollback-1", {"vm": vm, "snapshot": snap}))
    plan = cli("plan", str(write(m, *docs)), "-o", "json")
    assert plan.code == 2, plan.out + plan.err
    (change,) = plan.json["changes"]
    assert change["action"] == "restore" and change["fields"] == ["disks[vda]"]
    assert "changes to vda since" in change["reason"] and "are lost" in change["reason"]
    assert plan.json["summary"]["restore"] == 1
    first = apply_twice(m)
    assert f"[Restore/{prefix}rollback-1] restore: reverted to snapshot {snap}" in first.out
    assert has_pattern(disk, 0xAB)
    assert virsh(qemu_uri, "domstate", vm).strip() == "shut off"

    # Recorded on the VM: written over again, the disk stays as it is; the Restore never runs twice.
    write_pattern(disk, 0xEE)
    again = cli("apply", str(m))
    assert again.code == 0 and "changed=0" in again.recap, again.out
    assert has_pattern(disk, 0xEE)
    assert f'name="{prefix}rollback-1"' in virsh(qemu_uri, "metadata", vm, "https://reconciler.dev/xmlns/records/v1")


def test_running_vm_memory_false_restore_boots_from_the_disks(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, snap = f"{prefix}vm", f"{prefix}live"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base)
    apply_twice(write(m, *docs))
    disk = _disk(base, prefix)
    write_pattern(disk, 0xAB)
    docs[3]["spec"]["state"] = "running"
    docs.append(doc("Snapshot", snap, {"vm": vm, "memory": False}))
    first = apply_twice(write(m, *docs))
    assert "RAM included" in first.out   # libvirt 9.0: a running VM's internal snapshot holds its RAM
    assert virsh(qemu_uri, "domstate", vm).strip() == "running"

    # Shut it off, overwrite, and roll back while declared running: stopped, reverted, booted from the disks.
    docs[3]["spec"]["state"] = "shutoff"
    apply_twice(write(m, *docs))
    write_pattern(disk, 0xCD)
    docs[3]["spec"]["state"] = "running"
    docs.append(doc("Restore", f"{prefix}rollback-1", {"vm": vm, "snapshot": snap}))
    first = apply_twice(write(m, *docs))
    assert "now running" in first.out, first.out
    assert virsh(qemu_uri, "domstate", vm).strip() == "running"
    assert has_pattern(disk, 0xAB, running=True)
    # The definition stays as declared (the revert brought back the snapshot's; it was put back).
    export = cli("plan", str(m))
    assert export.code == 0, export.out

    # A second roll-back while it runs: stopped first (this guest has no OS to obey the ACPI
    # shutdown, so it is forced off after --shutdown-timeout, and the line says so), then booted again.
    docs.append(doc("Restore", f"{prefix}rollback-2", {"vm": vm, "snapshot": snap}))
    first = apply_twice(write(m, *docs))
    assert "stopped it (forced off: the guest did not shut down within 1s)" in first.out, first.out
    assert virsh(qemu_uri, "domstate", vm).strip() == "running"


def test_vanished_snapshot_is_reported_and_a_vm_with_snapshots_is_not_deleted(site, tmp_path, qemu_uri):
    prefix, base = site
    vm = f"{prefix}vm"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base) + [doc("Snapshot", f"{prefix}a", {"vm": vm}), doc("Snapshot", f"{prefix}b", {"vm": vm})]
    apply_twice(write(m, *docs))

    virsh(qemu_uri, "snapshot-delete", vm, f"{prefix}a")
    plan = cli("plan", str(m))
    assert plan.code == 1 and "has vanished" in plan.out and "not retaken silently" in plan.out, plan.out
    applied = cli("apply", str(m))
    assert applied.code == 1 and f"{prefix}a" not in virsh(qemu_uri, "snapshot-list", vm, "--name")
    docs[4]["spec"]["state"] = "absent"
    first = apply_twice(write(m, *docs))
    assert "forgot the record of the vanished snapshot" in first.out

    # The VM still has snapshot b: deleting it is refused, and nothing changes.
    docs[3]["spec"]["state"] = "absent"
    refused = cli("apply", str(write(m, *docs)))
    assert refused.code == 1 and f"still has snapshot(s) {prefix}b" in refused.out, refused.out
    assert virsh(qemu_uri, "domstate", vm).strip() == "shut off"
    docs[5]["spec"]["state"] = "absent"
    first = apply_twice(write(m, *docs))
    assert first.out.index(f"[Snapshot/{prefix}b] delete") < first.out.index(f"[VirtualMachine/{vm}] delete")
    assert vm not in virsh(qemu_uri, "list", "--all", "--name")


def test_plan_json_and_metrics_count_the_sixth_action(site, tmp_path):
    prefix, base = site
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base) + [doc("Snapshot", f"{prefix}s", {"vm": f"{prefix}vm"})]
    apply_twice(write(m, *docs))
    docs.append(doc("Restore", f"{prefix}r", {"vm": f"{prefix}vm", "snapshot": f"{prefix}s"}))
    metrics = tmp_path / "m.prom"
    first = cli("apply", str(write(m, *docs)), "-o", "json", "--metrics-file", str(metrics))
    assert first.code == 0, first.out + first.err
    out = json.loads(first.out)
    assert [c["action"] for c in out["changes"]] == ["restore"] and out["changes"][0]["status"] == "applied"
    series = [l for l in metrics.read_text().splitlines() if l.startswith('reconciler_changes{action="restore",kind="Restore"}')]
    assert len(series) == 1 and float(series[0].rsplit(" ", 1)[1]) == 1, metrics.read_text()
    second = cli("apply", str(m), "-o", "json")
    assert second.code == 0 and json.loads(second.out)["changes"] == []


def test_memory_true_restore_resumes_the_running_vm_from_its_ram(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, snap = f"{prefix}vm", f"{prefix}ram"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base)
    apply_twice(write(m, *docs))
    disk = _disk(base, prefix)
    write_pattern(disk, 0xAB)
    docs[3]["spec"]["state"] = "running"
    docs.append(doc("Snapshot", snap, {"vm": vm, "memory": True}))
    apply_twice(write(m, *docs))
    docs[3]["spec"]["state"] = "shutoff"
    apply_twice(write(m, *docs))
    write_pattern(disk, 0xCD)
    docs[3]["spec"]["state"] = "running"
    docs.append(doc("Restore", f"{prefix}rollback-1", {"vm": vm, "snapshot": snap}))
    first = apply_twice(write(m, *docs))
    assert "RAM included" in first.out and "now running" in first.out, first.out
    assert virsh(qemu_uri, "domstate", "--reason", vm).strip() == "running (from snapshot)"
    assert has_pattern(disk, 0xAB, running=True)


def test_prune_does_not_delete_a_vm_that_has_snapshots(site, tmp_path, qemu_uri):
    prefix, base = site
    vm = f"{prefix}vm"
    scope = prefix.rstrip("-")     # a scope of its own: this prune must never reach other tests' objects
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base) + [doc("Snapshot", f"{prefix}s", {"vm": vm})]
    apply_twice(write(m, *docs), "--scope", scope)
    # The VM and its Snapshot leave the manifests: --prune would delete the VM, but it has a snapshot.
    write(m, *docs[:3])
    pruned = cli("apply", str(m), "--prune", "--scope", scope)
    assert pruned.code == 1, pruned.out + pruned.err
    assert f"VM {vm} still has snapshot(s) {prefix}s" in pruned.out, pruned.out
    assert vm in virsh(qemu_uri, "list", "--all", "--name")
    assert f"{prefix}s" in virsh(qemu_uri, "snapshot-list", vm, "--name")
