"""Export and inventory against real Mosquitto brokers (one per test, or two on two loopback ports):
the round trip for every MQTT kind, secrets only as fromEnv placeholders, --all adopting hand-made
objects without touching their passwords, and an inventory whose hosts use their own brokers."""
from __future__ import annotations

import pytest
import yaml

from helpers import cli, doc, write
from mqtt_fixtures import login, mq, start_broker, write_edge  # noqa: F401  (mq is a fixture)

pytestmark = pytest.mark.mqtt

READER_PW = "reader-pass-1"
SENSOR_PW = "sensor-pass-1"


def test_mqtt_round_trip_every_kind(mq, tmp_path):
    path = write_edge(mq, SENSOR_PW)
    mq.apply_twice(path, env={"READER_PW": mq.secret(READER_PW)})

    # Libvirt on the per-process test driver: the shared host's VMs of other tests are not this test's.
    exp = mq.run("export", "--libvirt-uri", "test:///default")
    assert exp.code == 0, exp.err
    docs = [d for d in yaml.safe_load_all(exp.out) if d]
    got = sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"].startswith("Mqtt") or d["kind"] == "Topic")
    assert got == sorted([("MqttRole", "sensors"), ("MqttRole", "readers"), ("MqttGroup", "field-devices"),
                          ("MqttClient", "sensor-01"), ("MqttClient", "dashboard"), ("Topic", "edge/gw-1/config")])
    # Secrets: a placeholder and a comment, never a value or a fingerprint.
    assert "password: {fromEnv: MQTT_PASSWORD_SENSOR_01}  # secret not exported" in exp.out
    assert "pbkdf2" not in exp.out and SENSOR_PW not in exp.out and READER_PW not in exp.out
    role = next(d for d in docs if d["metadata"]["name"] == "sensors")
    assert role["metadata"]["labels"] == {"site": "plant-3"} and role["spec"]["description"] == "sensor firmware"
    # The Topic's publishers became the role's ACLs, so the role carries them itself.
    assert {"type": "publishClientSend", "topic": "edge/gw-1/config", "allow": True, "priority": 0} in role["spec"]["acls"]

    out = tmp_path / "export" / "mqtt.yaml"
    out.parent.mkdir()
    out.write_text(exp.out)
    env = {"MQTT_PASSWORD_SENSOR_01": SENSOR_PW, "MQTT_PASSWORD_DASHBOARD": READER_PW}
    assert mq.run("validate", str(out), env=env).code == 0
    mq.apply_twice(out, env=env)                 # plan reports no change; applying is a no-op, twice
    assert login(mq.port, "sensor-01", SENSOR_PW).connected

    # A wrong value in the placeholder's variable is seen as a password change, never shown.
    wrong = mq.run("plan", str(out), "-o", "json", env={**env, "MQTT_PASSWORD_SENSOR_01": mq.secret("not-it")})
    assert wrong.code == 2 and [c["fields"] for c in wrong.json["changes"]] == [["spec.password"]]

    roles = mq.run("export", "--kind", "MqttRole")
    kinds = {d["kind"] for d in yaml.safe_load_all(roles.out) if d}
    assert kinds == {"MqttRole"}
    only_roles = tmp_path / "export" / "roles.yaml"
    only_roles.write_text(roles.out)
    plan = mq.run("plan", str(only_roles), "-o", "json")
    assert plan.code == 0 and plan.json["changes"] == []


