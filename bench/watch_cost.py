"""What `reconciler watch` costs and how fast it reacts, over a fleet already applied (bench.py's
largest N): the watch's own CPU while nothing happens (from /proc/PID/stat over --idle seconds), then
drift made by hand, one at a time, and the time until the watch has corrected it:

  vm       a running VM suspended (libvirt API, as `virsh suspend`); corrected = running again,
           polled every 5 ms on the bench's own connection;
  retained a managed Topic's retained message overwritten (a QoS 1 retained publish, as
           `mosquitto_pub -r`); corrected = the declared payload arrives again on the bench's
           subscription to that topic;
  acl      a role's ACL removed (a dynsec removeRoleACL, as `mosquitto_ctrl`); corrected = the
           broker's response to the reconciler's modifyRole appears on `$CONTROL/dynamic-security/v1/response`.

Each time runs from the moment the drift is acknowledged (the API call returned, the PUBACK or the
dynsec response arrived) to the correction; a pause follows each so the next drift is not inside
the echo window of the last correction. Used by bench.py; alone:
    .venv/bin/python bench/watch_cost.py MANIFEST_DIR --reps 10 --idle 60   (needs the bench's env)
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAUSE = 2.5           # after each correction: past watch.SETTLE, and the watch idle again
TIMEOUT = 60.0        # a drift not corrected by then is reported as such (the interval is 10 min)


class WatchProc:
    def __init__(self, manifest_dir: Path, env: dict):
        self.p = subprocess.Popen([sys.executable, "-m", "reconciler", "watch", str(manifest_dir), "--interval", "10m",
                                   "--quiet", "--verbose"], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, pattern: str, count: int = 1, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for l in list(self.lines) if re.search(pattern, l)) >= count:
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"watch: no {pattern!r} within {timeout:.0f}s; last lines:\n" + "\n".join(self.lines[-15:]))

    def rounds_done(self) -> int:
        return sum(1 for l in list(self.lines) if re.search(r"round \d+ took", l))

    def idle(self, quiet: float = 2.0, timeout: float = 120.0) -> None:
        """Until no line came for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        n, since = len(self.lines), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if len(self.lines) != n:
                n, since = len(self.lines), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class BrokerProbe:
    """The bench's own MQTT session: makes MQTT drift and sees its correction."""

    def __init__(self, url: str, password: str):
        import paho.mqtt.client as mqtt
        from urllib.parse import urlsplit
        u = urlsplit(url)
        self.cond = threading.Condition()
        self.msgs: list[tuple[float, str, bytes, bool]] = []
        self.acks: dict[int, float] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set("admin", password)
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.connect(u.hostname, u.port, keepalive=30)
        self.c.loop_start()
        from paho.mqtt.subscribeoptions import SubscribeOptions
        self.c.subscribe("$CONTROL/dynamic-security/v1/response", options=SubscribeOptions(qos=0))
        time.sleep(0.5)

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            self.msgs.append((time.perf_counter(), msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def _on_publish(self, c, u, mid, rc, props) -> None:
        with self.cond:
            self.acks[mid] = time.perf_counter()
            self.cond.notify_all()

    def subscribe(self, topic: str) -> None:
        from paho.mqtt.subscribeoptions import SubscribeOptions
        self.c.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=2))
        time.sleep(0.3)

    def publish(self, topic: str, payload: str, retain: bool = False) -> float:
        """Publish at QoS 1; the time the PUBACK arrived."""
        with self.cond:
            info = self.c.publish(topic, payload, qos=1, retain=retain)
            mid = info.mid
        return self._until(lambda: self.acks.get(mid), 30, f"PUBACK of {topic}")

    def _until(self, get, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = get()
                if v is not None:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(what)
                self.cond.wait(left)

    def after(self, since: int, pred, timeout: float, what: str) -> float:
        """The arrival time of the first message (from index `since` on) that pred accepts."""
        def get():
            for t, topic, payload, retain in self.msgs[since:]:
                if pred(topic, payload, retain):
                    return t
            return None
        return self._until(get, timeout, what)

    def dynsec(self, command: dict) -> float:
        """Send one dynsec command; the time its own response arrived."""
        cid = uuid.uuid4().hex
        command = dict(command, correlationData=cid)
        mark = len(self.msgs)
        self.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": [command]}))
        return self.after(mark, lambda t, p, r: t.endswith("/response") and cid.encode() in p, 30, "dynsec response")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _stats(xs: list[float]) -> dict:
    return {"n": len(xs), "median_s": statistics.median(xs) if xs else None, "worst_s": max(xs) if xs else None,
            "runs_s": [round(x, 3) for x in xs]}


def measure(manifest_dir: Path, env: dict, conn, vm_names: list[str], topic: tuple[str, str] | None,
            role: tuple[str, dict] | None, reps: int = 10, idle_s: float = 60.0,
            broker: tuple[str, str] | None = None, say=print) -> dict:
    """Idle CPU and reaction times of a watch over manifest_dir (already applied)."""
    import libvirt
    w = WatchProc(manifest_dir, env)
    out: dict = {}
    probe = None
    try:
        w.wait(r"watching libvirt at .* for changes", timeout=120)
        if broker:
            w.wait(r"watching broker .* for changes", timeout=120)
        w.wait(r"round 1 took", timeout=900)
        w.idle()
        first = next((l for l in w.lines if "round 1 took" in l), "")
        out["first_round"] = first.split("took ")[-1]
        # Idle: nothing happens on the fleet (other users of the shared libvirtd may still send events).
        rounds, c0, t0 = w.rounds_done(), w.cpu_seconds(), time.monotonic()
        time.sleep(idle_s)
        cpu, wall = w.cpu_seconds() - c0, time.monotonic() - t0
        out["idle"] = {"seconds": round(wall, 1), "cpu_s": round(cpu, 3), "cpu_s_per_min": round(60 * cpu / wall, 3),
                       "core_pct": round(100 * cpu / wall, 3), "rounds_during": w.rounds_done() - rounds}
        say(f"  watch idle: {out['idle']['cpu_s_per_min']:.3f} CPU-s per minute = {out['idle']['core_pct']:.2f}% "
            f"of one core ({out['idle']['rounds_during']} rounds meanwhile)")
        vm_times: list[float] = []
        for i in range(reps):
            dom = conn.lookupByName(vm_names[i % len(vm_names)])
            dom.suspend()
            t0 = time.perf_counter()
            deadline = time.monotonic() + TIMEOUT
            while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"VM {dom.name()} not corrected within {TIMEOUT:.0f}s")
                time.sleep(0.005)
            vm_times.append(time.perf_counter() - t0)
            time.sleep(PAUSE)
            w.idle(1.0)
        out["vm_suspended"] = _stats(vm_times)
        say(f"  reaction, VM suspended: median {out['vm_suspended']['median_s']:.2f}s, worst {out['vm_suspended']['worst_s']:.2f}s")
        if broker and topic and role:
            probe = BrokerProbe(*broker)
            tname, declared = topic
            probe.subscribe(tname)
            ret_times: list[float] = []
            for i in range(reps):
                mark = len(probe.msgs)
                t0 = probe.publish(tname, json.dumps({"hand": i}), retain=True)
                t1 = probe.after(mark, lambda t, p, r: t == tname and r and _same_json(p, declared), TIMEOUT,
                                 "the retained message's correction")
                ret_times.append(t1 - t0)
                time.sleep(PAUSE)
                w.idle(1.0)
            out["retained_overwritten"] = _stats(ret_times)
            say(f"  reaction, retained message overwritten: median {out['retained_overwritten']['median_s']:.2f}s, "
                f"worst {out['retained_overwritten']['worst_s']:.2f}s")
            rname, acl = role
            acl_times: list[float] = []
            for i in range(reps):
                mark = len(probe.msgs)
                t0 = probe.dynsec({"command": "removeRoleACL", "rolename": rname, "acltype": acl["type"],
                                   "topic": acl["topic"]})
                # The reconciler sets a role's whole ACL list with modifyRole (addRoleACL would do too).
                t1 = probe.after(mark, lambda t, p, r: t.endswith("/response") and b'"error"' not in p
                                 and (b'"modifyRole"' in p or b'"addRoleACL"' in p), TIMEOUT, "the ACL's correction")
                acl_times.append(t1 - t0)
                time.sleep(PAUSE)
                w.idle(1.0)
            out["acl_removed"] = _stats(acl_times)
            say(f"  reaction, ACL removed: median {out['acl_removed']['median_s']:.2f}s, worst {out['acl_removed']['worst_s']:.2f}s")
        all_times = vm_times + out.get("retained_overwritten", {}).get("runs_s", []) + out.get("acl_removed", {}).get("runs_s", [])
        out["all"] = _stats(all_times)
    finally:
        if probe is not None:
            probe.close()
        w.stop()
    out["watch_tail"] = w.lines[-5:]
    return out


def _same_json(payload: bytes, declared) -> bool:
    try:
        return json.loads(payload) == declared
    except ValueError:
        return False
