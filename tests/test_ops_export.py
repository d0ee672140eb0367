"""`reconciler export` on real libvirt (qemu:///system) and a real broker: the round trip of the
contract (export, validate, plan reports no change), --kind, --all adopting hand-made objects, and
secrets exported only as fromEnv placeholders. Export sees the whole host, so every test keeps the
documents whose names carry its own prefix."""
from __future__ import annotations

import pytest
import yaml

from helpers import cli, doc, virsh, write

QEMU_ENV = {"RECONCILER_LIBVIRT_URI": "qemu:///system"}


def node(prefix: str, pool_dir: str) -> list[dict]:
    pool = doc("StoragePool", f"{prefix}pool", {"type": "dir", "path": pool_dir})
    base = doc("Disk", f"{prefix}base", {"pool": f"{prefix}pool", "capacity": "64MiB", "format": "qcow2"})
    root = doc("Disk", f"{prefix}root", {"pool": f"{prefix}pool", "capacity": "128MiB", "format": "qcow2",
                                         "backingStore": {"disk": f"{prefix}base"}})
    data = doc("Disk", f"{prefix}data", {"pool": f"{prefix}pool", "capacity": "32MiB", "format": "raw"})
    spare = doc("Disk", f"{prefix}spare", {"pool": f"{prefix}pool", "capacity": "16MiB", "format": "raw"})
    vm = doc("VirtualMachine", f"{prefix}vm", {
        "hypervisor": "qemu", "memory": "128MiB", "maxMemory": "256MiB", "vcpus": 1, "maxVcpus": 2,
        "state": "shutoff", "graphics": "vnc", "description": "exported <&> back", "boot": ["hd", "network"],
        "disks": [{"disk": f"{prefix}root", "target": "vda", "bus": "virtio"},
                  {"disk": f"{prefix}data", "target": "vdb", "bus": "virtio"}],
        "interfaces": [{"network": "default", "model": "virtio"}]}, labels={"site": "plant-3", "role": "gw"})
    return [pool, base, root, data, spare, vm]


def apply_twice(path, uri: str) -> None:
    first = cli("apply", str(path), "--libvirt-uri", uri)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), "--libvirt-uri", uri)
    assert second.code == 0 and "changed=0" in second.recap and "failed=0" in second.recap, second.out


