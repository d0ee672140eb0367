"""Saved plans on the real services: `plan --out FILE` is what `apply FILE` does, exactly, or nothing.
A plan applied once, a hand-made change between plan and apply, a file edited by hand, changed
manifests, another target and other flags are each refused with exit 1 and no change; secrets never
appear in the file; inventories save one file per host."""
from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from helpers import cli, doc, virsh, write
from mqtt_fixtures import mq  # noqa: F401  (fixture)


def vm(prefix: str, name: str, memory: str = "64MiB", vcpus: int = 1, state: str = "running") -> dict:
    return doc("VirtualMachine", f"{prefix}{name}", {"hypervisor": "test", "memory": memory, "vcpus": vcpus,
                                                      "state": state})


def _memory_kib(uri: str, name: str) -> int:
    xml = virsh(uri, "dumpxml", "--inactive", name)
    import re
    return int(re.search(r"<memory unit='KiB'>(\d+)</memory>", xml).group(1))


@pytest.mark.libvirt
def test_plan_saved_shown_applied_then_refused_as_applied_already(tmp_path, prefix, test_unix_uri):
    m = write(tmp_path / "m" / "vms.yaml", vm(prefix, "a"), vm(prefix, "b"))
    uri = ["--libvirt-uri", test_unix_uri]
    f = tmp_path / "plan.json"

    planned = cli("plan", str(m), *uri, "--out", str(f))
    assert planned.code == 2, planned.out + planned.err
    assert f.exists() and f"plan saved to {f}" in planned.out
    saved = json.loads(f.read_text())
    assert saved["format"] == "reconciler-plan" and saved["version"] == 1
    assert saved["target"]["libvirt"] == test_unix_uri and saved["target"]["mqtt"] is None
    assert [(s["action"], s["name"]) for s in saved["steps"]] == [("create", f"{prefix}a"), ("create", f"{prefix}b")]

    # show prints what plan printed, in text and in JSON.
    shown = cli("show", str(f))
    assert shown.code == 2
    assert [l for l in shown.out.splitlines() if l.startswith(("changed:", "ok=", "plan:"))] == \
           [l for l in planned.out.splitlines() if l.startswith(("changed:", "ok=", "plan:"))]
    as_json = cli("show", str(f), "-o", "json")
    fresh_json = cli("plan", str(m), *uri, "-o", "json")
    assert as_json.json["changes"] == fresh_json.json["changes"] and as_json.json["summary"] == fresh_json.json["summary"]

    applied = cli("apply", str(f), *uri)
    assert applied.code == 0, applied.out + applied.err
    assert "changed=2" in applied.recap
    assert virsh(test_unix_uri, "domstate", f"{prefix}a").strip() == "running"

    # The same file again: its objects are in sync now, so it no longer describes what apply would do.
    again = cli("apply", str(f), *uri)
    assert again.code == 1
    assert "stale" in again.err and f"VirtualMachine/{prefix}a changed since the plan" in again.err
    assert "Traceback" not in again.err
    # And an ordinary apply of the manifests is a no-op (nothing was done twice).
    noop = cli("apply", str(m), *uri)
    assert noop.code == 0 and "changed=0" in noop.recap


@pytest.mark.libvirt
def test_a_hand_made_change_between_plan_and_apply_is_refused_and_nothing_changes(tmp_path, prefix, test_unix_uri):
    uri = ["--libvirt-uri", test_unix_uri]
    # Shut off: memory changes are plain config changes, no restart involved.
    m = write(tmp_path / "m" / "vms.yaml", vm(prefix, "a", state="shutoff"), vm(prefix, "b", state="shutoff"))
    first = cli("apply", str(m), *uri)
    assert first.code == 0, first.out + first.err
    assert cli("apply", str(m), *uri).recap.startswith("ok=2 changed=0")

    write(tmp_path / "m" / "vms.yaml", vm(prefix, "a", memory="128MiB", state="shutoff"),
          vm(prefix, "b", memory="96MiB", state="shutoff"))
    f = tmp_path / "plan.json"
    assert cli("plan", str(m), *uri, "--out", str(f)).code == 2
    before_b = _memory_kib(test_unix_uri, f"{prefix}b")

    # Someone changes VM a's memory by hand after the review.
    virsh(test_unix_uri, "setmaxmem", f"{prefix}a", "80M", "--config")
    refused = cli("apply", str(f), *uri, "-o", "json")
    assert refused.code == 1
    assert refused.json["error"].startswith(f"{f} is stale, nothing was changed")
    assert f"VirtualMachine/{prefix}a changed since the plan: spec.maxMemory" in refused.json["error"]
    assert f"VirtualMachine/{prefix}b" not in refused.json["error"]       # b did not move
    assert _memory_kib(test_unix_uri, f"{prefix}a") == 80 * 1024          # the hand-made value stays
    assert _memory_kib(test_unix_uri, f"{prefix}b") == before_b           # and b was not touched either

    # A fresh plan of the same manifests is applied, and the next plan is clean.
    f2 = tmp_path / "plan2.json"
    assert cli("plan", str(m), *uri, "--out", str(f2)).code == 2
    ok = cli("apply", str(f2), *uri)
    assert ok.code == 0 and "changed=2" in ok.recap, ok.out + ok.err
    assert cli("plan", str(m), *uri).code == 0


