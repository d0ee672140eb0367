"""Faults: unreachable or silent targets, refused logins, a target going away in the middle of a run,
and kill -9 of the reconciler at several points of a 50-VM apply. Each ends with one clear message
(no traceback) within 30 seconds, per-resource lines that say what happened, and a rerun that converges."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from helpers import cli, doc, write
from mqtt_fixtures import mq  # noqa: F401  (a fixture)
from test_adversarial_support import (changed_lines, domains, live_state, lock_dir, new_private_libvirtd,  # noqa: F401
                                      private_libvirtd, read_until, slow_cli)

CONTRACT_DEADLINE = 30.0


def vm(name: str, **spec) -> dict:
    s = {"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "graphics": "none"}
    s.update(spec)
    return doc("VirtualMachine", name, s)


def assert_clear_failure(run, *texts: str) -> None:
    assert run.code == 1, f"exit {run.code}\n{run.out}\n{run.err}"
    assert "Traceback" not in run.err + run.out, run.err
    lines = [l for l in run.err.splitlines() if l.strip() and not l.startswith("waiting for")]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    for t in texts:
        assert t in lines[0], f"{t!r} not in {lines[0]!r}"


def timed(*args, env=None):
    t0 = time.monotonic()
    run = cli(*args, env=env, timeout=120)
    return run, time.monotonic() - t0


# --------------------------------------------------------------------------- unreachable targets

@pytest.mark.parametrize("uri, text", [
    ("qemu+unix:///system?socket=/nonexistent/libvirt-sock", "No such file or directory"),
    ("test+unix:///default?socket=/nonexistent-socket", "No such file or directory"),
    ("test+unix:///nonexistent-socket", "cannot connect to libvirt"),
    ("bogus+scheme:///x", "cannot connect to libvirt"),
])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_unreachable_libvirt_fails_fast_with_one_message(command, uri, text, tmp_path, lock_dir):
    m = write(tmp_path / "m" / "vm.yaml", vm("adv-unreachable"))
    run, took = timed(command, str(m), "--libvirt-uri", uri, env={"RECONCILER_LOCK_DIR": lock_dir})
    assert_clear_failure(run, text)
    assert took < CONTRACT_DEADLINE


class SilentServer:
    """A listener that accepts connections and never says a word: a firewalled or hung target."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0)):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(16)
        self.conns: list = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_silent_libvirt_fails_within_30_seconds(tmp_path, lock_dir):
    path = str(tmp_path / "silent.sock")
    server = SilentServer(socket.AF_UNIX, path)
    try:
        m = write(tmp_path / "m" / "vm.yaml", vm("adv-silent"))
        run, took = timed("plan", str(m), "--libvirt-uri", f"test+unix:///default?socket={path}",
                          env={"RECONCILER_LOCK_DIR": lock_dir})
    finally:
        server.close()
    assert_clear_failure(run, "did not answer")
    assert took < CONTRACT_DEADLINE, f"took {took:.1f} s"


def _mqtt_role(prefix: str) -> dict:
    return doc("MqttRole", f"{prefix}role", {"acls": [{"type": "publishClientSend", "topic": "adv/x"}]})


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.mqtt
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_broker_on_a_closed_port_fails_fast(command, prefix, tmp_path, lock_dir):
    m = write(tmp_path / "m" / "role.yaml", _mqtt_role(prefix))
    url = f"mqtt://127.0.0.1:{_free_port()}"
    run, took = timed(command, str(m), env={"RECONCILER_MQTT_URL": url, "RECONCILER_MQTT_USERNAME": "admin",
                                            "RECONCILER_MQTT_PASSWORD": "pw-never-shown-1",
                                            "RECONCILER_LOCK_DIR": lock_dir})
    assert_clear_failure(run, url)
    assert "pw-never-shown-1" not in run.out + run.err
    assert took < CONTRACT_DEADLINE


@pytest.mark.mqtt
def test_silent_broker_fails_within_30_seconds(prefix, tmp_path, lock_dir):
    server = SilentServer()
    url = f"mqtt://127.0.0.1:{server.sock.getsockname()[1]}"
    try:
        m = write(tmp_path / "m" / "role.yaml", _mqtt_role(prefix))
        run, took = timed("apply", str(m), env={"RECONCILER_MQTT_URL": url, "RECONCILER_MQTT_USERNAME": "admin",
                                                "RECONCILER_MQTT_PASSWORD": "pw-never-shown-2",
                                                "RECONCILER_LOCK_DIR": lock_dir})
    finally:
        server.close()
    assert_clear_failure(run, url)
    assert took < CONTRACT_DEADLINE, f"took {took:.1f} s"


@pytest.mark.mqtt
def test_broker_refusing_the_login_fails_clearly_and_changes_nothing(prefix, mq, tmp_path):
    m = write(tmp_path / "m" / "role.yaml", _mqtt_role(prefix))
    before = mq.ctrl("listRoles")
    bad = mq.secret("wrong-admin-password-3")
    run = mq.run("apply", str(m), env={"RECONCILER_MQTT_PASSWORD": bad})
    assert_clear_failure(run, "refused the login")
    run = mq.run("apply", str(m), env={"RECONCILER_MQTT_USERNAME": "nobody-such-user"})
    assert_clear_failure(run, "refused the login")
    assert mq.ctrl("listRoles") == before