def test_all_adopts_hand_made_mqtt_objects_and_keeps_their_passwords(mq, tmp_path):
    mq.ctrl("createRole", "legacy-role")
    mq.ctrl("addRoleACL", "legacy-role", "publishClientSend", "legacy/#", "allow")
    mq.ctrl("createClient", "legacy-dev", "-p", mq.secret("legacy-pass-9"))
    mq.ctrl("addClientRole", "legacy-dev", "legacy-role", "5")
    mq.pub("legacy/cfg", "on")

    managed = mq.run("export")
    assert "legacy" not in managed.out
    exp = mq.run("export", "--all")
    assert exp.code == 0, exp.err
    docs = [d for d in yaml.safe_load_all(exp.out) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("MqttRole", "legacy-role"), ("MqttClient", "legacy-dev"), ("Topic", "legacy/cfg")} <= names
    # A password the reconciler never set is not managed: the placeholder is commented out.
    assert "# password: {fromEnv: MQTT_PASSWORD_LEGACY_DEV}" in exp.out
    client = next(d for d in docs if d["metadata"]["name"] == "legacy-dev")
    assert "password" not in client["spec"] and client["spec"]["roles"] == [{"name": "legacy-role", "priority": 5}]
    mine = [d for d in docs if "legacy" in d["metadata"]["name"]]
    path = write(tmp_path / "e" / "legacy.yaml", *mine)
    plan = mq.run("plan", str(path), "-o", "json")
    assert plan.code == 2
    assert all(c["fields"] == ["metadata.managed"] for c in plan.json["changes"]), plan.json["changes"]
    mq.apply_twice(path)
    assert login(mq.port, "legacy-dev", "legacy-pass-9").connected      # adopted, password untouched
    assert "legacy-dev" in mq.run("export", "--kind", "MqttClient").out


def test_inventory_with_two_brokers(tmp_path, mq):
    other = start_broker(tmp_path / "broker2")
    try:
        role = lambda name: doc("MqttRole", name, {"acls": [{"type": "subscribeLiteral", "topic": f"site/{name}"}]})  # noqa: E731
        write(tmp_path / "site" / "common" / "roles.yaml", role("ops"))
        write(tmp_path / "site" / "hosts" / "one" / "client.yaml",
              doc("MqttClient", "gw", {"password": {"fromEnv": "GW_PW"}, "roles": [{"name": "ops"}]}))
        write(tmp_path / "site" / "hosts" / "two" / "topic.yaml",
              doc("Topic", "site/two/cfg", {"retained": {"payload": "x", "qos": 1}}))
        secret_file = tmp_path / "site" / "secrets" / "two.pw"
        secret_file.parent.mkdir()
        secret_file.write_text(other.password + "\n")
        inv = tmp_path / "site" / "inventory.yaml"
        inv.write_text(yaml.safe_dump({"apiVersion": "reconciler/v1", "kind": "Inventory", "hosts": [
            {"name": "one", "mqttUrl": mq.url, "mqttUsername": "admin", "mqttPassword": {"fromEnv": "ONE_ADMIN_PW"},
             "manifests": ["common/", "hosts/one/"]},
            {"name": "two", "mqttUrl": other.url, "mqttUsername": "admin", "mqttPassword": {"fromFile": "secrets/two.pw"},
             "manifests": ["common/", "hosts/two/"]},
        ]}))
        env = {"ONE_ADMIN_PW": mq.broker.password, "GW_PW": mq.secret("gw-pass-1"),
               "RECONCILER_MQTT_PASSWORD": ""}
        first = mq.run("apply", "--inventory", str(inv), env=env)
        assert first.code == 0, first.out + first.err
        assert "one : ok=0 changed=2 failed=0 skipped=0" in first.out
        assert "two : ok=0 changed=2 failed=0 skipped=0" in first.out
        second = mq.run("apply", "--inventory", str(inv), env=env)
        assert second.code == 0
        assert "one : ok=2 changed=0 failed=0 skipped=0" in second.out
        assert "two : ok=2 changed=0 failed=0 skipped=0" in second.out
        js = mq.run("plan", "--inventory", str(inv), "-o", "json", env=env)
        assert js.code == 0 and all(h["changes"] == [] for h in js.json["hosts"].values())
        assert login(mq.port, "gw", "gw-pass-1").connected
        assert other.password not in first.out + first.err
    finally:
        other.stop()
