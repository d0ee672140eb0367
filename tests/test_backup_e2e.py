"""BackupPolicy and restores from backups on real TCG VMs (qemu:///system): a live backup of a running
VM (it keeps running), overwritten and restored from the latest backup; retention over a sequence of
runs with a short `every`; `reconciler backups`; kill -9 in the middle of a backup leaves nothing that
counts as good, and the next run clears it. Every apply is followed by one that changes nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from backup_fixtures import apply_twice, base_docs, has_pattern, qemu_io, site, write_pattern  # noqa: F401
from helpers import ROOT, cli, doc, virsh, write


def _backups(prefix: str, policy: str) -> list[dict]:
    r = cli("backups", "--policy", policy, "-o", "json")
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)["backups"]


def _seize_backup_job(uri: str, vm: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait (in-process, every 10 ms) for the VM's backup job to start, then slow it to 1 MiB/s through
    the QEMU monitor, so that it is still running whatever the machine's speed. False if the apply
    ended before a backup job was seen."""
    import libvirt
    import libvirt_qemu
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(vm)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                jobs = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-block-jobs"}', 0))["return"]
                for job in jobs:
                    if job.get("type") == "backup":
                        cmd = {"execute": "block-job-set-speed", "arguments": {"device": job["device"], "speed": 1 << 20}}
                        libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0)
                        return True
            time.sleep(0.01)
        return False
    finally:
        conn.close()


def test_live_backup_then_restore_from_latest(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, policy = f"{prefix}vm", f"{prefix}nightly"
    disk = f"{base}-edge/{prefix}root"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base)
    apply_twice(write(m, *docs))
    write_pattern(disk, 0xAB)
    docs[3]["spec"]["state"] = "running"
    apply_twice(write(m, *docs))
    domid = virsh(qemu_uri, "domid", vm).strip()

    docs.append(doc("BackupPolicy", policy, {"vm": vm, "pool": f"{prefix}backups", "every": "1h",
                                             "keep": {"daily": 7, "weekly": 4}}))
    plan = cli("plan", str(write(m, *docs)))
    assert plan.code == 2 and "live, the VM keeps running" in plan.out, plan.out
    first = apply_twice(m)
    assert "live, the VM kept running, crash-consistent" in first.out, first.out
    assert virsh(qemu_uri, "domid", vm).strip() == domid   # the same QEMU process: never stopped
    (b,) = _backups(prefix, policy)
    assert b["good"] and b["vm"] == vm and b["disks"] == ["vda"] and b["consistency"] == "crash-consistent"
    assert b["size"] > 1 << 20
    text = cli("backups", "--policy", policy)
    assert b["time"] in text.out and "vda" in text.out and vm in text.out
    # Backup volumes are the policy's, never reported as orphaned disks of the declared pool.
    assert f"orphan: [Disk/{vm}@" not in cli("plan", str(m)).out

    # Stop, overwrite, and roll back from the latest backup while declared running.
    docs[3]["spec"]["state"] = "shutoff"
    apply_twice(write(m, *docs))
    write_pattern(disk, 0xCD)
    docs[3]["spec"]["state"] = "running"
    docs.append(doc("Restore", f"{prefix}rollback-1", {"vm": vm, "backup": {"policy": policy, "at": "latest"}}))
    plan = cli("plan", str(write(m, *docs)), "-o", "json")
    restore = [c for c in plan.json["changes"] if c["action"] == "restore"]
    assert restore and f"backup {b['time']} of policy {policy}" in restore[0]["reason"], plan.out
    first = apply_twice(m)
    assert f"copied back vda from the backup of {b['time']}" in first.out and "now running" in first.out, first.out
    assert virsh(qemu_uri, "domstate", vm).strip() == "running"
    assert has_pattern(disk, 0xAB, running=True)


