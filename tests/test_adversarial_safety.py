"""Data safety: no flag or combination of flags deletes or shrinks a disk (only `state: absent` deletes one);
a running VM is deleted only by `state: absent` or --prune; --prune refuses an empty manifest set and a
wipe of more than half (and more than ten) of a kind's managed objects unless --force."""
from __future__ import annotations

import os

import pytest

from helpers import cli, doc, write
from test_adversarial_support import domains, live_state, private_libvirtd  # noqa: F401
from reconciler import planner
from reconciler.model import Live, Options, Resource, ResourceId

FLAG_SETS = [
    (),
    ("--prune",),
    ("--prune", "--force"),
    ("--prune", "--force", "--allow-restart", "--allow-replace"),
    ("--force", "--allow-restart", "--allow-replace"),
]
MARK = b"reconciler adversarial data marker \x00\xff\x01"
MARK_AT = 1024 * 1024


def _node(prefix: str, pool_dir: str, *, capacity="32MiB", fmt="raw", with_vm=True, disk_state=None):
    pool = doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})
    spec = {"pool": f"{prefix}pool", "capacity": capacity, "format": fmt}
    if disk_state:
        spec["state"] = disk_state
    disk = doc("Disk", f"{prefix}data", spec)
    vm = doc("VirtualMachine", f"{prefix}vm", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff",
                                               "graphics": "none", "disks": [{"disk": f"{prefix}data", "target": "vdb"}]})
    keep = doc("VirtualMachine", f"{prefix}keep", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff"})
    return [pool, disk, vm, keep] if with_vm else [pool, disk, keep]


def _disk_file(pool_dir: str, prefix: str) -> str:
    return os.path.join(pool_dir, f"{prefix}data")


def _write_marker(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(MARK_AT)
        f.write(MARK)


def _marker_intact(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(MARK_AT)
        return f.read(len(MARK)) == MARK


@pytest.mark.libvirt
@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f) or "no-flags")
@pytest.mark.parametrize("change", ["removed-from-manifests", "shrunk", "format-changed"])
def test_no_flag_combination_deletes_or_shrinks_a_disk(change, flags, qemu_uri, prefix, pool_dir, tmp_path):
    scope = ("--scope", prefix.rstrip("-"))
    m = write(tmp_path / "m" / "node.yaml", *_node(prefix, pool_dir))
    first = cli("apply", str(m), "--libvirt-uri", qemu_uri, *scope)
    assert first.code == 0, first.out + first.err
    path = _disk_file(pool_dir, prefix)
    _write_marker(path)
    size = os.path.getsize(path)

    if change == "removed-from-manifests":
        docs = _node(prefix, pool_dir, with_vm=False)
        write(m, docs[0], docs[2])               # the disk and the VM using it are gone from the manifests
    elif change == "shrunk":
        write(m, *_node(prefix, pool_dir, capacity="16MiB"))
    else:
        write(m, *_node(prefix, pool_dir, fmt="qcow2"))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri, *scope, *flags)
    assert "Traceback" not in run.err, run.err
    if change == "removed-from-manifests":
        assert run.code == 0 and f"orphan: [Disk/{prefix}data]" in run.out, run.out + run.err
        vm_left = f"{prefix}vm" in domains(qemu_uri, prefix)
        assert vm_left == ("--prune" not in flags), "the VM must go with --prune only"
    else:
        assert run.code == 1 and "refused" in run.out, run.out + run.err

    assert os.path.exists(path) and os.path.getsize(path) == size and _marker_intact(path)
    storage = live_state(qemu_uri, prefix)["storage"]
    assert storage[f"{prefix}pool"] == {f"{prefix}data": 32 * 1024 * 1024}


@pytest.mark.libvirt
def test_only_state_absent_deletes_a_disk(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *_node(prefix, pool_dir, with_vm=False))
    assert cli("apply", str(m), "--libvirt-uri", qemu_uri).code == 0
    write(m, *_node(prefix, pool_dir, with_vm=False, disk_state="absent"))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 0 and "changed=1" in run.recap, run.out + run.err
    assert not os.path.exists(_disk_file(pool_dir, prefix))


