"""End to end against a real Mosquitto 2 with dynamic security: the CLI is run as a user runs it, and
real paho clients prove what the broker enforces. Every apply is repeated and must change nothing;
every output of every test is scanned for the secrets it used."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from helpers import doc, write
from mqtt_fixtures import login, mq, start_broker, write_edge  # noqa: F401  (mq is a fixture)

pytestmark = pytest.mark.mqtt

READER_PW = "reader-pass-1"


def reader_env(m, value=READER_PW):
    return {"READER_PW": m.secret(value)}


def test_edge_setup_is_enforced_by_the_broker(mq):
    path = write_edge(mq)
    first = mq.apply_twice(path, env=reader_env(mq))
    assert "changed=6" in first.recap

    sensor = login(mq.port, "sensor-01", "sensor-pass-1")
    dash = login(mq.port, "dashboard", READER_PW)
    try:
        assert sensor.connected and dash.connected
        # The retained config is there for an allowed subscriber, marked as ours.
        assert dash.subscribe("edge/gw-1/config") < 128
        cfg = dash.received("edge/gw-1/config")
        assert cfg is not None and cfg.payload == b'{"interval":30}' and cfg.retain
        assert ("managed-by", "reconciler") in cfg.properties.UserProperty
        # Allowed publish is delivered; denied is refused with 135 and never delivered.
        assert dash.subscribe("edge/+/data") < 128
        assert sensor.publish("edge/gw-1/data", "21.5") < 128
        assert dash.received("edge/gw-1/data") is not None
        assert sensor.publish("plant/gw-1/data", "x") == 135
        assert dash.publish("edge/gw-1/data", "forged") == 135
        # The sensor may not subscribe (its role has no subscribe ACL): 135 in the SUBACK.
        assert sensor.subscribe("edge/#") >= 128
    finally:
        sensor.close()
        dash.close()
    # A wrong password is refused.
    bad = login(mq.port, "sensor-01", "nope")
    assert not bad.connected
    bad.close()


def test_plan_diff_and_json_show_acl_and_membership_fields(mq):
    path = write_edge(mq)
    plan = mq.run("plan", str(path), "--diff", env=reader_env(mq))
    assert plan.code == 2, plan.out + plan.err
    # A create's diff shows what is created: the ACLs the Topic gives, memberships, never a password.
    sensors = plan.out.split("[MqttRole/sensors]")[1].split("changed:")[0]
    assert '"topic": "edge/gw-1/config", "type": "publishClientSend"' in sensors
    assert '"topic": "edge/gw-1/config", "type": "subscribeLiteral"' in plan.out.split("[MqttRole/readers]")[1]
    assert '+ spec.groups: [{"name": "field-devices", "priority": -1}]' in plan.out
    assert "+ spec.password: (secret)" in plan.out
    js = mq.run("plan", str(path), "-o", "json", env=reader_env(mq)).json
    kinds = [(c["action"], c["kind"], c["name"]) for c in js["changes"]]
    # roles -> groups -> clients -> topics
    assert kinds == [("create", "MqttRole", "readers"), ("create", "MqttRole", "sensors"),
                     ("create", "MqttGroup", "field-devices"), ("create", "MqttClient", "dashboard"),
                     ("create", "MqttClient", "sensor-01"), ("create", "Topic", "edge/gw-1/config")]
    assert js["summary"]["create"] == 6


def test_drift_made_by_hand_is_detected_and_repaired(mq):
    path = write_edge(mq)
    env = reader_env(mq)
    mq.apply_twice(path, env=env)
    mq.ctrl("removeRoleACL", "sensors", "publishClientSend", "edge/+/data")
    mq.ctrl("removeClientRole", "dashboard", "readers")
    mq.ctrl("removeGroupRole", "field-devices", "sensors")
    mq.pub("edge/gw-1/config", '{"interval": 5}')

    plan = mq.run("plan", str(path), "--diff", env=env)
    assert plan.code == 2, plan.out + plan.err
    assert "spec.acls[publishClientSend edge/+/data]: (none) -> {\"allow\": true, \"priority\": 0}" in plan.out
    assert "spec.roles[readers]: (none) -> {\"priority\": -1}" in plan.out
    assert "spec.roles[sensors]: (none) -> {\"priority\": 0}" in plan.out
    # The overwritten message lost our marker: naming it adopts it back.
    assert "metadata.managed: false -> true" in plan.out
    assert 'spec.retained.payload: {"interval": 5} -> {"interval":30}' in plan.out
    js = mq.run("plan", str(path), "-o", "json", env=env).json
    changed = {(c["kind"], c["name"]): c["fields"] for c in js["changes"]}
    assert set(changed) == {("MqttRole", "sensors"), ("MqttClient", "dashboard"), ("MqttGroup", "field-devices"),
                            ("Topic", "edge/gw-1/config")}
    assert changed[("MqttRole", "sensors")] == ["spec.acls[publishClientSend edge/+/data]"]

    mq.apply_twice(path, env=env)
    sensor, dash = login(mq.port, "sensor-01", "sensor-pass-1"), login(mq.port, "dashboard", READER_PW)
    try:
        assert dash.subscribe("edge/gw-1/config") < 128
        assert dash.received("edge/gw-1/config").payload == b'{"interval":30}'
        assert sensor.publish("edge/gw-1/data", "1") < 128
    finally:
        sensor.close()
        dash.close()


def test_json_payload_spacing_is_not_drift(mq):
    path = write(mq.tmp / "m" / "t.yaml", doc("Topic", "edge/gw-2/config", {"retained": {"json": {"a": 1, "b": [1, 2]}}}))
    mq.apply_twice(path)
    # A device republishes the same JSON with other spacing, keeping nothing of ours: only adoption.
    mq.pub("edge/gw-2/config", '{ "a" : 1, "b": [1,2] }')
    js = mq.run("plan", str(path), "-o", "json").json
    assert js["changes"][0]["fields"] == ["metadata.managed"]


def test_password_rotation_applies_once(mq):
    path = write_edge(mq, "sensor-pass-1")
    env = reader_env(mq)
    mq.apply_twice(path, env=env)
    salt = {c["username"]: c.get("salt") for c in mq.dynsec_file()["clients"]}
    # An unchanged password is never re-sent: the broker's own salted hash stays as it was.
    mq.run("apply", str(path), env=env)
    assert {c["username"]: c.get("salt") for c in mq.dynsec_file()["clients"]} == salt

    (mq.tmp / "secrets" / "sensor-01").write_text(mq.secret("sensor-pass-2"))
    env2 = reader_env(mq, "reader-pass-2")
    plan = mq.run("plan", str(path), "--diff", env=env2)
    assert plan.code == 2
    assert plan.out.count("spec.password: (secret, changed)") == 2
    js = mq.run("plan", str(path), "-o", "json", env=env2).json
    assert sorted((c["name"], c["fields"][0]) for c in js["changes"]) == [
        ("dashboard", "spec.password"), ("sensor-01", "spec.password")]
    mq.apply_twice(path, env=env2)

    new, old = login(mq.port, "sensor-01", "sensor-pass-2"), login(mq.port, "sensor-01", "sensor-pass-1")
    new_d, old_d = login(mq.port, "dashboard", "reader-pass-2"), login(mq.port, "dashboard", READER_PW)
    try:
        assert new.connected and new_d.connected
        assert not old.connected and not old_d.connected
    finally:
        for c in (new, old, new_d, old_d):
            c.close()
    # The fingerprint in the marker is salted: never the password, never an unsalted hash of it.
    text = json.dumps(mq.dynsec_file())
    assert "sensor-pass-2" not in text and "pbkdf2-sha256$" in text


def test_missing_secret_sources_are_named_not_shown(mq):
    path = write(mq.tmp / "m" / "c.yaml",
                 doc("MqttClient", "c1", {"password": {"fromEnv": "NO_SUCH_VAR_X"}}),
                 doc("MqttClient", "c2", {"password": {"fromFile": "/nonexistent/secret-c2"}}))
    r = mq.run("validate", str(path))
    assert r.code == 1 and "NO_SUCH_VAR_X" in r.err and "c.yaml" in r.err and "Traceback" not in r.err
    write(path, doc("MqttClient", "c2", {"password": {"fromFile": "/nonexistent/secret-c2"}}))
    r = mq.run("plan", str(path))
    assert r.code == 1 and "/nonexistent/secret-c2" in r.err and "Traceback" not in r.err
    # A relative fromFile is read next to the manifest.
    (path.parent / "c3.pw").write_text(mq.secret("c3-secret-value"))
    write(path, doc("MqttClient", "c3", {"password": {"fromFile": "c3.pw"}}))
    mq.apply_twice(path)
    c = login(mq.port, "c3", "c3-secret-value")
    assert c.connected
    c.close()


def test_prune_deletes_removed_managed_objects_and_keeps_unmarked_ones(mq):
    path = write_edge(mq)
    env = reader_env(mq)
    extra = [doc("MqttRole", "old-role", {"acls": [{"type": "subscribeLiteral", "topic": "old/t"}]}),
             doc("MqttGroup", "old-group", {}),
             doc("MqttClient", "old-client", {"password": {"fromEnv": "READER_PW"}}),
             doc("Topic", "old/retained", {"retained": {"payload": "bye"}})]
    full = write(mq.tmp / "m2" / "edge.yaml", *(json.loads(json.dumps(d)) for d in
                                               __import__("yaml").safe_load_all(path.read_text())), *extra)
    mq.apply_twice(full, env=env)
    # Made by hand: never ours.
    mq.ctrl("createRole", "hand-role")
    mq.ctrl("createGroup", "hand-group")
    subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(mq.port), "-u", "admin", "-P",
                    mq.broker.password, "dynsec", "createClient", "hand-client", "-p", mq.secret("hand-pw-1")],
                   check=True, capture_output=True, timeout=30)
    mq.pub("devices/d1/state", "online")

    plan = mq.run("plan", str(path), "-o", "json", env=env)
    assert plan.code == 0, plan.out      # without --prune the removed ones are orphans, kept
    assert {(o["kind"], o["name"]) for o in plan.json["orphans"]} == {
        ("MqttRole", "old-role"), ("MqttGroup", "old-group"), ("MqttClient", "old-client"), ("Topic", "old/retained")}

    plan = mq.run("plan", str(path), "--prune", "-o", "json", env=env)
    assert plan.code == 2
    deletes = [(c["kind"], c["name"]) for c in plan.json["changes"]]
    # Deletes run in reverse kind order: topics, clients, groups, roles.
    assert deletes == [("Topic", "old/retained"), ("MqttClient", "old-client"), ("MqttGroup", "old-group"),
                       ("MqttRole", "old-role")]
    mq.apply_twice(path, "--prune", env=env)

    ds = mq.dynsec_file()
    roles = {r["rolename"] for r in ds["roles"]}
    clients = {c["username"] for c in ds["clients"]}
    groups = {g["groupname"] for g in ds["groups"]}
    assert {"hand-role", "admin", "sensors", "readers"} <= roles and "old-role" not in roles
    assert {"hand-client", "admin", "sensor-01", "dashboard"} <= clients and "old-client" not in clients
    assert "hand-group" in groups and "old-group" not in groups
    # One subscription that can see both: the hand-made retained message arrives, so the absence of
    # the pruned one means it is gone (not that this client may not see it).
    admin = login(mq.port, "admin", mq.broker.password)
    try:
        admin.subscribe("#")
        assert admin.received("devices/d1/state").payload == b"online"
        assert admin.received("old/retained", timeout=1) is None
    finally:
        admin.close()


def test_adoption_keeps_the_users_description_and_marks_the_object(mq):
    mq.ctrl("createRole", "legacy")
    mq.ctrl("addRoleACL", "legacy", "subscribeLiteral", "legacy/t", "allow")
    admin_c = login(mq.port, "admin", mq.broker.password)
    try:
        # A description set by hand (mosquitto_ctrl cannot set one; a dynsec request can).
        admin_c.subscribe("$CONTROL/dynamic-security/v1/response")
        assert admin_c.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": [
            {"command": "modifyRole", "rolename": "legacy", "textdescription": "made by hand\nsecond line"}]})) < 128
        assert admin_c.received("$CONTROL/dynamic-security/v1/response") is not None
    finally:
        admin_c.close()
    path = write(mq.tmp / "m" / "r.yaml", doc("MqttRole", "legacy", {}, labels={"team": "ops"}))
    plan = mq.run("plan", str(path), "--diff")
    assert plan.code == 2 and "metadata.managed: false -> true" in plan.out
    mq.apply_twice(path)
    role = next(r for r in mq.dynsec_file()["roles"] if r["rolename"] == "legacy")
    assert role["textdescription"].startswith("made by hand\nsecond line\nreconciler:v1 ")
    # Its ACLs were not declared: left alone.
    assert [a["topic"] for a in role["acls"]] == ["legacy/t"]
    # Declaring a description replaces only the user's part.
    write(path, doc("MqttRole", "legacy", {"description": "now declared"}, labels={"team": "ops"}))
    mq.apply_twice(path)
    role = next(r for r in mq.dynsec_file()["roles"] if r["rolename"] == "legacy")
    assert role["textdescription"].startswith("now declared\nreconciler:v1 ")
    js = mq.run("plan", str(path), "-o", "json").json
    assert js["summary"]["unchanged"] == 1


def test_topic_absent_clears_and_unmarked_retained_messages_stay(mq):
    path = write(mq.tmp / "m" / "t.yaml", doc("Topic", "site/a/config", {"retained": {"payload": "v1", "qos": 0}}),
                 doc("Topic", "site/b/config", {"retained": {"payload": "v2", "qos": 2}}, labels={"x": "1"}))
    mq.apply_twice(path)
    admin = login(mq.port, "admin", mq.broker.password)
    try:
        admin.subscribe("site/+/config")
        assert admin.received("site/a/config").payload == b"v1"
        b = admin.received("site/b/config")
        assert b.payload == b"v2" and b.qos == 1  # delivered at the subscription's QoS 1
    finally:
        admin.close()
    mq.pub("site/c/config", "device-made")
    write(path, doc("Topic", "site/a/config", {"state": "absent"}),
          doc("Topic", "site/b/config", {"retained": {"payload": "v2", "qos": 2}}, labels={"x": "1"}),
          doc("Topic", "site/c/config", {"publishers": []}))
    plan = mq.run("plan", str(path), "-o", "json")
    assert [(c["action"], c["name"]) for c in plan.json["changes"]] == [("delete", "site/a/config")]
    mq.apply_twice(path)
    admin = login(mq.port, "admin", mq.broker.password)
    try:
        admin.subscribe("site/+/config")
        assert admin.received("site/c/config").payload == b"device-made"
        assert admin.received("site/a/config", timeout=1) is None
    finally:
        admin.close()


def test_a_publish_the_broker_denies_is_a_failure(mq):
    # Narrow the admin's publish right to a subtree (in the file, broker stopped: a dynsec change
    # to the admin's own role would disconnect mosquitto_ctrl before it hears the answer).
    mq.broker.stop()
    f = mq.broker.dir / "dynamic-security.json"
    data = json.loads(f.read_text())
    admin = next(r for r in data["roles"] if r["rolename"] == "admin")
    admin["acls"] = [a for a in admin["acls"] if (a["acltype"], a["topic"]) != ("publishClientSend", "#")]
    admin["acls"].append({"acltype": "publishClientSend", "topic": "edge/#", "allow": True})
    f.write_text(json.dumps(data))
    import devbroker
    mq.broker = devbroker.start(mq.broker.dir, mq.broker.port, die_with_parent=True)
    path = write(mq.tmp / "m" / "t.yaml", doc("Topic", "edge/ok", {"retained": {"payload": "fine"}}),
                 doc("Topic", "plant/denied", {"retained": {"payload": "nope"}}),
                 doc("Topic", "plant/denied0", {"retained": {"payload": "nope", "qos": 0}}),
                 doc("Topic", "plant/denied2", {"retained": {"payload": "nope", "qos": 2}}))
    r = mq.run("apply", str(path), "-o", "json")
    assert r.code == 1, r.out + r.err
    status = {c["name"]: c for c in r.json["changes"]}
    assert status["edge/ok"]["status"] == "applied"
    assert status["plant/denied"]["status"] == "failed"
    assert "Not authorized" in status["plant/denied"]["error"] and "135" in status["plant/denied"]["error"]
    assert status["plant/denied0"]["status"] == "failed"
    assert status["plant/denied2"]["status"] == "failed" and "Not authorized" in status["plant/denied2"]["error"]
    r = mq.run("apply", str(path))
    assert r.code == 1 and "failed=3" in r.recap and "changed=0" in r.recap


def test_dynsec_errors_name_the_object(mq):
    from reconciler.errors import ApplyError
    from reconciler.model import Action, FieldChange, Resource, ResourceId
    from reconciler.providers.mosquitto import MosquittoProvider
    mq.ctrl("createClient", "c1")
    p = MosquittoProvider(mq.url, "admin", mq.broker.password)
    try:
        live = p.read(frozenset({"MqttClient"})).objects[ResourceId("MqttClient", "c1")]
        want = Resource(ResourceId("MqttClient", "c1"), {"roles": [{"name": "ghost", "priority": -1}], "groups": [],
                                                           "password": None, "disabled": False},
                        declared=frozenset({"roles"}))
        a = Action("update", want.id, "roles differ", (FieldChange("spec.roles[ghost]", None, {"priority": -1}),),
                   desired=want, live=live)
        with pytest.raises(ApplyError) as e:
            p.apply(a)
        assert "MqttClient 'c1'" in str(e.value) and "addClientRole" in str(e.value)
        assert "not found" in str(e.value).lower()
    finally:
        p.close()


def test_refused_login_and_unreachable_broker_fail_fast_with_one_message(mq, tmp_path):
    path = write_edge(mq)
    env = reader_env(mq)
    t = time.monotonic()
    r = mq.run("plan", str(path), env={**env, "RECONCILER_MQTT_PASSWORD": mq.secret("wrong-admin-pw")})
    assert r.code == 1 and time.monotonic() - t < 30
    assert "refused the login" in r.err and "admin" in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    r = mq.run("apply", str(path), env={**env, "RECONCILER_MQTT_URL": f"mqtt://127.0.0.1:{port}"})
    assert r.code == 1 and time.monotonic() - t < 30
    assert "cannot reach broker" in r.err and "Traceback" not in r.err

    # A listener that accepts and never answers: the CONNACK wait times out within 30 s.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    try:
        t = time.monotonic()
        r = mq.run("plan", str(path), env={**env, "RECONCILER_MQTT_URL": f"mqtt://127.0.0.1:{silent.getsockname()[1]}"})
        assert r.code == 1 and time.monotonic() - t < 30, r.err
        assert "did not accept the connection" in r.err and "Traceback" not in r.err
    finally:
        silent.close()


def test_a_repository_without_mqtt_kinds_never_connects(mq, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.2)
    hits = []

    def accept():
        end = time.monotonic() + 20
        while time.monotonic() < end and not hits:
            try:
                conn, _ = listener.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    path = write(tmp_path / "m" / "p.yaml", doc("StoragePool", "mq-none-pool", {"type": "dir", "path": str(tmp_path / "p")}))
    r = mq.run("plan", str(path), "--libvirt-uri", "test:///default",
               env={"RECONCILER_MQTT_URL": f"mqtt://127.0.0.1:{listener.getsockname()[1]}"})
    hits_after = list(hits)
    listener.close()
    assert r.code in (0, 2), r.out + r.err
    assert hits_after == []


def test_mqtts_with_cafile(tmp_path):
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
    from mqtt_fixtures import Mqtt
    m = Mqtt(b, tmp_path)
    try:
        path = write(tmp_path / "m" / "t.yaml", doc("MqttRole", "tls-role", {}),
                     doc("Topic", "tls/config", {"retained": {"payload": "secure"}}))
        url = f"mqtts://localhost:{tls_port}"
        m.apply_twice(path, "--mqtt-url", url, "--mqtt-cafile", str(certs / "ca.crt"))
        # Without the CA the server's certificate is not trusted: one clear error, no traceback.
        r = m.run("plan", str(path), "--mqtt-url", url)
        assert r.code == 1 and "TLS" in r.err and "Traceback" not in r.err, r.err
        m.assert_no_secret_leaked()
    finally:
        b.stop()


def test_prune_keeps_to_its_own_scope(mq):
    a = write(mq.tmp / "a" / "a.yaml", doc("MqttRole", "role-a", {}), doc("Topic", "scope/a", {"retained": {"payload": "a"}}))
    b = write(mq.tmp / "b" / "b.yaml", doc("MqttRole", "role-b", {}))
    mq.apply_twice(a, "--scope", "team-a")
    mq.apply_twice(b, "--scope", "team-b", "--prune")
    js = mq.run("plan", str(b), "--scope", "team-b", "--prune", "-o", "json").json
    assert js["changes"] == []
    roles = {r["rolename"]: r.get("textdescription", "") for r in mq.dynsec_file()["roles"]}
    assert '"scope":"team-a"' in roles["role-a"] and '"scope":"team-b"' in roles["role-b"]
    # Declaring team-a's role from team-b moves it into team-b's scope.
    write(b, doc("MqttRole", "role-b", {}), doc("MqttRole", "role-a", {}))
    plan = mq.run("plan", str(b), "--scope", "team-b", "-o", "json")
    assert [(c["name"], c["fields"]) for c in plan.json["changes"]] == [("role-a", ["metadata.scope"])]
