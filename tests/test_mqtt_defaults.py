"""MqttDefaults (issue 13, contract section 8) on a real Mosquitto 2.0.11: dynsec's default ACL access and
anonymous group declared, read back with getDefaultACLAccess / getAnonymousGroup, drift shown and
repaired, never pruned; the anonymous group is never deleted, --prune included; `""` on this version;
and the broker stays up through all of it. Every apply is repeated and must change nothing."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import doc, write
from mqtt_fixtures import mq  # noqa: F401  (a fixture)

pytestmark = pytest.mark.mqtt


def alive(m) -> bool:
    try:
        os.kill(m.broker.pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{m.broker.pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def broker_defaults(m) -> tuple[dict, str]:
    """What the broker says, asked with mosquitto_ctrl (not through the reconciler)."""
    access = {}
    for line in m.ctrl("getDefaultACLAccess").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[0] in ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"):
            access[parts[0]] = parts[-1] == "allow"
    group = m.ctrl("getAnonymousGroup").strip()
    return access, group.split(":", 1)[1].strip() if ":" in group else group


def dynsec(m, command: dict) -> dict:
    """One dynsec command as JSON, by hand (mosquitto_rr): 2.0.11's `mosquitto_ctrl dynsec
    setDefaultACLAccess` sends {"access": "allow"}, which the plugin ignores, so it changes nothing."""
    p = subprocess.run(["mosquitto_rr", "-h", "127.0.0.1", "-p", str(m.port), "-u", "admin", "-P", m.broker.password,
                        "-t", "$CONTROL/dynamic-security/v1", "-e", "$CONTROL/dynamic-security/v1/response",
                        "-m", json.dumps({"commands": [command]}), "-W", "20"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["responses"][0]


def manifests(m, *, defaults: bool = True, guests: bool = True):
    docs = [doc("MqttRole", "public-read", {"acls": [{"type": "subscribePattern", "topic": "public/#"}]})]
    if guests:
        docs.append(doc("MqttGroup", "guests", {"roles": [{"name": "public-read"}]}))
    if defaults:
        docs.append(doc("MqttDefaults", "default", {
            "aclAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                          "unsubscribe": False},
            "anonymousGroup": "guests"}))
    return write(m.tmp / "m" / "defaults.yaml", *docs)


def test_defaults_applied_read_back_drift_repaired(mq):
    access, group = broker_defaults(mq)
    assert access["unsubscribe"] is True and group == ""      # dynsec init's defaults: no anonymous group
    path = manifests(mq)
    plan = mq.run("plan", str(path), "-o", "json")
    assert plan.code == 2
    assert {(c["kind"], c["name"]): c["fields"] for c in plan.json["changes"]}[("MqttDefaults", "default")] == \
        ["spec.aclAccess.unsubscribe", "spec.anonymousGroup"]
    mq.apply_twice(path)
    access, group = broker_defaults(mq)
    assert access == {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                      "unsubscribe": False}
    assert group == "guests"

    # Drift by hand: another group made the anonymous one, unsubscribe allowed again.
    mq.ctrl("createGroup", "hand-made")
    mq.ctrl("setAnonymousGroup", "hand-made")
    assert "error" not in dynsec(mq, {"command": "setDefaultACLAccess", "acls": [{"acltype": "unsubscribe", "allow": True}]})
    plan = mq.run("plan", str(path), "--diff")
    assert plan.code == 2, plan.out + plan.err
    assert "spec.anonymousGroup: hand-made -> guests" in plan.out
    assert "spec.aclAccess.unsubscribe: true -> false" in plan.out
    mq.apply_twice(path)
    assert broker_defaults(mq) == ({"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                                    "unsubscribe": False}, "guests")
    assert alive(mq)


def test_never_pruned_and_the_anonymous_group_is_never_deleted(mq):
    path = manifests(mq)
    mq.apply_twice(path, "--prune")
    # The manifests stop declaring the defaults and the anonymous group: --prune (with --force) keeps both.
    path = manifests(mq, defaults=False, guests=False)
    plan = mq.run("plan", str(path), "--prune", "--force")
    assert plan.code == 0, plan.out + plan.err
    assert "MqttGroup/guests" in plan.out and "anonymous group: never deleted" in plan.out, plan.out
    mq.apply_twice(path, "--prune", "--force")
    assert broker_defaults(mq)[1] == "guests"
    assert "guests" in mq.ctrl("listGroups")
    assert alive(mq)
    # And an apply that would delete it anyway (a saved or stale plan) is refused by the provider.
    from reconciler.model import Action, ResourceId
    from reconciler.errors import ApplyError
    from reconciler.providers.mosquitto import MosquittoProvider
    p = MosquittoProvider(mq.url, "admin", mq.broker.password)
    try:
        with pytest.raises(ApplyError, match="anonymous group: never deleted"):
            p.apply(Action("delete", ResourceId("MqttGroup", "guests"), "test"))
    finally:
        p.close()
    assert "guests" in mq.ctrl("listGroups") and alive(mq)


def test_empty_anonymous_group_on_2_0_11(mq):
    """`""` means no anonymous group: in sync on a broker that never had one; once one is set, Mosquitto
    2.0.11 refuses setAnonymousGroup "" ("Group not found"), so the plan refuses with the way out."""
    path = write(mq.tmp / "m" / "none.yaml", doc("MqttDefaults", "default", {"anonymousGroup": ""}))
    mq.apply_twice(path)
    # The broker's own answer, which the refusal stands on.
    assert dynsec(mq, {"command": "setAnonymousGroup", "groupname": ""})["error"] == "Group not found"
    mq.ctrl("createGroup", "somebody")
    mq.ctrl("setAnonymousGroup", "somebody")
    plan = mq.run("plan", str(path))
    assert plan.code == 1, plan.out + plan.err
    assert "Mosquitto 2.0 cannot unset it" in plan.out + plan.err
    apply = mq.run("apply", str(path))
    assert apply.code == 1 and "failed=1" in apply.recap
    assert broker_defaults(mq)[1] == "somebody" and alive(mq)


def test_bad_defaults_are_refused_offline(mq):
    bad_name = write(mq.tmp / "b1" / "d.yaml", doc("MqttDefaults", "mine", {"aclAccess": {"subscribe": False}}))
    r = mq.run("validate", str(bad_name))
    assert r.code == 1 and "name it 'default'" in r.err and "d.yaml" in r.err, r.err
    undeclared = write(mq.tmp / "b2" / "d.yaml", doc("MqttDefaults", "default", {"anonymousGroup": "nobody"}))
    r = mq.run("validate", str(undeclared))
    assert r.code == 1 and "nobody" in r.err, r.err
    typo = write(mq.tmp / "b3" / "d.yaml", doc("MqttDefaults", "default", {"aclAccess": {"publish": True}}))
    r = mq.run("validate", str(typo))
    assert r.code == 1 and "publish" in r.err and "Traceback" not in r.err, r.err
