"""Domain, pool and volume XML <-> manifest-shaped dicts. Pure: no libvirt calls, XML only through
ElementTree, never string formatting, so hostile text in names, descriptions and labels stays text."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

NS = "https://reconciler.dev/xmlns/domain/v1"
NS_PREFIX = "reconciler"
ET.register_namespace(NS_PREFIX, NS)

# What libvirt adds or chooses by itself, which we never read, so it can never show as drift: the one
# list of ignored noise. Each entry is an ElementTree path below <domain>; parse_domain reads only the
# declared fields, and tests/test_domxml.py proves that deleting all of this from a real domain's XML
# changes nothing it reads. (Also ignored: a MAC the manifest does not declare, the versioned machine
# type behind an alias such as pc -> pc-i440fx-7.2, and metadata of other namespaces.)
IGNORED_DOMAIN_NOISE = (
    "uuid",                          # generated at define, kept across updates; read as identity, never compared
    "resource", "seclabel", "cpu", "clock", "pm", "features", "on_poweroff", "on_reboot", "on_crash",
    "devices/emulator",
    "devices/*/address",             # PCI/drive addresses libvirt assigns
    "devices/*/alias",               # device aliases of a running domain
    "devices/interface/target",      # host-side tap names
    "devices/disk/driver",
    "devices/controller", "devices/input", "devices/memballoon", "devices/video", "devices/serial",
    "devices/console", "devices/channel", "devices/audio", "devices/sound",
)

KIB = 1024

# What a manifest can express is the kind's rule; the XML side only keeps the rest untouched.
from ...kinds.libvirt import inexpressible_disk, inexpressible_interface  # noqa: E402
from . import bootxml  # noqa: E402


def _text(el: ET.Element | None, default: Any = None) -> Any:
    return el.text if el is not None and el.text is not None else default


def _kib(el: ET.Element | None) -> int | None:
    if el is None or el.text is None:
        return None
    unit = el.get("unit", "KiB")
    factor = {"b": 1, "bytes": 1, "KiB": KIB, "k": KIB, "MiB": KIB**2, "M": KIB**2, "GiB": KIB**3, "G": KIB**3,
              "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TiB": KIB**4, "T": KIB**4}.get(unit, KIB)
    return int(el.text) * factor


# --------------------------------------------------------------------------- domains

def parse_domain(xml: str) -> dict[str, Any]:
    """A domain's XML as {name, uuid, spec, labels, managed}; spec in manifest shape, bytes, paths."""
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    vcpu = root.find("vcpu")
    max_vcpus = int(vcpu.text) if vcpu is not None and vcpu.text else 1
    cur_vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else max_vcpus
    max_mem = _kib(root.find("memory"))
    cur_mem = _kib(root.find("currentMemory")) or max_mem
    disks = [e for e in (_disk_entry(d) for d in root.findall("devices/disk")) if e is not None]
    interfaces = [_interface_entry(i) for i in root.findall("devices/interface")]
    g = root.find("devices/graphics")
    if g is None:
        graphics = {"type": "none"}
    else:
        listen = g.get("listen")
        le = g.find("listen")
        if le is not None and le.get("address"):
            listen = le.get("address")
        graphics = {"type": g.get("type"), "listen": listen or "127.0.0.1"}
    desc = _text(root.find("description"))
    owner = root.find(f"metadata/{{{NS}}}owner")
    labels = {}
    managed = False
    scope = None
    if owner is not None:
        managed = owner.get("managed") == "true"
        scope = owner.get("scope", "default")
        for lab in owner.findall(f"{{{NS}}}label"):
            labels[lab.get("key", "")] = lab.text or ""
    spec = {
        "hypervisor": root.get("type"),
        "memory": cur_mem,
        "maxMemory": max_mem,
        "vcpus": cur_vcpus,
        "maxVcpus": max_vcpus,
        "arch": os_type.get("arch") if os_type is not None else None,
        "machine": os_type.get("machine") if os_type is not None else None,
        "boot": [b.get("dev") for b in root.findall("os/boot")],
        "disks": disks,
        "interfaces": interfaces,
        "graphics": graphics,
        "description": desc,
    }
    # Direct kernel boot and the cloud-init seed (whose CD-ROM leaves `disks`): bootxml's business.
    bootxml.read_extras(root, spec)
    return {"name": _text(root.find("name")), "uuid": _text(root.find("uuid")), "spec": spec,
            "labels": labels, "managed": managed, "scope": scope, "records": parse_records(root)}