# --------------------------------------------------------------------------- a target going away mid-run

def test_libvirt_going_away_mid_run_is_reported_per_resource_and_a_rerun_converges(private_libvirtd, prefix, tmp_path):
    """The private libvirtd is SIGKILLed after the 5th change: the lines before say changed, the rest
    failed (each with the reason), the run exits 1 without a traceback; against the restarted daemon
    a rerun converges and a third run changes nothing. (The test hypervisor keeps its state in memory,
    so the restarted daemon starts empty: the rerun recreates what was lost, with no duplicate.)"""
    names = [f"{prefix}vm{i:02d}" for i in range(20)]
    m = write(tmp_path / "m" / "vms.yaml", *[vm(n) for n in names])
    uri = private_libvirtd.uri
    # Slow enough that the four concurrent creates are far from done when the daemon dies.
    p = slow_cli("apply", str(m), "--libvirt-uri", uri, delay=0.4)
    lines = read_until(p, lambda ls: changed_lines(ls) >= 5)
    private_libvirtd.kill()
    out, err = p.communicate(timeout=60)
    lines += out.splitlines()
    assert p.returncode == 1, "\n".join(lines) + err
    assert "Traceback" not in err + out, err
    per_resource = [l for l in lines if l.startswith(("changed:", "failed:", "skipped:", "ok:"))]
    assert len(per_resource) == 20, "\n".join(lines)
    failed = [l for l in per_resource if l.startswith("failed:")]
    assert failed and all("went away" in l or "libvirt" in l for l in failed), "\n".join(failed)
    recap = [l for l in lines if l.startswith("ok=")][-1]
    assert f"failed={len(failed)}" in recap
    private_libvirtd.start()
    again = cli("apply", str(m), "--libvirt-uri", uri)
    assert again.code == 0, again.out + again.err
    third = cli("apply", str(m), "--libvirt-uri", uri)
    assert third.code == 0 and "changed=0" in third.recap, third.out
    live = domains(uri, prefix)
    assert sorted(live) == names and all(d["managed"] and d["active"] for d in live.values())


