"""Concurrency: one lock per target, held for a whole apply. A second apply waits with a message up to
--lock-timeout, then fails clearly; plan takes no lock; a lock left by a killed process blocks nothing.
Every test uses real processes and a lock folder of its own (RECONCILER_LOCK_DIR)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cli, doc, write
from test_adversarial_support import (changed_lines, domains, lock_dir, private_libvirtd, read_until,  # noqa: F401
                                      slow_cli)

_HOLDER = r"""
import sys, time
from reconciler.lock import TargetLock
with TargetLock(sys.argv[1], timeout=5):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def hold_lock(target: str, seconds: float, lock_dir: str) -> subprocess.Popen:
    """Another process holding the lock of `target` for `seconds`, as a running apply would."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, target, str(seconds)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "RECONCILER_LOCK_DIR": lock_dir}, cwd=str(ROOT))
    assert p.stdout.readline().strip() == "held"
    return p


def vms(prefix: str, n: int) -> list[dict]:
    return [doc("VirtualMachine", f"{prefix}vm{i:02d}", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1})
            for i in range(n)]


def test_second_apply_waits_with_a_message_then_gives_up_clearly(private_libvirtd, prefix, tmp_path, lock_dir):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 2))
    holder = hold_lock(f"libvirt:{uri}", 30, lock_dir)
    try:
        t0 = time.monotonic()
        run = cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "1.5s", env={"RECONCILER_LOCK_DIR": lock_dir})
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert run.code == 1 and "Traceback" not in run.err, run.err
    err = run.err.splitlines()
    assert err[0].startswith("waiting for another reconciler run (pid ") and "up to 1.5s" in err[0], run.err
    assert err[-1].startswith("error: another reconciler run (pid ") and "gave up after 1.5s" in err[-1] \
        and "--lock-timeout" in err[-1], run.err
    assert 1.5 <= took < 20
    assert domains(uri, prefix) == {}, "the refused run changed live state"


def test_second_apply_proceeds_once_the_first_is_done(private_libvirtd, prefix, tmp_path, lock_dir):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 2))
    holder = hold_lock(f"libvirt:{uri}", 2, lock_dir)
    t0 = time.monotonic()
    run = cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "60s", env={"RECONCILER_LOCK_DIR": lock_dir})
    took = time.monotonic() - t0
    holder.wait(10)
    assert run.code == 0 and "changed=2" in run.recap, run.out + run.err
    assert "waiting for another reconciler run" in run.err
    assert took >= 1.5


def test_plan_takes_no_lock(private_libvirtd, prefix, tmp_path, lock_dir):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 2))
    holder = hold_lock(f"libvirt:{uri}", 30, lock_dir)
    try:
        for args in (("plan",), ("apply", "--check")):
            t0 = time.monotonic()
            run = cli(*args, str(m), "--libvirt-uri", uri, env={"RECONCILER_LOCK_DIR": lock_dir})
            assert run.code == 2 and "waiting" not in run.err, run.out + run.err
            assert time.monotonic() - t0 < 15
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_never_blocks(private_libvirtd, prefix, tmp_path, lock_dir):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 2))
    holder = hold_lock(f"libvirt:{uri}", 600, lock_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.listdir(lock_dir), "the lock file is still there, holding the dead pid"
    run = cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "0s", env={"RECONCILER_LOCK_DIR": lock_dir})
    assert run.code == 0 and "waiting" not in run.err, run.out + run.err


def test_a_killed_apply_leaves_no_lock_behind(private_libvirtd, prefix, tmp_path, lock_dir):
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 10))
    env = {"RECONCILER_LOCK_DIR": lock_dir}
    p = slow_cli("apply", str(m), "--libvirt-uri", uri, delay=0.2, env=env)
    read_until(p, lambda ls: changed_lines(ls) >= 1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    run = cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "0s", env=env)
    assert run.code == 0 and "waiting" not in run.err, run.out + run.err


def test_the_lock_is_per_target(private_libvirtd, prefix, tmp_path, lock_dir):
    """A run on another target is not held up by this one's lock."""
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 1))
    holder = hold_lock("libvirt:test+unix:///some-other-host", 30, lock_dir)
    try:
        run = cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "0s", env={"RECONCILER_LOCK_DIR": lock_dir})
    finally:
        holder.kill()
        holder.wait()
    assert run.code == 0, run.out + run.err


def test_two_real_applies_at_once_never_interleave(private_libvirtd, prefix, tmp_path, lock_dir):
    """Two slowed applies of the same 20 VMs started together: one makes all 20, the other waits for it,
    then reads the result and changes nothing. Had they interleaved, both would have planned creations."""
    uri = private_libvirtd.uri
    m = write(tmp_path / "m" / "vms.yaml", *vms(prefix, 20))
    env = {"RECONCILER_LOCK_DIR": lock_dir}
    a = slow_cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "120s", delay=0.3, env=env)
    first = read_until(a, lambda ls: changed_lines(ls) >= 1)   # a holds the lock and is mid-apply
    b = slow_cli("apply", str(m), "--libvirt-uri", uri, "--lock-timeout", "120s", delay=0.3, env=env)
    out_a, err_a = a.communicate(timeout=120)
    out_a = "\n".join(first) + "\n" + out_a
    out_b, err_b = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, out_a + err_a + out_b + err_b
    recaps = sorted(l for out in (out_a, out_b) for l in out.splitlines() if l.startswith("ok="))
    assert recaps == ["ok=0 changed=20 failed=0 skipped=0", "ok=20 changed=0 failed=0 skipped=0"], recaps
    assert "changed=20" in out_a and "changed=0" in out_b
    assert "waiting for another reconciler run" in err_b
    assert len(domains(uri, prefix)) == 20
