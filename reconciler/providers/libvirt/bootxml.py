"""Pure domain-XML helpers for how a VM boots: direct kernel boot (<os><kernel/initrd/cmdline>) and the
record of its cloud-init seed (a <seed> element in the reconciler's cloud-init metadata namespace, naming
the seed volume, its CD-ROM target and the digest of what was written to it). No libvirt calls."""
from __future__ import annotations

import xml.etree.ElementTree as ET

NS_CI = "https://reconciler.dev/xmlns/cloudinit/v1"
NS_CI_PREFIX = "reconcilerci"
ET.register_namespace(NS_CI_PREFIX, NS_CI)

SEED_BUS = "sata"


def seed_volume_name(vm: str) -> str:
    return f"{vm}-cidata"


def seed_target(disks: list[dict], current: str | None = None) -> str:
    """The seed CD-ROM's target: the one it has, else the first sdX no declared disk uses."""
    if current:
        return current
    used = {d["target"] for d in disks}
    for c in "abcdefghijklmnopqrstuvwxyz":
        if f"sd{c}" not in used:
            return f"sd{c}"
    raise ValueError("no free sdX target for the cloud-init seed")


def read_extras(root: ET.Element, spec: dict) -> None:
    """Adds `kernel` and `cloudInit` to a parsed domain spec, and takes the seed's CD-ROM out of its
    disks (the seed is the VM's own, not a disk a manifest lists)."""
    os_el = root.find("os")
    kernel = None
    if os_el is not None and os_el.find("kernel") is not None:
        kernel = {"path": os_el.findtext("kernel"), "initrd": os_el.findtext("initrd"),
                  "cmdline": os_el.findtext("cmdline")}
    spec["kernel"] = kernel
    seed = root.find(f"metadata/{{{NS_CI}}}seed")
    if seed is None:
        spec["cloudInit"] = None
        return
    target = seed.get("target")
    path = None
    for d in spec.get("disks", []):
        if d.get("target") == target:
            path = d.get("path")
    spec["disks"] = [d for d in spec.get("disks", []) if d.get("target") != target]
    spec["cloudInit"] = {"seed": seed.get("sha256"), "instanceId": seed.get("instance-id"),
                         "pool": seed.get("pool"), "volume": seed.get("volume"), "target": target, "path": path}


def seed_xml(info: dict) -> str:
    """The <seed> marker for virDomainSetMetadata (which adds the namespace itself)."""
    el = ET.Element("seed", _seed_attrs(info))
    return ET.tostring(el, encoding="unicode")


def _seed_attrs(info: dict) -> dict:
    return {"sha256": info["seed"], "instance-id": info["instanceId"], "pool": info["pool"],
            "volume": info["volume"], "target": info["target"]}


def seed_disk_element(info: dict, with_source: bool = True) -> ET.Element:
    """The seed's read-only CD-ROM; without a source it is the empty drive of an eject."""
    el = ET.Element("disk", {"type": "file", "device": "cdrom"})
    ET.SubElement(el, "driver", {"name": "qemu", "type": "raw"})
    if with_source:
        ET.SubElement(el, "source", {"file": info["path"]})
    ET.SubElement(el, "target", {"dev": info["target"], "bus": SEED_BUS})
    ET.SubElement(el, "readonly")
    return el


def decorate(xml: str, spec: dict, declared: frozenset | None, seed: dict | None) -> str:
    """A domain's XML with the declared kernel boot set (when `declared` is None: a new domain, always)
    and, when the VM has a seed, its CD-ROM and marker in place (patch_domain drops a CD-ROM no
    manifest lists, so it is put back here)."""
    root = ET.fromstring(xml)
    if declared is None or "kernel" in declared:
        _set_kernel(root, spec.get("kernel"))
    if seed is not None:
        meta = root.find("metadata")
        if meta is None:
            meta = ET.SubElement(root, "metadata")
        for old in meta.findall(f"{{{NS_CI}}}seed"):
            meta.remove(old)
        meta.append(ET.Element(f"{{{NS_CI}}}seed", _seed_attrs(seed)))
        devices = root.find("devices")
        if devices is None:
            devices = ET.SubElement(root, "devices")
        for el in devices.findall("disk"):
            tgt = el.find("target")
            if tgt is not None and tgt.get("dev") == seed["target"]:
                src = el.find("source")
                if el.get("device") == "cdrom" and src is not None and src.get("file") == seed["path"]:
                    break
                devices.remove(el)
        else:
            devices.insert(_after_disks(devices), seed_disk_element(seed))
    return ET.tostring(root, encoding="unicode")


def _after_disks(devices: ET.Element) -> int:
    at = 0
    for i, el in enumerate(list(devices)):
        if el.tag in ("emulator", "disk"):
            at = i + 1
    return at


def _set_kernel(root: ET.Element, kernel: dict | None) -> None:
    os_el = root.find("os")
    if os_el is None:
        os_el = ET.SubElement(root, "os")
    for tag in ("kernel", "initrd", "cmdline"):
        for el in os_el.findall(tag):
            os_el.remove(el)
    if not kernel:
        return
    # libvirt's schema wants them after <type> and <loader>, before <boot>.
    at = 0
    for i, el in enumerate(list(os_el)):
        if el.tag in ("type", "loader", "nvram"):
            at = i + 1
    for tag in ("kernel", "initrd", "cmdline"):
        if kernel.get("path" if tag == "kernel" else tag):
            el = ET.Element(tag)
            el.text = kernel["path" if tag == "kernel" else tag]
            os_el.insert(at, el)
            at += 1