def test_retention_over_runs_and_restore_at_a_listed_time(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, policy = f"{prefix}vm", f"{prefix}often"
    disk = f"{base}-edge/{prefix}root"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base) + [doc("BackupPolicy", policy, {"vm": vm, "pool": f"{prefix}backups",
                                                                  "every": "1s", "keep": {"last": 2}})]
    made = []
    for byte in (0x11, 0x22, 0x33, 0x44):
        write(m, *docs)
        if os.path.exists(disk):
            write_pattern(disk, byte)
        time.sleep(1.1)
        r = cli("apply", str(m))
        assert r.code == 0, r.out + r.err
        made.append(_backups(prefix, policy)[-1]["time"])
        listed = _backups(prefix, policy)
        # Exactly what keep says after every run: the newest two (fewer before there are two), all good.
        assert [x["time"] for x in listed] == made[-2:] and all(x["good"] for x in listed), listed
    # The pool holds nothing else of the policy: pruned backups left no volume behind.
    left = sorted(f for f in os.listdir(f"{base}-backups") if f.startswith(f"{vm}@{policy}@"))
    assert len(left) == 4 and all(any(t.replace("-", "").replace(":", "") in f for t in made[-2:]) for f in left), left

    # A longer `every` is then satisfied: two runs, both without change.
    docs[4]["spec"]["every"] = "1h"
    apply_twice(write(m, *docs))

    # Restore the older kept backup by the time `reconciler backups` lists (its data: 0x33).
    docs.append(doc("Restore", f"{prefix}back-to-3", {"vm": vm, "backup": {"policy": policy, "at": made[-2]}}))
    first = apply_twice(write(m, *docs))
    assert f"from the backup of {made[-2]}" in first.out, first.out
    assert has_pattern(disk, 0x33)


def test_kill_during_a_backup_leaves_nothing_counted_as_good(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, policy = f"{prefix}vm", f"{prefix}nightly"
    disk = f"{base}-edge/{prefix}root"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base, capacity="512MiB")
    apply_twice(write(m, *docs))
    # Real data, so that the copy takes long enough for the kill to land in it.
    r = qemu_io(disk, "write -P 0x5a 0 512M")
    assert r.returncode == 0, r.stderr
    docs[3]["spec"]["state"] = "running"
    apply_twice(write(m, *docs))
    docs.append(doc("BackupPolicy", policy, {"vm": vm, "pool": f"{prefix}backups", "every": "1h", "keep": {"last": 3}}))
    write(m, *docs)

    env = dict(os.environ, RECONCILER_SCOPE="tests", RECONCILER_SHUTDOWN_TIMEOUT="1s")
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "apply", str(m)], cwd=str(ROOT), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # QEMU goes on copying for the killed run, and the next run must abort that job before its own. So
    # that this is tested whatever the machine's speed, the job is slowed to 1 MiB/s before the kill.
    assert _seize_backup_job(qemu_uri, vm, proc), "the apply ended before its backup job was seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert "Unbounded" in virsh(qemu_uri, "domjobinfo", vm)
    listed = _backups(prefix, policy)
    assert listed and not any(b["good"] for b in listed), listed
    plan = cli("plan", str(m))
    assert plan.code == 2 and "no good backup yet; first removing 1 unfinished backup(s)" in plan.out, plan.out

    first = apply_twice(m)
    assert "live, the VM kept running" in first.out and "removed an interrupted backup" in first.out, first.out
    assert "and aborted its job" in first.out, first.out
    (b,) = _backups(prefix, policy)
    assert b["good"] and b["time"] != listed[0]["time"]
    assert virsh(qemu_uri, "domstate", vm).strip() == "running"
    assert "None" in virsh(qemu_uri, "domjobinfo", vm)


def test_kill_during_a_shut_off_copy_leaves_nothing_counted_as_good(site, tmp_path, qemu_uri):
    prefix, base = site
    vm, policy = f"{prefix}vm", f"{prefix}nightly"
    disk = f"{base}-edge/{prefix}root"
    m = tmp_path / "site.yaml"
    docs = base_docs(prefix, base, capacity="512MiB")
    apply_twice(write(m, *docs))
    r = qemu_io(disk, "write -P 0x5a 0 512M")
    assert r.returncode == 0, r.stderr
    docs.append(doc("BackupPolicy", policy, {"vm": vm, "pool": f"{prefix}backups", "every": "1h"}))
    write(m, *docs)

    env = dict(os.environ, RECONCILER_SCOPE="tests")
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "apply", str(m)], cwd=str(ROOT), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = f"{base}-backups"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(f.startswith(f"{vm}@") for f in os.listdir(folder)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the apply finished before the copy began; nothing was interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    # Whatever libvirtd goes on copying for the killed run never counts; the next run waits for the
    # copy to end if it must, removes it, and makes a good backup.
    listed = _backups(prefix, policy)
    assert listed and not any(b["good"] for b in listed) and "no manifest" in listed[0]["problem"], listed
    first = apply_twice(m)
    assert "copied from the shut-off VM" in first.out and "removed an interrupted backup" in first.out, first.out
    (b,) = _backups(prefix, policy)
    assert b["good"] and b["consistency"] == "shut-off"
    assert sorted(os.listdir(folder)) == sorted([f"{vm}@{policy}@{b['time'].replace('-', '').replace(':', '')}.json",
                                                 f"{vm}@{policy}@{b['time'].replace('-', '').replace(':', '')}@vda.qcow2"])
