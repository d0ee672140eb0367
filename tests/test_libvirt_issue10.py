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
