"""`make demo` from a fresh clone in a 0700 directory (a Debian home, /root), as a new user runs it:
setup builds the clone's own venv and starts the clone's own broker on BROKER_PORT (the shared
broker on 1883 is left alone), the demo validates, applies and applies again with nothing to change,
the VM runs, and `make clean-demo` removes the VM, disks, pool, its folder and stops the broker,
twice in a row without error. Issue 10: before, QEMU (libvirt-qemu) could not reach the pool under
the clone's .run/ and the VM failed to start with "Permission denied"."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from helpers import ROOT, virsh

pytestmark = pytest.mark.libvirt

QEMU = "qemu:///system"
POOL_DIR = "/var/lib/libvirt/images/reconciler-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _make(clone, target: str, port: int, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    return subprocess.run(["make", "-s", target, f"BROKER_PORT={port}"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_make_demo_from_a_clone_in_a_0700_home_and_clean_demo(tmp_path_factory):
    if "demo-gw-1" in virsh(QEMU, "list", "--all", "--name"):
        pytest.fail("a demo VM demo-gw-1 already exists on this host (run `make clean-demo` where it was made)")
    base = tmp_path_factory.mktemp("demo")
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    clone = home / "reconciler"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    port = _free_port()
    try:
        demo = _make(clone, "demo", port)
        out = demo.stdout + demo.stderr
        assert demo.returncode == 0, out[-4000:]
        assert "--- second run: must change nothing" in out
        second = out.split("--- second run: must change nothing", 1)[1]
        assert "changed=0" in second and "failed=0" in second, second[-3000:]
        assert "Permission denied" not in out
        assert virsh(QEMU, "domstate", "demo-gw-1").strip() == "running"
        assert os.path.isfile(f"{POOL_DIR}/demo-gw-root")
        assert _listening(port)                                   # the clone's own broker
    finally:
        clean = _make(clone, "clean-demo", port)
        again = _make(clone, "clean-demo", port)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "clean-demo: VM demo-gw-1 removed" in clean.stdout and "clean-demo: pool demo-edge removed" in clean.stdout
    assert again.returncode == 0, again.stdout + again.stderr       # idempotent
    assert "demo-gw-1" not in virsh(QEMU, "list", "--all", "--name")
    assert "demo-edge" not in virsh(QEMU, "pool-list", "--all", "--name")
    assert not os.path.exists(POOL_DIR)
    assert not _listening(port)
    shutil.rmtree(base, ignore_errors=True)
