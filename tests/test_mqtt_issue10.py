"""Issue 10, the broker points, each on a real Mosquitto 2.0.11 with dynamic security: a password changed
by hand is drift (found by a throwaway login that disturbs no connected device), memberships that a
hand-deleted role cannot turn into a dangling pointer, the retained sweep on a broker left at its
defaults, and objects that vanish during a read. Every apply is repeated and must change nothing."""
from __future__ import annotations

import os
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
import pytest

from helpers import doc, write
from mqtt_fixtures import Mqtt, login, mq, start_broker, write_edge  # noqa: F401  (mq is a fixture)

pytestmark = pytest.mark.mqtt

READER_PW = "reader-pass-1"


class Device:
    """A device that stays connected (a fixed or random client id) and records every disconnect."""

    def __init__(self, port: int, username: str, password: str, client_id: str):
        self.cond = threading.Condition()
        self.connects = 0
        self.disconnects: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(username, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.reconnect_delay_set(60, 60)     # a kick stays visible: no reconnect during the test
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        end = time.monotonic() + 15
        with self.cond:
            while self.connects == 0 and time.monotonic() < end:
                self.cond.wait(0.5)

    def _on_connect(self, c, u, flags, rc, props):
        with self.cond:
            if not rc.is_failure:
                self.connects += 1
            self.cond.notify_all()

    def _on_disconnect(self, c, u, flags, rc, props):
        with self.cond:
            self.disconnects.append(str(rc))
            self.cond.notify_all()

    @property
    def undisturbed(self) -> bool:
        return self.connects == 1 and not self.disconnects and self.c.is_connected()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def broker_alive(m: Mqtt) -> bool:
    try:
        os.kill(m.broker.pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{m.broker.pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def logins_in_log(m: Mqtt, username: str) -> int:
    log = (m.broker.dir / "mosquitto.log").read_text(errors="replace")
    return log.count(f"u'{username}')")


# --------------------------------------------------------------------------- 1. password changed by hand

def test_password_changed_by_hand_is_drift_and_is_set_again(mq):
    path = write_edge(mq)
    env = {"READER_PW": mq.secret(READER_PW)}
    mq.apply_twice(path, env=env)
    # The dashboard is connected with a random client id while plans test its password.
    dash = Device(mq.port, "dashboard", READER_PW, "dash-device-1")
    try:
        assert dash.connects == 1
        mq.ctrl("setClientPassword", "sensor-01", mq.secret("changed-by-hand-77"))
        plan = mq.run("plan", str(path), "--diff", env=env)
        assert plan.code == 2, plan.out + plan.err
        assert "[MqttClient/sensor-01] would update: password changed on the broker" in plan.out
        assert "spec.password: (secret, changed)" in plan.out
        js = mq.run("plan", str(path), "-o", "json", env=env).json
        assert [(c["kind"], c["name"], c["fields"]) for c in js["changes"]] == \
            [("MqttClient", "sensor-01", ["spec.password"])]
        # The dashboard's own password was tested by a login too, and it was never disconnected.
        assert dash.undisturbed, dash.disconnects
        old = login(mq.port, "sensor-01", "sensor-pass-1")
        assert not old.connected
        old.close()

        mq.apply_twice(path, env=env)
        sensor = login(mq.port, "sensor-01", "sensor-pass-1")
        assert sensor.connected
        sensor.close()
        assert dash.undisturbed, dash.disconnects
    finally:
        dash.close()


def test_fixed_client_id_is_never_disturbed(mq):
    """dynsec checks a fixed clientId before the password: a login with another id is refused even with
    the right password, so it tells nothing; a login with the device's id would take its session over.
    So such a client is not tested by a login, and its connected device stays connected."""
    pw = mq.tmp / "pw"
    pw.write_text(mq.secret("fixed-pass-1"))
    path = write(mq.tmp / "m" / "c.yaml", doc("MqttClient", "gw-7", {"password": {"fromFile": str(pw)},
                                                                     "clientId": "gw-7-device"}))
    mq.apply_twice(path)
    device = Device(mq.port, "gw-7", "fixed-pass-1", "gw-7-device")
    try:
        assert device.connects == 1
        # The broker's own behaviour, which the design relies on: right password, other client id: refused.
        other = login(mq.port, "gw-7", "fixed-pass-1")
        assert not other.connected and int(other.connack.value) == 135
        other.close()
        before = logins_in_log(mq, "gw-7")
        plan = mq.run("plan", str(path), "-o", "json", "--verbose")
        assert plan.code == 0 and plan.json["changes"] == [], plan.out + plan.err
        assert logins_in_log(mq, "gw-7") == before, "the plan logged in as a fixed-clientId client"
        assert device.undisturbed, device.disconnects
        text = mq.run("plan", str(path), "--verbose")
        assert "password not tested by a login: it has a fixed clientId" in text.out, text.out
    finally:
        device.close()


def test_password_changed_by_hand_is_found_over_mqtts(tmp_path):
    """The test logins go over the admin session's URL, TLS and CA (a remote broker's set-up)."""
    import subprocess
    certs = tmp_path / "certs"
    certs.mkdir()

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", "ca.key", "-out", "ca.crt")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (certs / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-out", "server.crt", "-extfile", "ext.cnf")
    import devbroker
    tls_port = devbroker.free_port()
    b = start_broker(tmp_path / "broker", tls={"port": tls_port, "certfile": str(certs / "server.crt"),
                                                "keyfile": str(certs / "server.key")})
    m = Mqtt(b, tmp_path)
    try:
        tls = ("--mqtt-url", f"mqtts://localhost:{tls_port}", "--mqtt-cafile", str(certs / "ca.crt"))
        pws = {}
        docs = []
        for i in range(5):
            pws[i] = m.secret(f"tls-pass-{i}-x")
            (tmp_path / f"pw{i}").write_text(pws[i])
            docs.append(doc("MqttClient", f"tls-dev-{i}", {"password": {"fromFile": str(tmp_path / f"pw{i}")}}))
        path = write(tmp_path / "m" / "c.yaml", *docs)
        m.apply_twice(path, *tls)
        m.ctrl("setClientPassword", "tls-dev-3", m.secret("by-hand-3"))
        js = m.run("plan", str(path), *tls, "-o", "json").json
        assert [(c["name"], c["fields"]) for c in js["changes"]] == [("tls-dev-3", ["spec.password"])]
        m.apply_twice(path, *tls)
        device = login(b.port, "tls-dev-3", pws[3])
        assert device.connected
        device.close()
        # One connection read twice (watch keeps its provider): the second round's logins resume the
        # first round's TLS session in the same context.
        from reconciler.manifests import load
        from reconciler.providers.mosquitto import MosquittoProvider
        p = MosquittoProvider(f"mqtts://localhost:{tls_port}", "admin", b.password, str(certs / "ca.crt"))
        try:
            for _ in range(2):
                snap = p.read(frozenset({"MqttClient"}), load([str(path)]))
                assert sorted(l.facts.get("login") for rid, l in snap.objects.items()
                              if rid.name.startswith("tls-dev-")) == ["accepted"] * 5
        finally:
            p.close()
        m.assert_no_secret_leaked()
    finally:
        b.stop()


def test_listener_that_uses_user_names_as_client_ids_gets_no_test_login(tmp_path):
    """With `use_username_as_clientid true` every login as a device's user gets the device's client id,
    so a test login would disconnect the device: the admin session sees it (the client id the broker
    assigns it is its user name) and no test login is made."""
    b = start_broker(tmp_path / "broker", listener_options=("use_username_as_clientid true",))
    m = Mqtt(b, tmp_path)
    try:
        path = write_edge(m)
        env = {"READER_PW": m.secret(READER_PW)}
        m.apply_twice(path, env=env)
        dash = Device(b.port, "dashboard", READER_PW, "whatever-id")
        try:
            assert dash.connects == 1
            before = logins_in_log(m, "dashboard")
            plan = m.run("plan", str(path), env=env)
            assert plan.code == 0, plan.out + plan.err
            assert "password not tested by a login: the broker's listener uses user names as client ids" in plan.out
            assert logins_in_log(m, "dashboard") == before
            assert dash.undisturbed, dash.disconnects
        finally:
            dash.close()
        m.assert_no_secret_leaked()
    finally:
        b.stop()


def test_no_op_plan_tests_each_password_once_and_cheaply(mq):
    """The cost of the test logins: one short connection per client (clients without a fixed id)."""
    n = 60
    secrets_dir = mq.tmp / "pw"
    secrets_dir.mkdir()
    docs = []
    for i in range(n):
        f = secrets_dir / f"c{i}"
        f.write_text(mq.secret(f"pass-{i}-x"))
        docs.append(doc("MqttClient", f"dev-{i:03d}", {"password": {"fromFile": str(f)}}))
    path = write(mq.tmp / "m" / "many.yaml", *docs)
    mq.apply_twice(path)
    before = sum(logins_in_log(mq, f"dev-{i:03d}") for i in range(n))
    started = time.monotonic()
    plan = mq.run("plan", str(path), "-o", "json")
    took = time.monotonic() - started
    assert plan.code == 0 and plan.json["changes"] == [], plan.out + plan.err
    assert sum(logins_in_log(mq, f"dev-{i:03d}") for i in range(n)) - before == n
    # Generous: the whole plan (process start, read, 60 logins) on a loaded 2-core machine.
    assert took < 30, took
    # One hand-changed password among them is found, and only that one.
    mq.ctrl("setClientPassword", "dev-017", mq.secret("other-pass"))
    js = mq.run("plan", str(path), "-o", "json").json
    assert [(c["name"], c["fields"]) for c in js["changes"]] == [("dev-017", ["spec.password"])]
    mq.apply_twice(path)


# --------------------------------------------------------------------------- 2. hand-deleted role

def test_hand_deleted_role_leaves_the_broker_alive(mq):
    """Mosquitto 2.0.11 keeps a role given inside createClient (and createGroup/modifyGroup) without
    telling the role: deleting the role by hand leaves a dangling entry that the next verbose list
    reads (a crash, or a garbage role name). Memberships made with add*Role are removed with the role."""
    pw = mq.tmp / "pw"
    pw.write_text(mq.secret("role-pass-1"))
    docs = [doc("MqttRole", f"r{i}", {"acls": [{"type": "publishClientSend", "topic": f"x/{i}"}]}) for i in range(3)]
    docs += [doc("MqttGroup", "g1", {"roles": [{"name": "r1"}, {"name": "r2", "priority": 3}]}),
             doc("MqttClient", "c1", {"password": {"fromFile": str(pw)}, "roles": [{"name": "r0"}, {"name": "r2"}],
                                      "groups": [{"name": "g1"}]})]
    path = write(mq.tmp / "m" / "roles.yaml", *docs)
    mq.apply_twice(path)
    for round in range(3):
        for role in ("r0", "r1", "r2"):
            mq.ctrl("deleteRole", role)
        # The memberships went with the roles: no dangling entry in the verbose lists.
        client = mq.ctrl("getClient", "c1")
        group = mq.ctrl("getGroup", "g1")
        assert "Roles:" not in client or client.split("Roles:")[1].split("\n")[0].strip() == "", client
        assert "r1" not in group and "r2" not in group, group
        plan = mq.run("plan", str(path), "-o", "json")
        assert plan.code == 2, plan.out + plan.err
        assert broker_alive(mq)
        mq.apply_twice(path)
        assert broker_alive(mq)
    client = mq.ctrl("getClient", "c1")
    assert "r0" in client and "r2" in client
    assert mq.run("plan", str(path)).code == 0


# --------------------------------------------------------------------------- 3. a broker at its defaults

def test_sweep_on_a_default_broker_with_2000_topics(tmp_path):
    b = start_broker(tmp_path / "broker", max_queued_messages=None)
    m = Mqtt(b, tmp_path)
    try:
        conf = (b.dir / "mosquitto.conf").read_text()
        assert "max_queued_messages" not in conf      # Mosquitto's default: 1000
        topics = [f"fleet/{i // 100}/dev{i}/config" for i in range(2000)]
        path = write(tmp_path / "m" / "t.yaml",
                     *[doc("Topic", t, {"retained": {"payload": f"cfg-{i}"}}) for i, t in enumerate(topics)])
        first = m.run("apply", str(path), timeout=600)
        assert first.code == 0 and "changed=2000" in first.recap, first.out[-2000:] + first.err
        # A subscriber counts what the next runs publish: nothing. (It takes no retained burst: a
        # session that keeps Mosquitto's Receive Maximum, as this paho client does, gets 20 in flight +
        # 1000 queued = 1020 of the 2000 and loses the rest; the reconciler's session raises it.)
        watcher = login(b.port, "admin", b.password)
        try:
            rc, mid = watcher.c.subscribe("fleet/#", options=SubscribeOptions(qos=1, retainHandling=2))
            assert watcher._wait(lambda: watcher.subacks.get(mid)) is not None
            second = m.run("apply", str(path), timeout=600)
            assert second.code == 0 and "changed=0" in second.recap and "ok=2000" in second.recap, second.out[-2000:]
            plan = m.run("plan", str(path), "-o", "json", timeout=600)
            assert plan.code == 0 and plan.json["changes"] == []
            assert plan.json["summary"]["unchanged"] == 2000
            time.sleep(1)
            assert watcher.messages == [], f"{len(watcher.messages)} messages re-published"
        finally:
            watcher.close()
        m.assert_no_secret_leaked()
    finally:
        b.stop()


def test_declared_topic_missing_from_the_burst_is_asked_for_by_name(mq):
    """The read asks by name for each declared topic the `#` burst did not bring (what a full session
    queue drops): a topic really without a retained message is still read as missing."""
    from reconciler.providers.mosquitto import MosquittoProvider
    from reconciler.manifests import load
    path = write(mq.tmp / "m" / "t.yaml", doc("Topic", "a/b", {"retained": {"payload": "1"}}),
                 doc("Topic", "a/c", {"retained": {"payload": "2"}}))
    mq.apply_twice(path)
    mq.pub("a/c", "", retain=True)          # cleared by hand: really missing
    p = MosquittoProvider(mq.url, "admin", mq.broker.password)
    try:
        declared = load([str(path)])
        conn = p._c()
        seen = {}
        real_sweep = conn.sweep
        # The burst is cut short here as a full queue would cut it; the names are then asked for.
        conn.sweep = lambda f="#", timeout=30.0: {} if f == "#" else real_sweep(f, timeout)
        snap = p.read(frozenset({"Topic"}), declared)
        seen = {rid.name for rid in snap.objects}
        assert seen == {"a/b"}
    finally:
        p.close()


# --------------------------------------------------------------------------- 4. vanishing objects

def test_client_deleted_during_the_read_is_read_as_gone(mq):
    """Listed, then gone before its password is tested: read as gone (the plan creates it), never an
    aborted read. The interleaving is made real: the client is deleted on the broker between the list
    and the test logins."""
    from reconciler.model import ResourceId
    from reconciler.manifests import load
    from reconciler.providers.mosquitto import MosquittoProvider
    path = write_edge(mq)
    env = {"READER_PW": mq.secret(READER_PW)}
    mq.apply_twice(path, env=env)
    os.environ["READER_PW"] = READER_PW
    try:
        resources = load([str(path)])
    finally:
        del os.environ["READER_PW"]

    class Racing(MosquittoProvider):
        def _test_passwords(self, conn, objects, passwords):
            mq.ctrl("deleteClient", "dashboard")
            return super()._test_passwords(conn, objects, passwords)

    p = Racing(mq.url, "admin", mq.broker.password)
    try:
        snap = p.read(frozenset({"MqttRole", "MqttGroup", "MqttClient", "Topic"}), resources)
        assert ResourceId("MqttClient", "dashboard") not in snap.objects
        assert snap.objects[ResourceId("MqttClient", "sensor-01")].facts.get("login") == "accepted"
    finally:
        p.close()
    plan = mq.run("plan", str(path), "-o", "json", env=env)
    assert plan.code == 2 and [(c["action"], c["name"]) for c in plan.json["changes"]] == [("create", "dashboard")]
    mq.apply_twice(path, env=env)


def test_plans_succeed_while_another_tool_churns_the_broker(mq):
    """Another admin creates and deletes clients, roles, groups and retained messages as fast as it can
    while plans run: no plan fails, the broker stays up."""
    path = write_edge(mq)
    env = {"READER_PW": mq.secret(READER_PW)}
    mq.apply_twice(path, env=env)
    stop = threading.Event()
    churned = [0]

    def churn():
        admin = login(mq.port, "admin", mq.broker.password)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                cmds = [{"command": "createRole", "rolename": f"tmp-r{i}"},
                        {"command": "createGroup", "groupname": f"tmp-g{i}"},
                        {"command": "createClient", "username": f"tmp-c{i}", "password": "x"},
                        {"command": "addClientRole", "username": f"tmp-c{i}", "rolename": f"tmp-r{i}"},
                        {"command": "addGroupRole", "groupname": f"tmp-g{i}", "rolename": f"tmp-r{i}"}]
                admin.publish("$CONTROL/dynamic-security/v1", __import__("json").dumps({"commands": cmds}))
                admin.publish(f"tmp/{i}", "v", retain=True)
                time.sleep(0.01)
                cmds = [{"command": "deleteClient", "username": f"tmp-c{i}"},
                        {"command": "deleteGroup", "groupname": f"tmp-g{i}"},
                        {"command": "deleteRole", "rolename": f"tmp-r{i}"}]
                admin.publish("$CONTROL/dynamic-security/v1", __import__("json").dumps({"commands": cmds}))
                admin.publish(f"tmp/{i}", "", retain=True)
                churned[0] = i
        finally:
            admin.close()

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(8):
            plan = mq.run("plan", str(path), "-o", "json", env=env)
            assert plan.code == 0 and plan.json["changes"] == [], plan.out + plan.err
    finally:
        stop.set()
        t.join(30)
    assert churned[0] > 10 and broker_alive(mq)