def _disk_entry(d: ET.Element) -> dict | None:
    """One <disk> as {target, bus, device, path}; path None for an empty drive."""
    src = d.find("source")
    path = None
    if src is not None:
        path = src.get("file") or src.get("dev") or (
            f"volume:{src.get('pool')}/{src.get('volume')}" if src.get("volume") else None)
    tgt = d.find("target")
    if tgt is None:
        return None
    return {"target": tgt.get("dev"), "bus": tgt.get("bus"), "device": d.get("device", "disk"), "path": path}


def _interface_entry(i: ET.Element) -> dict:
    """One <interface> in manifest shape: network, bridge or user (else its libvirt type), model, mac."""
    src = i.find("source")
    entry: dict[str, Any] = {}
    if i.get("type") == "network" and src is not None:
        entry["network"] = src.get("network")
    elif i.get("type") == "bridge" and src is not None:
        entry["bridge"] = src.get("bridge")
    elif i.get("type") == "user":
        entry["user"] = True
    else:
        entry["type"] = i.get("type")
    model = i.find("model")
    if model is not None:
        entry["model"] = model.get("type")
    mac = i.find("mac")
    if mac is not None and mac.get("address"):
        entry["mac"] = mac.get("address").lower()
    return entry


def owner_element(labels: dict[str, str], scope: str = "default") -> ET.Element:
    """The ownership marker: <reconciler:owner managed="true" scope="..."> with the labels inside."""
    owner = ET.Element(f"{{{NS}}}owner", {"managed": "true", "scope": scope})
    for k in sorted(labels):
        lab = ET.SubElement(owner, f"{{{NS}}}label", {"key": k})
        lab.text = labels[k]
    return owner


def owner_xml(labels: dict[str, str], scope: str = "default") -> str:
    """The marker for virDomainSetMetadata, which wants it without a namespace and adds its own."""
    owner = ET.Element("owner", {"managed": "true", "scope": scope})
    for k in sorted(labels):
        ET.SubElement(owner, "label", {"key": k}).text = labels[k]
    return ET.tostring(owner, encoding="unicode")


def disk_element(d: dict, source_path: str, fmt: str | None) -> ET.Element:
    """A <disk> device; `source_path` is the resolved file of the Disk or path."""
    el = ET.Element("disk", {"type": "file", "device": d.get("device", "disk")})
    drv = ET.SubElement(el, "driver", {"name": "qemu", "type": fmt or "raw"})
    if d.get("device") == "cdrom":
        drv.set("type", fmt or "raw")
    ET.SubElement(el, "source", {"file": source_path})
    ET.SubElement(el, "target", {"dev": d["target"], "bus": d["bus"]})
    if d.get("device") == "cdrom":
        ET.SubElement(el, "readonly")
    return el


def _interface_element(i: dict) -> ET.Element:
    if "network" in i:
        el = ET.Element("interface", {"type": "network"})
        ET.SubElement(el, "source", {"network": i["network"]})
    elif i.get("user"):
        # QEMU's user-mode network: no host device, so no <source>.
        el = ET.Element("interface", {"type": "user"})
    else:
        el = ET.Element("interface", {"type": "bridge"})
        ET.SubElement(el, "source", {"bridge": i["bridge"]})
    if i.get("mac"):
        ET.SubElement(el, "mac", {"address": i["mac"]})
    if i.get("model"):
        ET.SubElement(el, "model", {"type": i["model"]})
    return el


def _graphics_element(g: dict) -> ET.Element | None:
    if g["type"] == "none":
        return None
    el = ET.Element("graphics", {"type": g["type"], "autoport": "yes", "listen": g["listen"]})
    ET.SubElement(el, "listen", {"type": "address", "address": g["listen"]})
    return el