@pytest.mark.libvirt
def test_edited_file_changed_manifests_other_target_and_other_flags_are_refused(tmp_path, prefix, test_unix_uri):
    uri = ["--libvirt-uri", test_unix_uri]
    m = write(tmp_path / "m" / "vms.yaml", vm(prefix, "a"))
    f = tmp_path / "plan.json"
    assert cli("plan", str(m), *uri, "--out", str(f)).code == 2
    original = json.loads(f.read_text())

    # 1. An action added by hand: the integrity check fails.
    edited = json.loads(f.read_text())
    extra = dict(edited["steps"][0], name=f"{prefix}intruder")
    edited["steps"].append(extra)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    r = cli("apply", str(tmp_path / "edited.json"), *uri)
    assert r.code == 1 and "altered after it was written (integrity check failed)" in r.err

    # 2. The same edit with the hash recomputed: the action is not in the fresh plan, so still refused.
    body = {k: v for k, v in edited.items() if k != "integrity"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    edited["integrity"] = "sha256:" + hashlib.sha256(canon).hexdigest()
    (tmp_path / "forged.json").write_text(json.dumps(edited))
    r = cli("apply", str(tmp_path / "forged.json"), *uri)
    assert r.code == 1 and f"VirtualMachine/{prefix}intruder changed since the plan" in r.err

    # 3. Another target.
    r = cli("apply", str(f), "--libvirt-uri", "test:///default")
    assert r.code == 1 and "the plan was made for libvirt" in r.err

    # 4. Flags that would plan differently.
    r = cli("apply", str(f), *uri, "--allow-restart")
    assert r.code == 1 and "--allow-restart (given now, not given at plan time)" in r.err

    # 5. Manifests changed after the plan.
    write(tmp_path / "m" / "vms.yaml", vm(prefix, "a", memory="96MiB"))
    r = cli("apply", str(f), *uri)
    assert r.code == 1 and "the manifests changed since the plan" in r.err

    # Nothing of all that created anything.
    assert f"{prefix}a" not in virsh(test_unix_uri, "list", "--all", "--name")
    assert json.loads(f.read_text()) == original


@pytest.mark.mqtt
def test_secrets_never_appear_in_the_plan_file(tmp_path, mq):  # noqa: F811
    password = mq.secret("s3cr3t-" + tmp_path.name[-8:])
    m = write(tmp_path / "m" / "mqtt.yaml",
              doc("MqttRole", "sp-role", {"acls": [{"type": "publishClientSend", "topic": "sp/#"}]}),
              doc("MqttClient", "sp-client", {"password": {"fromEnv": "SP_PASSWORD"}, "roles": [{"name": "sp-role"}]}),
              doc("Topic", "sp/config", {"retained": {"payload": "hello"}, "publishers": ["sp-role"]}))
    env = {"SP_PASSWORD": password}
    f = tmp_path / "plan.json"
    assert mq.run("plan", str(m), "--out", str(f), env=env).code == 2
    text = f.read_text()
    assert password not in text and mq.broker.password not in text
    saved = json.loads(text)
    assert saved["target"]["mqtt"] == mq.url and saved["target"]["libvirt"] is None
    shown = mq.run("show", str(f), "--diff")
    assert shown.code == 2 and "(secret)" in shown.out and password not in shown.out
    applied = mq.run("apply", str(f), env=env)
    assert applied.code == 0 and "changed=3" in applied.recap, applied.out + applied.err
    mq.apply_twice(m, env=env)


@pytest.mark.libvirt
def test_inventory_saves_one_plan_per_host_and_applies_each(tmp_path, prefix, test_unix_uri):
    write(tmp_path / "site" / "hosts" / "a" / "vm.yaml", vm(prefix, "a"))
    write(tmp_path / "site" / "hosts" / "b" / "vm.yaml", vm(prefix, "b"))
    inv = tmp_path / "site" / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"apiVersion": "reconciler/v1", "kind": "Inventory", "hosts": [
        {"name": "edge-a", "libvirtUri": test_unix_uri, "manifests": ["hosts/a/"]},
        {"name": "edge-b", "libvirtUri": test_unix_uri, "manifests": ["hosts/b/"]}]}))
    out = tmp_path / "plans"
    planned = cli("plan", "--inventory", str(inv), "--out", str(out))
    assert planned.code == 2, planned.out + planned.err
    assert sorted(p.name for p in out.iterdir()) == ["edge-a.json", "edge-b.json"]
    applied = cli("apply", "--inventory", str(out))
    assert applied.code == 0, applied.out + applied.err
    assert "edge-a : ok=0 changed=1 failed=0 skipped=0" in applied.out
    assert "edge-b : ok=0 changed=1 failed=0 skipped=0" in applied.out
    again = cli("apply", "--inventory", str(out))
    assert again.code == 1 and "edge-a: error:" in again.err and "stale" in again.err
    # A no-op of the inventory itself afterwards.
    noop = cli("apply", "--inventory", str(inv))
    assert noop.code == 0 and "edge-a : ok=1 changed=0" in noop.out
