"""`reconciler watch` reacts to events (contract section 11) on the real libvirtd and a real Mosquitto:
drift made by hand (a VM suspended or destroyed with virsh, a retained message overwritten with
mosquitto_pub -r, an ACL removed with mosquitto_ctrl) is corrected long before `--interval 10m`
would come; our own changes do not start rounds of their own (no loop); a lost events connection
(libvirtd drops our client, the broker restarts) is re-established and followed by a full pass; an
idle watch uses next to no CPU. Reaction times are measured by `make bench`, not asserted here:
the generous timeouts only prove the reaction is not the interval's."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, cli, doc, virsh, write
from mqtt_fixtures import mq  # noqa: F401  (mq is a fixture)

FIX = 10.0       # "corrected well within": the interval is 10 minutes


class Watch:
    """A `reconciler watch` process whose output is read as it comes."""

    def __init__(self, *args: str, env: dict | None = None, lock_dir=None):
        e = dict(os.environ)
        e.setdefault("RECONCILER_SCOPE", "tests")
        if lock_dir is not None:
            e["RECONCILER_LOCK_DIR"] = str(lock_dir)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-m", "reconciler", "watch", *args, "--interval", "10m",
                                   "--verbose"], cwd=str(ROOT), env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def rounds(self) -> list[str]:
        return [l for l in self.lines if re.match(r"watch: round \d+ at ", l)]

    def wait_line(self, pattern: str, timeout: float = 60.0, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for l in self.lines[after:]:
                if re.search(pattern, l):
                    return l
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.text}")

    def settled(self, quiet: float = 2.5, timeout: float = 60.0) -> None:
        """Wait until the last round finished and no line but ignored events (other sessions' objects
        on the shared libvirtd) came for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        def mine():
            return [l for l in self.lines if not l.endswith("(ignored)")]
        last, since = len(mine()), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            m = mine()
            if len(m) != last:
                last, since = len(m), time.monotonic()
            elif time.monotonic() - since >= quiet and (not m or re.search(r"round \d+ took|watching", m[-1])):
                return
        raise AssertionError(f"watch never settled:\n{self.text}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._t.join(timeout=5)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(pred, timeout: float = FIX, what: str = "condition") -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def vm(name: str) -> dict:
    return doc("VirtualMachine", name, {"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "description": "w"})


def apply_twice(path, *args, env=None):
    for i in range(2):
        r = cli("apply", str(path), *args, env=env)
        assert r.code == 0, r.out + r.err
    assert "changed=0" in r.recap, r.out


# --------------------------------------------------------------------------- libvirt

@pytest.mark.libvirt
def test_vm_drift_by_hand_is_corrected_at_once_and_own_changes_start_no_rounds(test_unix_uri, prefix, tmp_path):
    import libvirt
    names = [f"{prefix}a", f"{prefix}b"]
    m = write(tmp_path / "repo" / "vms.yaml", *(vm(n) for n in names))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    conn = libvirt.open(test_unix_uri)
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took")
        dom = conn.lookupByName(names[0])
        w.settled()
        before = len(w.rounds())

        dom.suspend()                                              # virsh suspend
        wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, what="the suspended VM to run again")
        w.settled()
        # One round for the hand change; our own resume (its "resumed" event) starts none.
        assert len(w.rounds()) == before + 1, w.text
        assert "suspended)" in w.rounds()[-1]
        assert re.search(rf"event from libvirt: VirtualMachine/{names[0]} resumed \(ignored\)", w.text), w.text

        virsh(test_unix_uri, "destroy", names[1])                   # stopped by hand
        d1 = conn.lookupByName(names[1])
        wait_for(lambda: d1.isActive() == 1, what="the destroyed VM to be started again")
        virsh(test_unix_uri, "destroy", names[1])
        virsh(test_unix_uri, "undefine", names[1])                   # deleted by hand
        wait_for(lambda: names[1] in [d.name() for d in conn.listAllDomains(0)] and
                 conn.lookupByName(names[1]).isActive() == 1, what="the undefined VM to be defined and started again")
        w.settled()
        n = len(w.rounds())
        time.sleep(3)
        assert len(w.rounds()) == n, "rounds kept coming without a change by hand:\n" + w.text
    finally:
        w.stop()
        conn.close()
    assert w.p.returncode == 0, w.text
    assert "Traceback" not in w.text
    apply_twice(m, "--libvirt-uri", test_unix_uri)


@pytest.mark.libvirt
def test_storage_pool_stopped_by_hand_is_started_again(test_unix_uri, prefix, tmp_path):
    """A storage pool lifecycle event (virsh pool-destroy) starts a round too."""
    import libvirt
    name = f"{prefix}pool"
    m = write(tmp_path / "repo" / "pool.yaml", doc("StoragePool", name, {"type": "dir", "path": str(tmp_path / "pd")}))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    conn = libvirt.open(test_unix_uri)
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took")
        w.settled()
        pool = conn.storagePoolLookupByName(name)
        assert pool.isActive()
        virsh(test_unix_uri, "pool-destroy", name)
        wait_for(lambda: pool.isActive() == 1, what="the stopped pool to be started again")
        assert re.search(rf"round \d+ at .*\(StoragePool/{name} stopped\)", w.text), w.text
    finally:
        w.stop()
        conn.close()
    assert w.p.returncode == 0 and "Traceback" not in w.text, w.text
    apply_twice(m, "--libvirt-uri", test_unix_uri)


@pytest.mark.libvirt
def test_two_watches_that_disagree_do_not_spin(test_unix_uri, prefix, tmp_path):
    """Two repositories declaring one VM running and paused: each watch's correction is the other's
    drift. After LOOP_LIMIT quick event rounds in a row each backs off (1 s, 2 s, 4 s ...) instead of
    fighting as fast as events come."""
    from reconciler.watch import LOOP_LIMIT
    name = f"{prefix}vm"
    spec = {"hypervisor": "test", "memory": "64MiB", "vcpus": 1}
    write(tmp_path / "a" / "vm.yaml", doc("VirtualMachine", name, dict(spec, state="running")))
    write(tmp_path / "b" / "vm.yaml", doc("VirtualMachine", name, dict(spec, state="paused")))
    a = Watch(str(tmp_path / "a"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    a.wait_line(r"round 1 took")
    b = Watch(str(tmp_path / "b"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    try:
        b.wait_line(r"round 1 took")
        start = time.monotonic()
        time.sleep(15)
        rounds = len(a.rounds()) + len(b.rounds())
        took = time.monotonic() - start
    finally:
        a.stop()
        b.stop()
    assert "events keep bringing changes" in a.text + b.text, a.text + b.text
    # Unchecked, each correction would start the other's round at once: dozens per second-pair.
    # With the backoff, each side runs LOOP_LIMIT quick rounds, then 1+2+4+8 s apart.
    assert rounds <= 2 * (LOOP_LIMIT + 6), f"{rounds} rounds in {took:.0f}s:\n" + a.text + b.text


@pytest.mark.libvirt
def test_undeclared_objects_start_no_round(test_unix_uri, prefix, tmp_path):
    """Another tool's VM on the same host is not ours: its events are ignored (no --prune)."""
    import libvirt
    write(tmp_path / "repo" / "vm.yaml", vm(f"{prefix}mine"))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    conn = libvirt.open(test_unix_uri)
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took")
        w.settled()
        before = len(w.rounds())
        other = conn.defineXML(f"<domain type='test'><name>{prefix}other</name><memory>65536</memory>"
                               "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
        other.create()
        other.suspend()
        w.wait_line(rf"VirtualMachine/{prefix}other suspended \(ignored\)")
        time.sleep(1)
        assert len(w.rounds()) == before, w.text
    finally:
        w.stop()
        conn.close()


@pytest.mark.libvirt
def test_lost_libvirt_connection_is_reopened_and_followed_by_a_full_pass(test_unix_uri, prefix, tmp_path):
    """libvirtd drops the watch's events connection (virt-admin client-disconnect, as a daemon
    restart would): the watch reconnects with backoff, runs a full pass, and reacts again."""
    import libvirt
    name = f"{prefix}vm"
    write(tmp_path / "repo" / "vm.yaml", vm(name))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    conn = libvirt.open(test_unix_uri)
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took")
        w.settled()
        mark = len(w.lines)
        dropped = _disconnect_clients_of(w.p.pid)
        assert dropped, "the watch holds no libvirtd client connection while idle?"
        w.wait_line(r"libvirt at .*: events connection lost", after=mark)
        w.wait_line(r"libvirt at .*: events connection re-established; running a full pass", after=mark, timeout=30)
        w.wait_line(r"round \d+ at .*\(libvirt at .* reconnected\)", after=mark)
        w.settled()
        dom = conn.lookupByName(name)
        dom.suspend()
        wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, what="a correction after the reconnect")
    finally:
        w.stop()
        conn.close()
    assert w.p.returncode == 0 and "Traceback" not in w.text, w.text


@pytest.mark.libvirt
def test_memory_changed_with_virsh_on_qemu_is_corrected_at_once(qemu_uri, prefix, tmp_path):
    """libvirt sends no event for `virsh setmem` / `setvcpus` (probed: libvirt 9.0, QEMU 7.2); on a
    local qemu:///system the definition file libvirt rewrites tells the watch instead."""
    name = f"{prefix}vm"
    m = write(tmp_path / "repo" / "vm.yaml", doc("VirtualMachine", name, {
        "hypervisor": "qemu", "memory": "128MiB", "maxMemory": "256MiB", "vcpus": 1, "maxVcpus": 2,
        "state": "shutoff", "graphics": "none"}))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", qemu_uri, lock_dir=tmp_path / "locks")
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took", timeout=120)
        w.settled()
        mem = lambda: virsh(qemu_uri, "dominfo", name).split("Used memory:")[1].split()[0]  # noqa: E731
        assert mem() == str(128 * 1024)
        before = len(w.rounds())
        virsh(qemu_uri, "setmem", name, "100000", "--config")
        wait_for(lambda: mem() == str(128 * 1024), what="the memory set by hand to be set back")
        w.settled()
        assert len(w.rounds()) == before + 1, w.text
        assert f"VirtualMachine/{name} definition file changed)" in w.rounds()[-1]
        virsh(qemu_uri, "setvcpus", name, "2", "--config")
        wait_for(lambda: virsh(qemu_uri, "vcpucount", name, "--config", "--current").strip() == "1",
                 what="the vCPUs set by hand to be set back")
    finally:
        w.stop()
    assert w.p.returncode == 0 and "Traceback" not in w.text, w.text
    apply_twice(m, "--libvirt-uri", qemu_uri)


def _disconnect_clients_of(pid: int) -> list[str]:
    out = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True,
                         check=True).stdout
    dropped = []
    for cid in re.findall(r"^\s*(\d+)\s+unix", out, re.M):
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", cid], capture_output=True, text=True).stdout
        if re.search(rf"unix_process_id\s*:\s*{pid}\b", info):
            subprocess.run(["virt-admin", "client-disconnect", "libvirtd", cid], capture_output=True, check=True)
            dropped.append(cid)
    return dropped


@pytest.mark.libvirt
def test_idle_watch_uses_next_to_no_cpu(test_unix_uri, prefix, tmp_path):
    """50 VMs, 10 s with nothing happening: well under 1% of one core (the bench measures 1,000)."""
    m = write(tmp_path / "repo" / "vms.yaml", *(vm(f"{prefix}{i:02d}") for i in range(50)))
    w = Watch(str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, lock_dir=tmp_path / "locks")
    try:
        w.wait_line(r"watching libvirt at .* for changes")
        w.wait_line(r"round 1 took", timeout=120)
        w.settled()
        rounds = len(w.rounds())
        c0, t0 = w.cpu_seconds(), time.monotonic()
        time.sleep(10)
        used = (w.cpu_seconds() - c0) / (time.monotonic() - t0)
    finally:
        w.stop()
    if len(w.rounds()) == rounds:      # nothing happened in between: the figure is the idle cost
        assert used < 0.01, f"idle watch used {used:.2%} of a core"
    else:
        pytest.fail("rounds ran while the watch should have been idle:\n" + w.text)
    apply_twice(m, "--libvirt-uri", test_unix_uri)


# --------------------------------------------------------------------------- broker

def _edge(m, prefix: str):
    return write(m.tmp / "m" / "edge.yaml",
                 doc("MqttRole", f"{prefix}pub", {"acls": [{"type": "publishClientSend", "topic": f"{prefix}/data/#"}]}),
                 doc("Topic", f"{prefix}/config", {"retained": {"json": {"interval": 30}}}))


def _retained(m, topic: str) -> str | None:
    p = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(m.port), "-u", "admin", "-P",
                        m.broker.password, "-t", topic, "-C", "1", "-W", "2", "--retained-only"],
                       capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def _json(m, topic: str):
    text = _retained(m, topic)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def test_broker_drift_by_hand_is_corrected_at_once(mq, tmp_path):
    prefix = "wev"
    path = _edge(mq, prefix)
    w = Watch(str(path.parent), "--libvirt-uri", "test:///default", env=mq.env(), lock_dir=tmp_path / "locks")
    try:
        w.wait_line(r"watching broker mqtt://.* for changes")
        w.wait_line(r"round 1 took")
        w.settled()
        assert _json(mq, f"{prefix}/config") == {"interval": 30}

        before = len(w.rounds())
        mq.pub(f"{prefix}/config", '{"interval": 1}')                 # mosquitto_pub -r
        wait_for(lambda: _json(mq, f"{prefix}/config") == {"interval": 30},
                 what="the retained message to be published again")
        w.settled()
        assert len(w.rounds()) == before + 1, w.text         # our own publish starts no round
        assert f"Topic/{prefix}/config retained message published)" in w.rounds()[-1]

        before = len(w.rounds())
        mq.ctrl("removeRoleACL", f"{prefix}pub", "publishClientSend", f"{prefix}/data/#")   # mosquitto_ctrl
        wait_for(lambda: f"{prefix}/data/#" in mq.ctrl("getRole", f"{prefix}pub"),
                 what="the removed ACL to be added again")
        w.settled()
        assert len(w.rounds()) == before + 1, w.text
        assert "dynamic security: removeRoleACL" in w.rounds()[-1]
        # Reads (listRoles ... of our own rounds and of others) are not changes.
        n = len(w.rounds())
        assert mq.run("plan", str(path)).code == 0
        time.sleep(2)
        assert len(w.rounds()) == n, w.text
    finally:
        w.stop()
    assert w.p.returncode == 0 and "Traceback" not in w.text, w.text
    mq.apply_twice(path)


def test_broker_restart_is_followed_by_reconnect_and_a_full_pass(mq, tmp_path):
    import devbroker
    prefix = "wrc"
    path = _edge(mq, prefix)
    w = Watch(str(path.parent), "--libvirt-uri", "test:///default", env=mq.env(), lock_dir=tmp_path / "locks")
    try:
        w.wait_line(r"watching broker mqtt://.* for changes")
        w.wait_line(r"round 1 took")
        w.settled()
        mark = len(w.lines)
        mq.broker.stop()
        w.wait_line(r"broker .*: events connection lost", after=mark)
        mq.broker = devbroker.start(mq.broker.dir, mq.port, die_with_parent=True)
        w.wait_line(r"broker .*: events connection re-established; running a full pass", after=mark, timeout=60)
        w.wait_line(r"round \d+ at .*\(broker .* reconnected\)", after=mark)
        w.settled()
        mq.pub(f"{prefix}/config", '{"interval": 2}')
        wait_for(lambda: _json(mq, f"{prefix}/config") == {"interval": 30},
                 what="a correction after the reconnect")
    finally:
        w.stop()
    assert w.p.returncode == 0 and "Traceback" not in w.text, w.text


# --------------------------------------------------------------------------- pure parts

def test_dynsec_responses_that_are_changes():
    from reconciler.providers.mosquitto.events import changes
    assert changes(b'{"responses":[{"command":"listRoles","data":{"roles":[]}}]}') == []
    assert changes(b'{"responses":[{"command":"removeRoleACL"}]}') == ["removeRoleACL"]
    assert changes(b'{"responses":[{"command":"createRole","error":"Role already exists"}]}') == []
    assert changes(b'{"responses":[{"command":"getRole"},{"command":"setClientPassword","correlationData":"x"}]}') \
        == ["setClientPassword"]
    assert changes(b"not json") == []


def test_echo_of_own_changes_and_relevance():
    from reconciler.model import Action, Plan, Resource, ResourceId, Result
    from reconciler.outcome import Outcome
    from reconciler.watch import SETTLE, Event, _Relevance
    vm_a = Resource(ResourceId("VirtualMachine", "a"), {})
    vm_b = Resource(ResourceId("VirtualMachine", "b"), {})
    topic = Resource(ResourceId("Topic", "t/1"), {})
    act = Action("update", vm_a.id, "state", desired=vm_a)
    plan = Plan((act, Action("noop", vm_b.id, "", desired=vm_b), Action("noop", topic.id, "", desired=topic)))
    rel = _Relevance(prune=False)
    rel.learn(Outcome(True, plan, (Result(act, "applied"),)), ended=100.0)
    ev = lambda at, kind, name: Event(at, "libvirt", kind, name, "x")  # noqa: E731
    assert not rel.keeps(ev(100.5, "VirtualMachine", "a"))                 # our own resume, echoed
    assert rel.keeps(ev(100.0 + SETTLE + 0.1, "VirtualMachine", "a"))     # later: drift by hand
    stopped = Event(100.5, "libvirt", "VirtualMachine", "a", "stopped")
    assert rel.keeps(stopped)                 # inside the window, but we left it running: by hand
    assert not rel.keeps(Event(99.9, "libvirt", "VirtualMachine", "a", "stopped"))   # during the round: ours
    assert rel.keeps(ev(100.5, "VirtualMachine", "b")) == "declared"      # untouched object
    assert not rel.keeps(ev(100.5, "VirtualMachine", "someone-elses"))    # undeclared, no prune
    dynsec = lambda at: Event(at, "mqtt", None, None, "dynamic security: createRole")  # noqa: E731
    assert rel.keeps(dynsec(100.5)) == "declared"          # a Topic is declared; this round changed no MQTT
    assert rel.keeps(Event(100.5, "libvirt", None, None, "reconnected", resync=True))
    pub = Action("update", topic.id, "payload", desired=topic)
    rel.learn(Outcome(True, plan, (Result(pub, "applied"),)), ended=200.0)
    assert not rel.keeps(dynsec(200.5))                     # the round changed the broker: its own echo
    assert not rel.keeps(Event(200.5, "mqtt", "Topic", "t/1", "retained message published"))
    assert rel.keeps(dynsec(200.0 + SETTLE + 0.1))
    pruning = _Relevance(prune=True)
    pruning.learn(Outcome(True, plan, ()), ended=100.0)
    assert pruning.keeps(ev(100.5, "VirtualMachine", "someone-elses")) == "undeclared"


def test_inotify_records_name_definitions():
    import struct
    from reconciler.providers.libvirt.events import _parse
    def rec(wd, name):
        raw = name.encode() + b"\0" * (16 - len(name) % 16)
        return struct.pack("iIII", wd, 0x80, 0, len(raw)) + raw
    data = rec(1, "vm1.xml") + rec(1, "vm1.xml.new") + rec(2, "net0.xml") + rec(9, "x.xml")
    assert list(_parse(data, {1: "/etc/libvirt/qemu", 2: "/etc/libvirt/qemu/networks"})) == \
        [("VirtualMachine", "vm1"), ("Network", "net0")]