def _set_memory(root: ET.Element, spec: dict) -> None:
    """memory is the balloon target (currentMemory); maxMemory the boot-time size (memory).
    Undeclared, the boot-time size is kept unless it is too small for memory."""
    mem = spec["memory"]
    max_mem = spec.get("maxMemory")
    if max_mem is None:
        max_mem = max(_kib(root.find("memory")) or 0, mem)
    for tag, value in (("memory", max_mem), ("currentMemory", mem)):
        el = root.find(tag)
        if el is None:
            el = ET.SubElement(root, tag)
        el.attrib.clear()
        el.set("unit", "KiB")
        el.text = str(value // KIB)


def _set_vcpus(root: ET.Element, spec: dict) -> None:
    el = root.find("vcpu")
    if el is None:
        el = ET.SubElement(root, "vcpu", {"placement": "static"})
    cur_max = int(el.text) if el.text else 0
    mx = spec.get("maxVcpus") or max(cur_max, spec["vcpus"])
    el.text = str(mx)
    if spec["vcpus"] != mx:
        el.set("current", str(spec["vcpus"]))
    elif "current" in el.attrib:
        del el.attrib["current"]


def _set_description(root: ET.Element, text: str | None) -> None:
    el = root.find("description")
    if text is None:
        if el is not None:
            root.remove(el)
        return
    if el is None:
        el = ET.Element("description")
        root.insert(2, el)
    el.text = text


def _set_owner(root: ET.Element, labels: dict, scope: str) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(3, meta)
    for old in meta.findall(f"{{{NS}}}owner"):
        meta.remove(old)
    meta.append(owner_element(labels, scope))


def build_domain(name: str, spec: dict, labels: dict, disk_sources: dict[str, tuple[str, str | None]],
                 uuid: str | None = None, scope: str = "default") -> str:
    """A new domain's XML. `disk_sources` maps each disk target to its (file, format)."""
    root = ET.Element("domain", {"type": spec["hypervisor"]})
    ET.SubElement(root, "name").text = name
    if uuid:
        ET.SubElement(root, "uuid").text = uuid
    if spec.get("description") is not None:
        ET.SubElement(root, "description").text = spec["description"]
    ET.SubElement(root, "metadata").append(owner_element(labels, scope))
    _set_memory(root, spec)
    _set_vcpus(root, spec)
    os_el = ET.SubElement(root, "os")
    t = ET.SubElement(os_el, "type", {"arch": spec["arch"]})
    if spec.get("machine"):
        t.set("machine", spec["machine"])
    t.text = "hvm"
    for dev in spec.get("boot") or ["hd"]:
        ET.SubElement(os_el, "boot", {"dev": dev})
    if spec["hypervisor"] != "test":
        # ACPI lets a guest shut down gracefully and is needed for PCI hotplug of disks.
        feats = ET.SubElement(root, "features")
        ET.SubElement(feats, "acpi")
        ET.SubElement(feats, "apic")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "restart"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    _fill_devices(devices, spec, disk_sources)
    return ET.tostring(root, encoding="unicode")


def _fill_devices(devices: ET.Element, spec: dict, disk_sources: dict) -> None:
    for d in spec.get("disks", []):
        path, fmt = disk_sources[d["target"]]
        devices.append(disk_element(d, path, fmt))
    for i in spec.get("interfaces", []):
        devices.append(_interface_element(i))
    g = _graphics_element(spec.get("graphics") or {"type": "none"})
    if g is not None:
        devices.append(g)


def patch_domain(xml: str, spec: dict, declared: frozenset, labels: dict,
                 disk_sources: dict[str, tuple[str, str | None]], scope: str = "default") -> str:
    """The persistent definition with the declared fields set to `spec`; everything libvirt filled
    in (UUID, addresses, controllers, generated MACs) is kept as it is."""
    root = ET.fromstring(xml)
    _set_memory(root, spec)
    _set_vcpus(root, spec)
    _set_description(root, spec.get("description") if "description" in declared else _text(root.find("description")))
    _set_owner(root, labels, scope)
    os_el = root.find("os")
    if "boot" in declared and os_el is not None:
        for b in os_el.findall("boot"):
            os_el.remove(b)
        idx = list(os_el).index(os_el.find("type")) + 1 if os_el.find("type") is not None else 0
        for n, dev in enumerate(spec["boot"]):
            os_el.insert(idx + n, ET.Element("boot", {"dev": dev}))
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    if "disks" in declared:
        want = {d["target"]: d for d in spec["disks"]}
        for el in devices.findall("disk"):
            tgt = el.find("target")
            dev = tgt.get("dev") if tgt is not None else None
            d = want.pop(dev, None) if dev else None
            if d is None:
                entry = _disk_entry(el)
                # A device no manifest can declare (an empty CD-ROM drive) is never compared, so never removed.
                if entry is None or inexpressible_disk(entry) is None:
                    devices.remove(el)
                continue
            path, fmt = disk_sources[dev]
            src = el.find("source")
            current = src.get("file") if src is not None else None
            if current != path or el.get("device", "disk") != d["device"] or (tgt.get("bus") != d["bus"]):
                # A changed device is re-created without its old address so libvirt assigns a fitting one.
                idx = list(devices).index(el)
                devices.remove(el)
                devices.insert(idx, disk_element(d, path, fmt))
        for d in spec["disks"]:
            if d["target"] in want:
                path, fmt = disk_sources[d["target"]]
                devices.append(disk_element(d, path, fmt))
    if "interfaces" in declared:
        # Interfaces a manifest cannot express (macvtap, hostdev, ...) are neither compared nor touched.
        existing = [el for el in devices.findall("interface") if inexpressible_interface(_interface_entry(el)) is None]
        for n, i in enumerate(spec["interfaces"]):
            if n < len(existing) and interface_matches(i, existing[n]):
                continue
            new = _interface_element(i)
            if n < len(existing):
                idx = list(devices).index(existing[n])
                devices.remove(existing[n])
                devices.insert(idx, new)
            else:
                devices.append(new)
        for extra in existing[len(spec["interfaces"]):]:
            devices.remove(extra)
    if "graphics" in declared:
        current = devices.findall("graphics")
        g = _graphics_element(spec["graphics"])
        have = parse_graphics(current[0]) if current else {"type": "none"}
        if have != spec["graphics"]:
            for el in current:
                devices.remove(el)
            if g is not None:
                devices.append(g)
    return ET.tostring(root, encoding="unicode")


def parse_graphics(g: ET.Element) -> dict:
    listen = g.get("listen")
    le = g.find("listen")
    if le is not None and le.get("address"):
        listen = le.get("address")
    return {"type": g.get("type"), "listen": listen or "127.0.0.1"}


def interface_matches(want: dict, el: ET.Element) -> bool:
    src = el.find("source")
    if "network" in want:
        if el.get("type") != "network" or src is None or src.get("network") != want["network"]:
            return False
    elif want.get("user"):
        if el.get("type") != "user":
            return False
    elif el.get("type") != "bridge" or src is None or src.get("bridge") != want.get("bridge"):
        return False
    model = el.find("model")
    if "model" in want and (model is None or model.get("type") != want["model"]):
        return False
    mac = el.find("mac")
    if "mac" in want and (mac is None or (mac.get("address") or "").lower() != want["mac"]):
        return False
    return True


def disk_source(disk_xml: str) -> str | None:
    """The file (or device) of one <disk> element's XML."""
    e = _disk_entry(ET.fromstring(disk_xml))
    return e["path"] if e else None


def find_disk_xml(xml: str, target: str) -> str | None:
    """The <disk> element of a target in a domain's XML, as libvirt wants it for detach."""
    root = ET.fromstring(xml)
    for el in root.findall("devices/disk"):
        tgt = el.find("target")
        if tgt is not None and tgt.get("dev") == target:
            return ET.tostring(el, encoding="unicode")
    return None


# --------------------------------------------------------------------------- pools and volumes

def parse_pool(xml: str) -> dict:
    root = ET.fromstring(xml)
    return {"name": _text(root.find("name")), "type": root.get("type"), "path": _text(root.find("target/path"))}


def build_pool(name: str, spec: dict) -> str:
    root = ET.Element("pool", {"type": spec["type"]})
    ET.SubElement(root, "name").text = name
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "path").text = spec["path"]
    return ET.tostring(root, encoding="unicode")


