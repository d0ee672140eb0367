"""Fixtures shared by the suite: the real libvirtd (qemu:///system and its test+unix:///default
hypervisor), unique name prefixes, and clean-up of everything a test created."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# scripts/devbroker.py (the demo and test broker launcher) is a script, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from helpers import unique  # noqa: E402

QEMU = "qemu:///system"
TEST_UNIX = "test+unix:///default"


def _libvirt():
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    return libvirt


def _cleanup(uri: str, prefix: str) -> None:
    libvirt = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                except libvirt.libvirtError:
                    pass
        for pool in conn.listAllStoragePools(0):
            try:
                name = pool.name()
            except libvirt.libvirtError:
                continue
            if name.startswith(prefix):
                try:
                    if pool.isActive():
                        for vol in pool.listAllVolumes(0):
                            vol.delete(0)
                        pool.destroy()
                    pool.undefine()
                except libvirt.libvirtError:
                    pass
            else:
                try:
                    # Other tests create and delete pools at the same time: one may vanish under us.
                    vols = pool.listAllVolumes(0) if pool.isActive() else []
                except libvirt.libvirtError:
                    continue
                for vol in vols:
                    try:
                        if vol.name().startswith(prefix):
                            vol.delete(0)
                    except libvirt.libvirtError:
                        pass
    finally:
        conn.close()


@pytest.fixture(scope="session")
def qemu_uri() -> str:
    libvirt = _libvirt()
    try:
        libvirt.open(QEMU).close()
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirtd is not reachable at {QEMU} (run `make test`, which starts it): {e}")
    return QEMU


@pytest.fixture(scope="session")
def test_unix_uri():
    """libvirtd's test hypervisor; its state lives only while a connection is open, so hold one."""
    libvirt = _libvirt()
    conn = libvirt.open(TEST_UNIX)
    yield TEST_UNIX
    conn.close()


@pytest.fixture
def prefix(request, tmp_path):
    """A unique name prefix for this test's objects; everything carrying it is removed afterwards."""
    p = unique("t") + "-"
    yield p
    for uri in (QEMU, TEST_UNIX):
        _cleanup(uri, p)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def pool_dir(prefix):
    """A pool folder QEMU (running as libvirt-qemu) can reach; pytest's tmp_path is root-only."""
    import os
    base = "/var/tmp/reconciler-tests"
    os.makedirs(base, mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)
    path = os.path.join(base, prefix.rstrip("-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