@pytest.mark.libvirt
def test_state_absent_refuses_to_delete_a_disk_a_vm_still_uses(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *_node(prefix, pool_dir))
    assert cli("apply", str(m), "--libvirt-uri", qemu_uri).code == 0
    _write_marker(_disk_file(pool_dir, prefix))
    write(m, *_node(prefix, pool_dir, disk_state="absent"))
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri, "--force", "--allow-restart", "--allow-replace")
    assert run.code == 1 and "still used by VirtualMachine" in run.out, run.out + run.err
    assert _marker_intact(_disk_file(pool_dir, prefix))


# --------------------------------------------------------------------------- deleting VMs

def _test_vm(name: str, **spec) -> dict:
    return doc("VirtualMachine", name, {"hypervisor": "test", "memory": "64MiB", "vcpus": 1, **spec})


@pytest.mark.parametrize("flags, deleted", [
    ((), False),
    (("--force",), False),
    (("--force", "--allow-restart", "--allow-replace"), False),
    (("--prune",), True),
])
def test_a_running_vm_is_deleted_only_by_prune_or_state_absent(flags, deleted, private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    scope = ("--scope", prefix.rstrip("-"))
    m = write(tmp_path / "m" / "vms.yaml", _test_vm(f"{prefix}keep"), _test_vm(f"{prefix}gone"))
    assert cli("apply", str(m), "--libvirt-uri", uri, *scope).code == 0
    assert domains(uri, prefix)[f"{prefix}gone"]["active"]
    write(m, _test_vm(f"{prefix}keep"))
    run = cli("apply", str(m), "--libvirt-uri", uri, *scope, *flags)
    assert run.code == 0, run.out + run.err
    assert (f"{prefix}gone" not in domains(uri, prefix)) == deleted, run.out
    if not deleted:
        assert f"orphan: [VirtualMachine/{prefix}gone]" in run.out
        assert domains(uri, prefix)[f"{prefix}gone"]["active"]


def test_state_absent_deletes_a_running_vm(private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", _test_vm(f"{prefix}vm"))
    assert cli("apply", str(m), "--libvirt-uri", uri).code == 0
    write(m, _test_vm(f"{prefix}vm", state="absent"))
    run = cli("apply", str(m), "--libvirt-uri", uri)
    assert run.code == 0 and "changed=1" in run.recap, run.out + run.err
    assert domains(uri, prefix) == {}


# --------------------------------------------------------------------------- prune guards

@pytest.mark.parametrize("command", ["plan", "apply"])
@pytest.mark.parametrize("force", [False, True])
def test_prune_refuses_when_the_manifests_declare_nothing(command, force, private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    scope = ("--scope", prefix.rstrip("-"))
    m = write(tmp_path / "m" / "vms.yaml", *[_test_vm(f"{prefix}vm{i}") for i in range(3)])
    assert cli("apply", str(m), "--libvirt-uri", uri, *scope).code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not a manifest\n")
    run = cli(command, str(empty), "--libvirt-uri", uri, *scope, "--prune", *(("--force",) if force else ()))
    assert run.code == 1 and "Traceback" not in run.err, run.out + run.err
    assert "refusing to prune: the manifests declare nothing" in run.err
    assert len(domains(uri, prefix)) == 3


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_prune_refuses_to_wipe_more_than_half_and_more_than_ten_without_force(command, private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    scope = ("--scope", prefix.rstrip("-"))
    names = [f"{prefix}vm{i:02d}" for i in range(13)]
    m = write(tmp_path / "m" / "vms.yaml", *[_test_vm(n) for n in names])
    assert cli("apply", str(m), "--libvirt-uri", uri, *scope).code == 0
    write(m, _test_vm(names[0]))                 # a wrongly pointed path: 12 of 13 would go
    extra = ("--allow-restart", "--allow-replace") if command == "apply" else ()
    run = cli(command, str(m), "--libvirt-uri", uri, *scope, "--prune", *extra)
    assert run.code == 1 and "Traceback" not in run.err, run.out + run.err
    assert "refusing to prune 12 of 13 managed VirtualMachine objects" in run.err and "--force" in run.err
    assert sorted(domains(uri, prefix)) == names
    forced = cli("apply", str(m), "--libvirt-uri", uri, *scope, "--prune", "--force")
    assert forced.code == 0 and "changed=12" in forced.recap, forced.out + forced.err
    assert sorted(domains(uri, prefix)) == names[:1]


def test_prune_of_ten_or_of_half_is_allowed_without_force(private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    scope = ("--scope", prefix.rstrip("-"))
    names = [f"{prefix}vm{i:02d}" for i in range(13)]
    m = write(tmp_path / "m" / "vms.yaml", *[_test_vm(n) for n in names])
    assert cli("apply", str(m), "--libvirt-uri", uri, *scope).code == 0
    write(m, *[_test_vm(n) for n in names[:3]])   # 10 of 13: more than half, but not more than ten
    run = cli("apply", str(m), "--libvirt-uri", uri, *scope, "--prune")
    assert run.code == 0 and "changed=10" in run.recap, run.out + run.err


def test_prune_never_touches_unmarked_or_other_scope_objects(private_libvirtd, prefix, tmp_path):
    uri = private_libvirtd.uri
    mine, theirs = ("--scope", prefix.rstrip("-")), ("--scope", prefix.rstrip("-") + "-other")
    other = write(tmp_path / "o" / "vms.yaml", _test_vm(f"{prefix}other"))
    assert cli("apply", str(other), "--libvirt-uri", uri, *theirs).code == 0
    private_libvirtd.conn.defineXML(f"<domain type='test'><name>{prefix}hand</name><memory>65536</memory>"
                                    f"<os><type>hvm</type></os></domain>")
    m = write(tmp_path / "m" / "vms.yaml", _test_vm(f"{prefix}mine"))
    run = cli("apply", str(m), "--libvirt-uri", uri, *mine, "--prune", "--force")
    assert run.code == 0, run.out + run.err
    assert sorted(domains(uri, prefix)) == [f"{prefix}hand", f"{prefix}mine", f"{prefix}other"]


# The thresholds at their edges, on the pure planner (the rule is arithmetic; 30-VM hosts are not needed).

def _live_vms(n: int) -> dict:
    return {ResourceId("VirtualMachine", f"vm{i:02d}"): Live(ResourceId("VirtualMachine", f"vm{i:02d}"), {}, managed=True,
                                                             scope="default")
            for i in range(n)}


def _keep(n: int) -> list:
    from reconciler.kinds import KIND_RULES
    spec = KIND_RULES["VirtualMachine"].normalise({"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "state": "absent"})
    return [Resource(ResourceId("VirtualMachine", f"vm{i:02d}"), spec, declared=frozenset(spec)) for i in range(n)]


@pytest.mark.parametrize("managed, declared, refused", [
    (13, 1, True),     # 12 of 13
    (13, 2, True),     # 11 of 13
    (13, 3, False),    # 10 of 13: not more than ten
    (22, 11, False),   # 11 of 22: exactly half
    (22, 10, True),    # 12 of 22
    (30, 19, False),   # 11 of 30: under half
    (8, 0, None),      # nothing declared: always refused, --force or not
])
def test_prune_thresholds_at_their_edges(managed, declared, refused):
    from reconciler.model import Snapshot
    snap = Snapshot(_live_vms(managed))
    for force in (False, True):
        opts = Options(prune=True, force=force)
        try:
            planner.plan(_keep(declared), snap, opts)
            was_refused = False
        except planner.PlanError:
            was_refused = True
        expected = True if refused is None else (refused and not force)
        assert was_refused == expected, (managed, declared, force)