def parse_volume(xml: str) -> dict:
    root = ET.fromstring(xml)
    fmt = root.find("target/format")
    backing = _text(root.find("backingStore/path"))
    return {"name": _text(root.find("name")), "capacity": _kib_bytes(root.find("capacity")),
            "format": fmt.get("type") if fmt is not None else None, "path": _text(root.find("target/path")),
            "backingStore": backing}


def _kib_bytes(el: ET.Element | None) -> int:
    if el is None or el.text is None:
        return 0
    return _kib(el) if el.get("unit") else int(el.text)


def build_volume(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", {"unit": "bytes"}).text = str(capacity)
    ET.SubElement(root, "allocation", {"unit": "bytes"}).text = "0"
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", {"type": fmt})
    if backing is not None:
        b = ET.SubElement(root, "backingStore")
        ET.SubElement(b, "path").text = backing[0]
        ET.SubElement(b, "format", {"type": backing[1]})
    return ET.tostring(root, encoding="unicode")


# --------------------------------------------------------------------------- backup records on the marker

# What the reconciler did to a domain that must outlive a run: the snapshots it took (so a vanished one is
# reported, never retaken) and the restores it ran (so each runs once). Kept in its own metadata element
# beside the owner marker, so that a labels or scope update (which rewrites the owner) never drops them.
RECORDS_NS = "https://reconciler.dev/xmlns/records/v1"
RECORDS_PREFIX = "reconciler-records"
ET.register_namespace(RECORDS_PREFIX, RECORDS_NS)


def parse_records(root: ET.Element) -> dict:
    """{"snapshots": {name: {memory, taken}}, "restores": {name: {done, source}}} from a domain's XML."""
    out: dict = {"snapshots": {}, "restores": {}}
    el = root.find(f"metadata/{{{RECORDS_NS}}}records")
    if el is None:
        return out
    for s in el.findall(f"{{{RECORDS_NS}}}snapshot"):
        out["snapshots"][s.get("name", "")] = {"memory": s.get("memory") == "true", "taken": int(s.get("taken", "0"))}
    for r in el.findall(f"{{{RECORDS_NS}}}restore"):
        out["restores"][r.get("name", "")] = {"done": int(r.get("done", "0")), "source": r.get("source", "")}
    return out


def records_of(xml: str) -> dict:
    return parse_records(ET.fromstring(xml))


def _records_element(records: dict, tag: str) -> ET.Element:
    el = ET.Element(tag)
    ns = tag[:-len("records")]
    for name in sorted(records.get("snapshots", {})):
        s = records["snapshots"][name]
        ET.SubElement(el, f"{ns}snapshot", {"name": name, "memory": "true" if s["memory"] else "false",
                                            "taken": str(int(s["taken"]))})
    for name in sorted(records.get("restores", {})):
        r = records["restores"][name]
        ET.SubElement(el, f"{ns}restore", {"name": name, "done": str(int(r["done"])), "source": r.get("source", "")})
    return el


def records_xml(records: dict) -> str:
    """The records element for virDomainSetMetadata (without a namespace: libvirt adds its own)."""
    return ET.tostring(_records_element(records, "records"), encoding="unicode")


def with_records(xml: str, records: dict) -> str:
    """A domain's XML with its records element replaced (to redefine a domain after a revert)."""
    root = ET.fromstring(xml)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{{{RECORDS_NS}}}records"):
        meta.remove(old)
    meta.append(_records_element(records, f"{{{RECORDS_NS}}}records"))
    return ET.tostring(root, encoding="unicode")
