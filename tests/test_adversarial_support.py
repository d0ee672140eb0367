"""Shared machinery of the adversarial suite (no tests here):

- a private libvirtd (run as `nobody`, own socket), whose test hypervisor is ours alone, so that
  --prune, kill -9 and "the target goes away" can be exercised without touching anything another
  test or engineer keeps on the shared test+unix:///default;
- a slowed CLI: the real `reconciler` entry point with a short sleep around each side effect, so a
  SIGKILL sent after the Nth "changed:" line lands in the middle of the run, not after it;
- readers of live state from outside (libvirt API / virsh), to prove that a refused run changed nothing.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT


def _libvirt():
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    return libvirt


# --------------------------------------------------------------------------- private libvirtd

@dataclass
class PrivateLibvirtd:
    dir: Path
    proc: subprocess.Popen | None = None
    conn: object = None

    @property
    def socket(self) -> str:
        return str(self.dir / "run" / "libvirt" / "libvirt-sock")

    @property
    def uri(self) -> str:
        return f"test+unix:///default?socket={self.socket}"

    def start(self) -> "PrivateLibvirtd":
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(self.dir),
               "XDG_RUNTIME_DIR": str(self.dir / "run"), "XDG_CONFIG_HOME": str(self.dir / "cfg"),
               "XDG_CACHE_HOME": str(self.dir / "cache"), "XDG_DATA_HOME": str(self.dir / "data")}
        cmd = ["libvirtd"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        try:
            os.unlink(self.socket)
        except OSError:
            pass
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        libvirt = _libvirt()
        deadline = time.monotonic() + 20
        while True:
            try:
                # The test driver's state lives only while a connection is open: hold one.
                self.conn = libvirt.open(self.uri)
                return self
            except libvirt.libvirtError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail("cannot start a private libvirtd (the kill and went-away tests need one): "
                                "see its command line above")
                time.sleep(0.1)

    def kill(self) -> None:
        """The target goes away: SIGKILL the daemon (and everything in its session)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.conn = None

    def stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        self.kill()  # its test hypervisor keeps nothing worth a graceful stop


def new_private_libvirtd() -> PrivateLibvirtd:
    d = Path(tempfile.mkdtemp(prefix="reconciler-adv-libvirtd-", dir="/tmp"))
    os.chmod(d, 0o777)  # the daemon runs as nobody
    return PrivateLibvirtd(d).start()


@pytest.fixture
def private_libvirtd():
    """A libvirtd of this test's own (test hypervisor), stopped afterwards."""
    p = new_private_libvirtd()
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(p.dir, ignore_errors=True)


@pytest.fixture
def lock_dir(tmp_path) -> str:
    """A lock folder of this test's own, so other suites running at the same time never hold our lock."""
    d = tmp_path / "locks"
    d.mkdir()
    return str(d)


# --------------------------------------------------------------------------- live state from outside

def domains(uri: str, prefix: str = "") -> dict[str, dict]:
    """{name: {uuid, active, managed, xml}} of the domains whose name starts with `prefix`."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        out = {}
        for d in conn.listAllDomains(0):
            if d.name().startswith(prefix):
                xml = d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                out[d.name()] = {"uuid": d.UUIDString(), "active": bool(d.isActive()), "xml": xml,
                                 "managed": 'managed="true"' in xml or "managed='true'" in xml}
        return out
    finally:
        conn.close()


def storage(uri: str, prefix: str = "") -> dict[str, dict]:
    """{pool: {volume: capacity}} for pools named with `prefix`, and volumes named with it in any pool."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        out: dict[str, dict] = {}
        for pool in conn.listAllStoragePools(0):
            vols = {}
            try:
                if pool.isActive():
                    try:
                        pool.refresh(0)
                    except libvirt.libvirtError:
                        pass  # another suite's pool whose folder is gone: its listing is still good
                    vols = {v.name(): v.info()[1] for v in pool.listAllVolumes(0) if v.name().startswith(prefix)}
                name = pool.name()
            except libvirt.libvirtError:
                continue  # deleted by someone else while we looked
            if name.startswith(prefix) or vols:
                out[name] = vols
        return out
    finally:
        conn.close()


def live_state(uri: str, prefix: str) -> dict:
    return {"domains": {n: (d["uuid"], d["active"]) for n, d in domains(uri, prefix).items()},
            "storage": storage(uri, prefix)}


# --------------------------------------------------------------------------- a slowed CLI

_SLOW = r"""
import sys, time
import libvirt
from reconciler.providers.libvirt import provider as p
delay, define_delay = map(float, sys.argv[1].split(","))
orig_apply = p.LibvirtProvider.apply
def apply(self, action, options):
    time.sleep(delay / 2)
    return orig_apply(self, action, options)
p.LibvirtProvider.apply = apply
orig_define = libvirt.virConnect.defineXML
def defineXML(self, xml):
    dom = orig_define(self, xml)
    time.sleep(define_delay)   # a kill here leaves a defined domain that was never started
    return dom
libvirt.virConnect.defineXML = defineXML
from reconciler.providers.mosquitto import provider as mp
orig_mqtt = mp.MosquittoProvider.apply
def mqtt_apply(self, action, options=None):
    time.sleep(delay)
    return orig_mqtt(self, action, options)
mp.MosquittoProvider.apply = mqtt_apply
from reconciler.cli import main
sys.exit(main(sys.argv[2:]))
"""


def slow_cli(*args: str, delay: float = 0.04, define_delay: float | None = None,
             env: dict | None = None) -> subprocess.Popen:
    """The real CLI with `delay` seconds spent around each side effect (by default half before the
    action, half right after a domain is defined); stdout is a pipe read line by line by the caller."""
    if define_delay is None:
        define_delay = delay / 2
    e = dict(os.environ)
    e.setdefault("RECONCILER_SHUTDOWN_TIMEOUT", "1s")
    e.setdefault("RECONCILER_SCOPE", "tests")
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-c", _SLOW, f"{delay},{define_delay}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=str(ROOT), bufsize=1)


def read_until(proc: subprocess.Popen, predicate, timeout: float = 60) -> list[str]:
    """Lines of `proc`'s stdout up to and including the first for which `predicate(lines)` holds."""
    # Byte by byte from the descriptor: a buffered readline may read ahead, and communicate(), which
    # reads the descriptor directly, would never see those lines.
    lines: list[str] = []
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        c = os.read(fd, 1)
        if not c:
            break
        if c != b"\n":
            buf += c
            continue
        lines.append(buf.decode("utf-8", "replace"))
        buf = b""
        if predicate(lines):
            return lines
    raise AssertionError("the run ended before the awaited point:\n" + "\n".join(lines))


def changed_lines(lines: list[str]) -> int:
    return sum(1 for l in lines if l.startswith("changed:"))
