"""Shared by the backup and snapshot tests: a pool folder libvirt-qemu can reach, clean-up that first
drops the snapshots (conftest's undefine would fail on a domain that has any), and qemu-io data checks."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import cli, doc

IMAGES = "/var/lib/libvirt/images"


@pytest.fixture
def site(prefix, qemu_uri):
    """(prefix, base folder under /var/lib/libvirt/images); everything is removed afterwards."""
    base = os.path.join(IMAGES, prefix.rstrip("-"))
    yield prefix, base
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(qemu_uri)
    try:
        for dom in conn.listAllDomains(0):
            if not dom.name().startswith(prefix):
                continue
            # Each step on its own: one that fails (the VM already stopped) must not leave it defined.
            for step in (lambda: dom.isActive() and dom.destroy(),
                         lambda: [s.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                                  for s in dom.listAllSnapshots(0)],
                         lambda: dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                                   | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)):
                try:
                    step()
                except libvirt.libvirtError:
                    pass
        for pool in conn.listAllStoragePools(0):
            if not pool.name().startswith(prefix):
                continue
            try:
                if pool.isActive():
                    pool.refresh(0)
                    for vol in pool.listAllVolumes(0):
                        try:
                            vol.delete(0)
                        except libvirt.libvirtError:
                            pass   # the folder goes below anyway
                    pool.destroy()
                pool.undefine()
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    for d in os.listdir(IMAGES):
        if d.startswith(prefix.rstrip("-")):
            shutil.rmtree(os.path.join(IMAGES, d), ignore_errors=True)


def qemu_io(path: str, command: str, running: bool = False) -> subprocess.CompletedProcess:
    """Run one qemu-io command on a qcow2 file; a running VM's disk is only read, with shared locks."""
    args = ["qemu-io", "-f", "qcow2"] + (["-r", "-U"] if running else []) + ["-c", command, path]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def write_pattern(path: str, byte: int) -> None:
    r = qemu_io(path, f"write -P {byte:#x} 0 1M")
    assert r.returncode == 0, r.stderr + r.stdout


def has_pattern(path: str, byte: int, running: bool = False) -> bool:
    r = qemu_io(path, f"read -P {byte:#x} 0 1M", running)
    assert "read 1048576/1048576" in r.stdout, r.stderr + r.stdout
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def base_docs(prefix: str, base: str, state: str = "shutoff", capacity: str = "64MiB") -> list[dict]:
    """An edge pool with one disk, a backups pool, and a tiny TCG VM (no OS: it idles in the firmware)."""
    return [
        doc("StoragePool", f"{prefix}edge", {"path": f"{base}-edge"}),
        doc("StoragePool", f"{prefix}backups", {"path": f"{base}-backups"}),
        doc("Disk", f"{prefix}root", {"pool": f"{prefix}edge", "capacity": capacity}),
        doc("VirtualMachine", f"{prefix}vm", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": state,
                                             "disks": [{"disk": f"{prefix}root", "target": "vda"}]}),
    ]


def apply_twice(path, *flags: str) -> "object":
    """Apply, then apply again and assert the second run changes nothing; returns the first run."""
    first = cli("apply", str(path), *flags)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), *flags)
    assert second.code == 0 and "changed=0 failed=0" in second.recap, second.out + second.err
    return first