def mine(text: str, prefix: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    return [d for d in docs if d["metadata"]["name"].startswith(prefix)]


def assert_in_sync(path, *args: str, env: dict | None = None) -> None:
    v = cli("validate", str(path), env=env)
    assert v.code == 0, v.out + v.err
    p = cli("plan", str(path), *args, "-o", "json", env=env)
    assert p.code == 0, p.out + p.err
    assert p.json["changes"] == [], p.json["changes"]


@pytest.mark.libvirt
def test_libvirt_round_trip(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)

    exp = cli("export", "--libvirt-uri", qemu_uri)
    assert exp.code == 0, exp.err
    docs = mine(exp.out, prefix)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    # The VM, the disks it uses (backing chain included) and their pool; the unused disk has no
    # owner evidence (volumes carry no marker) and is left out without --all.
    assert kinds == sorted([("StoragePool", f"{prefix}pool"), ("Disk", f"{prefix}base"), ("Disk", f"{prefix}root"),
                            ("Disk", f"{prefix}data"), ("VirtualMachine", f"{prefix}vm")])
    vm = next(d for d in docs if d["kind"] == "VirtualMachine")
    assert vm["metadata"]["labels"] == {"site": "plant-3", "role": "gw"}
    assert vm["spec"]["memory"] == "128MiB" and vm["spec"]["maxMemory"] == "256MiB"
    assert vm["spec"]["disks"][0] == {"disk": f"{prefix}root", "target": "vda", "bus": "virtio"}
    assert vm["spec"]["description"] == "exported <&> back"
    root = next(d for d in docs if d["metadata"]["name"] == f"{prefix}root")
    assert root["spec"]["backingStore"] == {"disk": f"{prefix}base"}

    out = write(tmp_path / "export" / "all.yaml", *docs)
    assert_in_sync(out, "--libvirt-uri", qemu_uri)
    # Applying the export is a no-op, twice.
    apply_twice(out, qemu_uri)

    # --all adds the disk no VM uses.
    everything = mine(cli("export", "--all", "--libvirt-uri", qemu_uri).out, prefix)
    assert ("Disk", f"{prefix}spare") in [(d["kind"], d["metadata"]["name"]) for d in everything]
    assert_in_sync(write(tmp_path / "export" / "everything.yaml", *everything), "--libvirt-uri", qemu_uri)


@pytest.mark.libvirt
def test_kind_filter_keeps_documents_valid_alone(qemu_uri, prefix, pool_dir, tmp_path):
    m = write(tmp_path / "m" / "node.yaml", *node(prefix, pool_dir))
    apply_twice(m, qemu_uri)
    only_vms = cli("export", "--kind", "VirtualMachine", "--libvirt-uri", qemu_uri)
    assert only_vms.code == 0, only_vms.err
    docs = [d for d in yaml.safe_load_all(only_vms.out) if d]
    assert {d["kind"] for d in docs} <= {"VirtualMachine"}
    vm = next(d for d in docs if d["metadata"]["name"] == f"{prefix}vm")
    # Without the Disk documents, the VM's disks are written as files, so it validates alone.
    assert all("path" in x and "disk" not in x for x in vm["spec"]["disks"])
    assert_in_sync(write(tmp_path / "e" / "vm.yaml", vm), "--libvirt-uri", qemu_uri)

    disks = mine(cli("export", "--kind", "Disk", "--kind", "StoragePool", "--libvirt-uri", qemu_uri).out, prefix)
    assert {d["kind"] for d in disks} == {"Disk", "StoragePool"}
    assert_in_sync(write(tmp_path / "e" / "disks.yaml", *disks), "--libvirt-uri", qemu_uri)


UNMARKED = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <devices><disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk></devices>
</domain>
"""


@pytest.mark.libvirt
def test_all_adopts_hand_made_vm(qemu_uri, prefix, tmp_path):
    name = f"{prefix}handmade"
    xml = tmp_path / "dom.xml"
    xml.write_text(UNMARKED.format(name=name))
    virsh(qemu_uri, "define", str(xml))

    managed_only = cli("export", "--kind", "VirtualMachine", "--libvirt-uri", qemu_uri)
    assert managed_only.code == 0 and name not in managed_only.out

    exp = cli("export", "--all", "--kind", "VirtualMachine", "--libvirt-uri", qemu_uri)
    assert exp.code == 0, exp.err
    text = exp.out.split(f"name: {name}")[0].rsplit("---", 1)[1]
    assert "# not marked as managed: applying this adopts it" in text
    # The empty CD-ROM cannot be written in a manifest: that drive alone is left out, with a comment.
    assert "# disk hdc has no file (an empty drive)" in text
    docs = mine(exp.out, prefix)
    assert docs[0]["spec"]["disks"] == []
    path = write(tmp_path / "e" / "vm.yaml", *docs)
    assert cli("validate", str(path)).code == 0
    plan = cli("plan", str(path), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 2
    (change,) = plan.json["changes"]
    assert change["fields"] == ["metadata.managed"]      # adoption only, nothing else differs
    apply_twice(path, qemu_uri)
    assert name in cli("export", "--kind", "VirtualMachine", "--libvirt-uri", qemu_uri).out
    assert "reconciler:owner" in virsh(qemu_uri, "dumpxml", "--inactive", name)


def test_export_asks_for_a_broker_login_only_when_mqtt_kinds_are_named():
    r = cli("export", "--kind", "MqttRole", env={"RECONCILER_MQTT_USERNAME": ""})
    assert r.code == 1
    assert r.err.startswith("error: exporting MqttRole needs the broker's admin login")
    assert "Traceback" not in r.err


# --------------------------------------------------------------------------- pure: build()

def test_build_secrets_are_placeholders_never_values():
    from reconciler.export import build, render
    from reconciler.model import Live, ResourceId, Snapshot
    rid = ResourceId("MqttClient", "sensor-01")
    other = ResourceId("MqttClient", "legacy")
    snap = Snapshot({
        rid: Live(rid, {"clientId": None, "roles": [], "groups": [], "disabled": False, "description": None,
                        "textName": None}, managed=True, facts={"fingerprint": "pbkdf2-sha256$1$x$y"}),
        other: Live(other, {"roles": [], "groups": [], "disabled": True}, managed=False),
    })
    docs, _ = build(snap, {"MqttClient"}, include_all=True)
    text = render(docs)
    assert "password: {fromEnv: MQTT_PASSWORD_SENSOR_01}  # secret not exported" in text
    assert "# password: {fromEnv: MQTT_PASSWORD_LEGACY}" in text
    assert "pbkdf2" not in text
    loaded = [d for d in yaml.safe_load_all(text) if d]
    assert loaded[0]["spec"]["disabled"] is True and "password" not in loaded[0]["spec"]
    assert loaded[1]["spec"]["password"] == {"fromEnv": "MQTT_PASSWORD_SENSOR_01"}


def test_build_leaves_out_what_a_manifest_cannot_express():
    from reconciler.export import build
    from reconciler.model import Live, ResourceId, Snapshot
    p = ResourceId("StoragePool", "iso")
    v = ResourceId("Disk", "debian.iso")
    bad = ResourceId("VirtualMachine", "has space")
    snap = Snapshot({
        p: Live(p, {"type": "dir", "path": "/srv/iso", "autostart": True, "state": "present"}),
        v: Live(v, {"pool": "iso", "capacity": 1000, "format": "iso", "backingStore": None}, facts={"path": "/srv/iso/d"}),
        bad: Live(bad, {}, managed=True),
    })
    docs, notes = build(snap, {"StoragePool", "Disk", "VirtualMachine"}, include_all=True)
    assert [(d.kind, d.name) for d in docs] == [("StoragePool", "iso")]
    assert any("format 'iso'" in n for n in notes) and any("has space" in n for n in notes)