@pytest.mark.libvirt
def test_a_failing_resource_skips_its_dependents_and_independent_work_goes_on(qemu_uri, prefix, pool_dir, tmp_path):
    """A disk whose backing file does not exist fails; the VM that needs it is skipped, not half made;
    an independent disk and VM are applied. Once the manifest is fixed, a rerun converges."""
    pool = doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})
    broken = doc("Disk", f"{prefix}broken", {"pool": f"{prefix}pool", "capacity": "16MiB", "format": "qcow2",
                                             "backingStore": {"path": f"/nonexistent/{prefix}base.qcow2"}})
    good = doc("Disk", f"{prefix}good", {"pool": f"{prefix}pool", "capacity": "16MiB", "format": "raw"})
    vm_spec = {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff", "graphics": "none"}
    needs_broken = doc("VirtualMachine", f"{prefix}a", {**vm_spec, "disks": [{"disk": f"{prefix}broken", "target": "vda"}]})
    independent = doc("VirtualMachine", f"{prefix}b", {**vm_spec, "disks": [{"disk": f"{prefix}good", "target": "vda"}]})
    m = write(tmp_path / "m" / "node.yaml", pool, broken, good, needs_broken, independent)
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 1 and "Traceback" not in run.err, run.out + run.err
    line = {l.split("] ")[0].split("[")[1]: l.split(":")[0] for l in run.out.splitlines() if l.startswith(("changed:", "failed:", "skipped:"))}
    assert line == {f"StoragePool/{prefix}pool": "changed", f"Disk/{prefix}broken": "failed",
                    f"Disk/{prefix}good": "changed", f"VirtualMachine/{prefix}a": "skipped",
                    f"VirtualMachine/{prefix}b": "changed"}, run.out
    assert "changed=3 failed=1 skipped=1" in run.recap
    live = live_state(qemu_uri, prefix)
    assert set(live["domains"]) == {f"{prefix}b"}
    assert set(live["storage"][f"{prefix}pool"]) == {f"{prefix}good"}
    del broken["spec"]["backingStore"]
    write(m, pool, broken, good, needs_broken, independent)
    again = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert again.code == 0 and "changed=2" in again.recap, again.out + again.err
    third = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert third.code == 0 and "changed=0" in third.recap, third.out


@pytest.mark.mqtt
def test_broker_going_away_mid_run_is_reported_per_resource_and_a_rerun_converges(prefix, mq, tmp_path):
    """The broker is SIGKILLed after the 4th change; every resource still gets its line, the run exits 1
    with no traceback and no secret; after a restart a rerun converges with each client once."""
    import devbroker
    secret_file = tmp_path / "pw"
    secret_file.write_text(mq.secret("client-secret-Xy9") + "\n")
    role = doc("MqttRole", f"{prefix}role", {"acls": [{"type": "publishClientSend", "topic": f"{prefix}/+/data"}]})
    clients = [doc("MqttClient", f"{prefix}c{i:02d}", {"password": {"fromFile": str(secret_file)},
                                                       "roles": [{"name": f"{prefix}role"}]}) for i in range(15)]
    m = write(tmp_path / "m" / "mqtt.yaml", role, *clients)
    p = slow_cli("apply", str(m), delay=0.1, env=mq.env())
    lines = read_until(p, lambda ls: changed_lines(ls) >= 4)
    os.kill(mq.broker.pid, signal.SIGKILL)
    out, err = p.communicate(timeout=90)
    lines += out.splitlines()
    mq.outputs.append("\n".join(lines) + err)
    assert p.returncode == 1, "\n".join(lines) + err
    assert "Traceback" not in err + out, err
    per_resource = [l for l in lines if l.startswith(("changed:", "failed:", "skipped:", "ok:"))]
    assert len(per_resource) == 16, "\n".join(lines)
    assert any(l.startswith("failed:") for l in per_resource)
    try:
        os.waitpid(mq.broker.pid, 0)
    except ChildProcessError:
        pass
    (mq.broker.dir / "mosquitto.pid").unlink(missing_ok=True)
    mq.broker = devbroker.start(mq.broker.dir, mq.port)
    again = mq.run("apply", str(m))
    assert again.code == 0, again.out + again.err
    third = mq.run("apply", str(m))
    assert third.code == 0 and "changed=0" in third.recap, third.out
    listed = mq.ctrl("listClients")
    for i in range(15):
        assert listed.split().count(f"{prefix}c{i:02d}") == 1


# --------------------------------------------------------------------------- kill -9 of the reconciler

# Creates run four at a time, so up to four more than the printed lines may be done at the kill.
@pytest.mark.parametrize("kill_after", [1, 12, 30, 45])
def test_kill_9_during_a_50_vm_apply_then_rerun_converges(kill_after, prefix, tmp_path):
    """SIGKILL the CLI after it printed N "changed:" lines (each side effect is slowed a little, half of it
    right after the domain is defined and before it is started, so kills land inside actions too).
    The rerun adopts what the killed run made (same UUIDs, never a second definition), finishes the rest
    and exits 0; a third run changes nothing; every domain carries the ownership marker."""
    daemon = new_private_libvirtd()
    try:
        uri = daemon.uri
        names = [f"{prefix}vm{i:02d}" for i in range(50)]
        m = write(tmp_path / "m" / "vms.yaml", *[vm(n) for n in names])
        p = slow_cli("apply", str(m), "--libvirt-uri", uri, delay=0.03)
        read_until(p, lambda ls: changed_lines(ls) >= kill_after)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        after_kill = domains(uri, prefix)
        assert kill_after <= len(after_kill) < 50, f"the kill landed after the run ({len(after_kill)} domains)"
        assert all(d["managed"] for d in after_kill.values()), "a half-made domain has no marker"

        again = cli("apply", str(m), "--libvirt-uri", uri)
        assert again.code == 0, again.out + again.err
        third = cli("apply", str(m), "--libvirt-uri", uri)
        assert third.code == 0 and "changed=0" in third.recap and "failed=0" in third.recap, third.out

        live = domains(uri, prefix)
        assert sorted(live) == names
        assert all(d["managed"] and d["active"] for d in live.values())
        assert {n: after_kill[n]["uuid"] for n in after_kill} == {n: live[n]["uuid"] for n in after_kill}, \
            "a domain made by the killed run was defined again"
        assert len({d["uuid"] for d in live.values()}) == 50
    finally:
        daemon.stop()


def test_kill_9_between_define_and_start_leaves_a_marked_domain_that_is_adopted(private_libvirtd, prefix, tmp_path):
    """The killed run defined a domain (with its marker: it is part of the definition) but never started
    it. The rerun adopts that very domain (same UUID) and starts it; nothing is defined twice."""
    uri = private_libvirtd.uri
    names = [f"{prefix}vm{i}" for i in range(3)]
    m = write(tmp_path / "m" / "vms.yaml", *[vm(n) for n in names])
    p = slow_cli("apply", str(m), "--libvirt-uri", uri, delay=0.0, define_delay=5.0)
    deadline = time.monotonic() + 30
    half = {}
    while time.monotonic() < deadline and not half:
        half = domains(uri, prefix)
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    # Creates run concurrently, so each of the first few may be caught between define and start.
    assert half and all(not d["active"] and d["managed"] for d in half.values()), half
    again = cli("apply", str(m), "--libvirt-uri", uri)
    assert again.code == 0, again.out + again.err
    for name in half:
        assert f"changed: [VirtualMachine/{name}] update" in again.out, again.out
    live = domains(uri, prefix)
    assert all(live[n]["uuid"] == half[n]["uuid"] for n in half) and all(d["active"] for d in live.values())
    assert cli("apply", str(m), "--libvirt-uri", uri).recap.startswith("ok=3 changed=0")
