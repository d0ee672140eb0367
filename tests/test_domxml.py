"""Domain XML <-> manifest shape: what libvirt adds is never drift, and hostile text stays text."""
from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.kinds import PlanContext
from reconciler.kinds.libvirt import VirtualMachineRules
from reconciler.model import HostFacts, Live, Options, Resource, ResourceId
from reconciler.providers.libvirt import domxml

DATA = Path(__file__).parent / "data"


def test_running_qemu_domain_parses_to_declared_fields_only():
    parsed = domxml.parse_domain((DATA / "qemu-running-domain.xml").read_text())
    spec = parsed["spec"]
    assert parsed["managed"] is True and parsed["labels"] == {"role": "gateway", "site": "plant-3"}
    assert spec["hypervisor"] == "qemu" and spec["arch"] == "x86_64"
    # A guest that boots nothing has no balloon driver: the running view reports the full size,
    # which is why memory is compared with the persistent definition only.
    assert spec["memory"] == 512 * 2**20 and spec["maxMemory"] == 512 * 2**20
    config = domxml.parse_domain((DATA / "qemu-inactive-domain.xml").read_text())["spec"]
    assert config["memory"] == 256 * 2**20 and config["maxMemory"] == 512 * 2**20
    assert spec["vcpus"] == 1 and spec["maxVcpus"] == 2
    assert spec["machine"].startswith("pc-i440fx-")
    assert spec["boot"] == ["hd"] and spec["graphics"] == {"type": "none"}
    assert [(d["target"], d["bus"], d["device"]) for d in spec["disks"]] == [("vda", "virtio", "disk"), ("vdb", "virtio", "disk")]
    assert spec["interfaces"] == [] and spec["description"] == "edge gateway (demo)"
    # The noise is there in the XML, and none of it reaches the spec.
    xml = (DATA / "qemu-running-domain.xml").read_text()
    assert "<alias name=" in xml and "<address type='pci'" in xml and "<controller" in xml
    flat = repr(spec)
    assert "alias" not in flat and "pci" not in flat and "controller" not in flat


@pytest.mark.parametrize("name", ["qemu-running-domain.xml", "qemu-inactive-domain.xml"])
def test_the_named_noise_is_all_ignored(name):
    """Deleting everything IGNORED_DOMAIN_NOISE names from a real domain's XML changes nothing parse_domain reads."""
    import xml.etree.ElementTree as ET
    text = (DATA / name).read_text()
    root = ET.fromstring(text)
    removed = 0
    for path in domxml.IGNORED_DOMAIN_NOISE:
        parent_path, _, leaf = path.rpartition("/")
        parents = root.findall(parent_path) if parent_path else [root]
        for parent in parents:
            for el in parent.findall(leaf):
                parent.remove(el)
                removed += 1
    assert removed >= 10, "the fixture must hold the noise this test removes"
    # The UUID is read as the domain's identity (a fact), never compared: all else must be equal.
    without, full = domxml.parse_domain(ET.tostring(root, encoding="unicode")), domxml.parse_domain(text)
    assert {k: v for k, v in without.items() if k != "uuid"} == {k: v for k, v in full.items() if k != "uuid"}


def _desired(spec: dict, labels=None) -> Resource:
    return Resource(ResourceId("VirtualMachine", "demo-gw-1"), VirtualMachineRules.normalise(spec), labels or {},
                    declared=frozenset(spec))


@pytest.mark.parametrize("declared", [
    # each row: a manifest spelling that must match the real domain libvirt made from the demo manifest
    {"hypervisor": "qemu", "memory": "256MiB", "maxMemory": "512MiB", "vcpus": 1, "maxVcpus": 2},
    {"hypervisor": "qemu", "memory": 268435456, "maxMemory": "0.5GiB", "vcpus": 1, "maxVcpus": 2},
    {"hypervisor": "qemu", "memory": "256MiB", "maxMemory": "512MiB", "vcpus": 1, "maxVcpus": 2, "machine": "pc"},
    {"hypervisor": "qemu", "memory": "256MiB", "maxMemory": "512MiB", "vcpus": 1, "maxVcpus": 2, "graphics": "none",
     "boot": ["hd"], "description": "edge gateway (demo)"},
    {"hypervisor": "qemu", "memory": "256MiB", "maxMemory": "512MiB", "vcpus": 1, "maxVcpus": 2, "interfaces": []},
    {"hypervisor": "qemu", "memory": "256MiB", "maxMemory": "512MiB", "vcpus": 1, "maxVcpus": 2,
     "disks": [{"path": "/var/lib/libvirt/images/demo-edge/demo-gw-data", "target": "vdb"},
               {"path": "/var/lib/libvirt/images/demo-edge/demo-gw-root", "target": "vda", "bus": "virtio"}]},
], ids=["units", "bytes-and-fractions", "machine-alias", "defaults", "no-interfaces", "disk-order-and-bus-default"])
def test_normalisation_table_no_false_drift(declared):
    running = domxml.parse_domain((DATA / "qemu-running-domain.xml").read_text())
    config = domxml.parse_domain((DATA / "qemu-inactive-domain.xml").read_text())
    live = Live(ResourceId("VirtualMachine", "demo-gw-1"), config["spec"], config["labels"], True,
                {"state": "running", "autostart": False, "running_spec": running["spec"]})
    machine = running["spec"]["machine"]
    ctx = PlanContext({}, {}, HostFacts(machine_aliases={"x86_64": {"pc": machine}}), Options())
    actions = VirtualMachineRules.classify(_desired(declared, {"role": "gateway", "site": "plant-3"}), live, ctx)
    assert [a.verb for a in actions] == ["noop"], [(a.verb, a.reason) for a in actions]


def test_generated_mac_and_model_are_not_drift_but_a_declared_mac_is():
    from reconciler.kinds.libvirt import _interfaces_match
    have = [{"network": "default", "model": "virtio", "mac": "52:54:00:12:34:56"}]
    assert _interfaces_match([{"network": "default"}], have)
    assert _interfaces_match([{"network": "default", "mac": "52:54:00:12:34:56"}], have)
    assert not _interfaces_match([{"network": "default", "mac": "52:54:00:00:00:01"}], have)
    assert not _interfaces_match([{"bridge": "br0"}], have)


HOSTILE = ["<script>&amp;</script>", "]]> <!-- -->", "quote ' and \" both", "ünïcødé ☃ 𝄞",
           "</description><devices><disk/></devices>", "&lt;already escaped&gt;", "tab\there"]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_round_trips_through_domain_xml(text):
    spec = VirtualMachineRules.normalise({"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "description": text})
    xml = domxml.build_domain("vm", spec, {"note": text}, {})
    parsed = domxml.parse_domain(xml)
    assert parsed["spec"]["description"] == text
    assert parsed["labels"] == {"note": text}
    assert parsed["spec"]["disks"] == []


def test_patch_keeps_what_libvirt_filled_in():
    xml = (DATA / "qemu-inactive-domain.xml").read_text()
    spec = VirtualMachineRules.normalise({"hypervisor": "qemu", "memory": "384MiB", "maxMemory": "512MiB",
                                          "vcpus": 2, "maxVcpus": 2})
    new = domxml.patch_domain(xml, spec, frozenset({"memory", "maxMemory", "vcpus", "maxVcpus"}), {}, {})
    before, after = domxml.parse_domain(xml), domxml.parse_domain(new)
    assert after["uuid"] == before["uuid"]
    assert after["spec"]["memory"] == 384 * 2**20 and after["spec"]["vcpus"] == 2
    assert after["spec"]["disks"] == before["spec"]["disks"]
    assert new.count("<address ") == xml.count("<address ")
