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


# --------------------------------------------------------------------------- a host that changes during the read

CHURN = r"""
import sys, time, libvirt
libvirt.registerErrorHandler(lambda *a: None, None)
uri, prefix, pool_dir, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
conn = libvirt.open(uri)
pool = conn.storagePoolLookupByName(prefix + "churn")
dom_xml = "<domain type='qemu'><name>{}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>" \
          "<os><type arch='x86_64'>hvm</type></os></domain>"
pool_xml = "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>"
vol_xml = "<volume><name>{}</name><capacity unit='KiB'>64</capacity><target><format type='raw'/></target></volume>"
n = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    n += 1
    try:
        vols = [pool.createXML(vol_xml.format(f"{prefix}v{n}-{i}"), 0) for i in range(3)]
        dom = conn.defineXML(dom_xml.format(f"{prefix}churn{n}"))
        p = conn.storagePoolCreateXML(pool_xml.format(f"{prefix}tp{n}", pool_dir), 0)
        for v in vols:
            v.delete(0)
        dom.undefine()
        p.destroy()
    except libvirt.libvirtError as e:
        errors += 1
        print("churn error:", e, file=sys.stderr)
print(n, errors)
"""


def test_objects_vanishing_during_the_read_never_fail_a_plan(qemu_uri, prefix, pool_dir, tmp_path):
    import sys
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir, extra_vm={"state": "shutoff"}))
    apply_twice(m, qemu_uri)
    # An unrelated pool where another tool creates and deletes volumes, domains and transient pools.
    churn_dir = f"{pool_dir}-churn"
    os.makedirs(churn_dir)
    virsh(qemu_uri, "pool-define-as", f"{prefix}churn", "dir", "--target", churn_dir)
    virsh(qemu_uri, "pool-start", f"{prefix}churn")
    tp_dir = f"{pool_dir}-tp"
    os.makedirs(tp_dir)
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    seconds = 90
    churn = subprocess.Popen([sys.executable, str(script), qemu_uri, prefix, tp_dir, str(seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures, plans = [], 0
    try:
        time.sleep(1)
        while churn.poll() is None and plans < 30:
            p = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
            plans += 1
            # A failed read is exit 1. (Exit 2 would be a change the plan saw: this host is shared, and
            # another session may stop a pool for a moment; that is a true answer, not a failure.)
            if p.code not in (0, 2) or "error" in p.json:
                failures.append(p.out + p.err)
    finally:
        out, err = churn.communicate(timeout=seconds + 60)
    rounds, churn_errors = map(int, out.split())
    assert churn_errors == 0, err
    assert plans >= 10 and rounds >= 50, (plans, rounds)   # the read really overlapped the churn
    assert failures == [], failures[:3]
    subprocess.run(["rm", "-rf", churn_dir, tp_dir])


# --------------------------------------------------------------------------- paths QEMU cannot reach

def _acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


def _home0700(pool_dir: str):
    """A fresh 0700 folder like a Debian home, under a base QEMU can pass (pytest's tmp_path is 0700 itself)."""
    from pathlib import Path
    base = Path(pool_dir)
    base.mkdir(mode=0o755)
    home = base / "home0700"
    home.mkdir()
    os.chmod(home, 0o700)
    return home


def test_search_permission_follows_mode_bits_and_posix_acls(prefix, pool_dir):
    import pwd
    from reconciler.providers.libvirt.hostaccess import first_blocked, hypervisor_identity, is_local_system
    name, uid, gids = hypervisor_identity()
    assert name == pwd.getpwuid(uid).pw_name == "libvirt-qemu"     # Debian's default, qemu.conf all comments
    home = _home0700(pool_dir)
    deep = home / "clone" / ".run" / "pools" / "p"
    deep.mkdir(parents=True)
    b = first_blocked(str(deep), uid, gids)
    assert b is not None and b.dir == str(home) and b.mode == 0o700 and b.owner == "root"
    # A folder that does not exist yet is libvirt's to create: only existing ancestors count.
    assert first_blocked(str(home / "nope" / "pool"), uid, gids).dir == str(home)
    os.chmod(home, 0o701)
    assert first_blocked(str(deep), uid, gids) is None
    # What virt-manager does instead of chmod: a named-user ACL entry with x (and a mask allowing it).
    os.chmod(home, 0o700)
    USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 1, 2, 4, 0x10, 0x20
    os.setxattr(home, "system.posix_acl_access",
                _acl_xattr([(USER_OBJ, 7, 0xFFFFFFFF), (USER, 1, uid), (GROUP_OBJ, 0, 0xFFFFFFFF),
                            (MASK, 1, 0xFFFFFFFF), (OTHER, 0, 0xFFFFFFFF)]))
    assert first_blocked(str(deep), uid, gids) is None
    # The mask limits named entries: mask without x denies again.
    os.setxattr(home, "system.posix_acl_access",
                _acl_xattr([(USER_OBJ, 7, 0xFFFFFFFF), (USER, 1, uid), (GROUP_OBJ, 0, 0xFFFFFFFF),
                            (MASK, 0, 0xFFFFFFFF), (OTHER, 0, 0xFFFFFFFF)]))
    assert first_blocked(str(deep), uid, gids).dir == str(home)
    assert is_local_system("qemu:///system") and is_local_system("qemu+unix:///system")
    assert not any(is_local_system(u) for u in ("test:///default", "qemu+ssh://root@edge-1/system",
                                                 "qemu:///session", "test+unix:///default"))


def _unreachable_node(prefix: str, home) -> tuple[list[dict], str]:
    pool_path = str(home / "clone" / ".run" / "pools" / f"{prefix}pool")
    docs = node(prefix, pool_path)
    return docs, pool_path


def _nothing_made(uri: str, prefix: str, pool_path: str) -> None:
    assert prefix not in virsh(uri, "list", "--all", "--name")
    assert f"{prefix}pool" not in virsh(uri, "pool-list", "--all", "--name")
    assert not os.path.exists(pool_path)


def test_plan_refuses_a_pool_qemu_cannot_reach_in_process(qemu_uri, prefix, pool_dir):
    """The provider's fact and the kind's rule, as run.reconcile wires them (consider, read, plan)."""
    from reconciler import planner
    from reconciler.kinds import KIND_RULES
    from reconciler.model import Options, Resource, ResourceId
    from reconciler.providers.libvirt import LibvirtProvider
    home = _home0700(pool_dir)
    docs, pool_path = _unreachable_node(prefix, home)
    resources = [Resource(ResourceId(d["kind"], d["metadata"]["name"]), KIND_RULES[d["kind"]].normalise(d["spec"]),
                          declared=frozenset(d["spec"])) for d in docs]
    p = LibvirtProvider(qemu_uri)
    try:
        plan = planner.plan(resources, p.read(frozenset({"StoragePool", "Disk", "VirtualMachine"}), resources), Options())
    finally:
        p.close()
    refused = {str(a.id): a.refused for a in plan.actions if a.refused}
    assert set(refused) == {f"StoragePool/{prefix}pool", f"Disk/{prefix}root", f"Disk/{prefix}data",
                            f"VirtualMachine/{prefix}vm"}, refused
    msg = refused[f"StoragePool/{prefix}pool"]
    assert f"QEMU runs as libvirt-qemu, which cannot reach the pool's folder ({pool_path})" in msg
    assert f"{home} (mode 0700, owner root)" in msg and f"setfacl -m u:libvirt-qemu:x {home}" in msg
    _nothing_made(qemu_uri, prefix, pool_path)
    # test:/// is never checked (its pools are not QEMU's).
    t = LibvirtProvider("test:///default")
    try:
        assert t.read(frozenset(), resources).host.hypervisor_access is None
    finally:
        t.close()


def test_plan_refuses_a_pool_qemu_cannot_reach(qemu_uri, prefix, pool_dir):
    home = _home0700(pool_dir)
    docs, pool_path = _unreachable_node(prefix, home)
    m = write(home.parent / "m" / "node.yaml", *docs)
    p = cli("plan", str(m), "--libvirt-uri", qemu_uri)
    assert p.code == 1, p.out + p.err
    assert f"which cannot reach the pool's folder ({pool_path})" in p.out + p.err
    assert f"setfacl -m u:libvirt-qemu:x {home}" in p.out + p.err
    a = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert a.code == 1 and "changed=0" in a.recap, a.out + a.err
    _nothing_made(qemu_uri, prefix, pool_path)
    # The fix the message gives (search permission for others, as chmod o+x does) lets it through.
    os.chmod(home, 0o701)
    apply_twice(m, qemu_uri)
    assert virsh(qemu_uri, "domstate", f"{prefix}vm").strip() == "running"
