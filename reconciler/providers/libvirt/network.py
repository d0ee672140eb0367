"""libvirt virtual networks: the bulk read into Live objects, network XML both ways, and one side effect
per planned action. DHCP hosts and ranges change through virNetworkUpdate (LIVE|CONFIG on an active
network), so the network keeps its UUID and its dnsmasq, and no guest loses its link."""
from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import libvirt

from ...model import Action, Live, Options, ResourceId, Snapshot
from .handlers import handles, reads

if TYPE_CHECKING:
    from .provider import LibvirtProvider

SECTION_RANGE = libvirt.VIR_NETWORK_SECTION_IP_DHCP_RANGE
SECTION_HOST = libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST


# --------------------------------------------------------------------------- XML (pure)

def parse_network(xml: str) -> tuple[dict, list[str]]:
    """A network's XML as the manifest-shaped spec, and what in it a manifest cannot express."""
    root = ET.fromstring(xml)
    extra: list[str] = []
    fwd = root.find("forward")
    mode = "isolated" if fwd is None else fwd.get("mode", "nat")
    br = root.find("bridge")
    spec: dict[str, Any] = {"mode": mode, "bridge": br.get("name") if br is not None else None, "ipv4": None,
                            "dhcp": None}
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") != "ipv4" or spec["ipv4"] is not None:
            extra.append(f"ip {ip.get('address')}")
            continue
        prefix = ip.get("prefix")
        if prefix is None and ip.get("netmask"):
            prefix = str(ipaddress.IPv4Network(f"0.0.0.0/{ip.get('netmask')}").prefixlen)
        spec["ipv4"] = f"{ip.get('address')}/{prefix or 24}"
        dhcp = ip.find("dhcp")
        if dhcp is not None:
            ranges = dhcp.findall("range")
            hosts = sorted(({"mac": (h.get("mac") or "").lower(), "ip": h.get("ip"),
                             **({"name": h.get("name")} if h.get("name") else {})}
                            for h in dhcp.findall("host") if h.get("mac")), key=lambda h: h["mac"])
            spec["dhcp"] = {"start": ranges[0].get("start") if ranges else None,
                            "end": ranges[0].get("end") if ranges else None, "hosts": hosts}
            if len(ranges) > 1:
                extra.append(f"{len(ranges) - 1} more DHCP range(s)")
    return spec, extra


def build_network(name: str, spec: dict) -> str:
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    _fill(root, spec)
    return ET.tostring(root, encoding="unicode")


def patch_network(xml: str, spec: dict, declared: frozenset) -> str:
    """The persistent definition with mode, bridge, ipv4 and DHCP as declared; UUID and MAC kept."""
    root = ET.fromstring(xml)
    keep_bridge = root.find("bridge") if "bridge" not in declared else None
    for tag in ("forward", "ip"):
        for el in root.findall(tag):
            root.remove(el)
    if "bridge" in declared or spec["mode"] == "bridge":
        for el in root.findall("bridge"):
            root.remove(el)
    _fill(root, spec, keep_bridge is not None)
    return ET.tostring(root, encoding="unicode")


def _fill(root: ET.Element, spec: dict, has_bridge: bool = False) -> None:
    if spec["mode"] == "nat":
        ET.SubElement(root, "forward", {"mode": "nat"})
    elif spec["mode"] == "bridge":
        ET.SubElement(root, "forward", {"mode": "bridge"})
    if spec.get("bridge") and not has_bridge:
        attrs = {"name": spec["bridge"]}
        if spec["mode"] != "bridge":
            attrs.update(stp="on", delay="0")
        ET.SubElement(root, "bridge", attrs)
    if spec.get("ipv4") and spec["mode"] != "bridge":
        iface = ipaddress.IPv4Interface(spec["ipv4"])
        ip = ET.SubElement(root, "ip", {"address": str(iface.ip), "prefix": str(iface.network.prefixlen)})
        d = spec.get("dhcp")
        if d:
            dhcp = ET.SubElement(ip, "dhcp")
            if d.get("start"):
                dhcp.append(range_element(d))
            for h in d.get("hosts", []):
                dhcp.append(host_element(h))


def range_element(d: dict) -> ET.Element:
    return ET.Element("range", {"start": d["start"], "end": d["end"]})


def host_element(h: dict) -> ET.Element:
    attrs = {"mac": h["mac"], "ip": h["ip"]}
    if h.get("name"):
        attrs["name"] = h["name"]
    return ET.Element("host", attrs)


def _xml(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


# --------------------------------------------------------------------------- reading

@reads("Network")
def read_networks(p: "LibvirtProvider", conn: libvirt.virConnect, core: Snapshot) -> Snapshot:
    objects: dict[ResourceId, Live] = {}
    for net in conn.listAllNetworks(0):
        try:
            name = net.name()
            active = bool(net.isActive())
            try:
                inactive = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                inactive = net.XMLDesc(0)   # the test driver knows no INACTIVE flag (unsupported flags 0x1)
            spec, extra = parse_network(inactive)
            running = parse_network(net.XMLDesc(0))[0] if active else None
            autostart = bool(net.autostart())
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                continue   # deleted by another tool since the list
            raise
        rid = ResourceId("Network", name)
        objects[rid] = Live(rid, spec, facts={"active": active, "autostart": autostart, "running_spec": running,
                                              "extra": extra, "uuid": net.UUIDString()})
    return Snapshot(objects)


# --------------------------------------------------------------------------- applying

def _lookup(p: "LibvirtProvider", name: str) -> libvirt.virNetwork:
    return p.conn.networkLookupByName(name)


@handles("create", "Network")
def create_network(p: "LibvirtProvider", a: Action, o: Options) -> str:
    spec = a.desired.spec
    try:
        net = _lookup(p, a.id.name)    # an earlier run defined it and was stopped: finish it
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise
        net = p.conn.networkDefineXML(build_network(a.id.name, spec))
    net.setAutostart(1 if spec["autostart"] else 0)
    if spec["state"] == "active" and not net.isActive():
        net.create()
    return f"defined ({spec['mode']})" + (" and started" if spec["state"] == "active" else "")


@handles("update", "Network")
def update_network(p: "LibvirtProvider", a: Action, o: Options) -> str:
    spec = a.desired.spec
    net = _lookup(p, a.id.name)
    active = bool(net.isActive())
    by_path = {c.path: c for c in a.changes}
    notes = []
    if any(c.mode in ("config", "restart") for c in a.changes):
        # Restart-class fields (and DHCP changes riding with them) go into the persistent definition;
        # the running network keeps its old one until the planned restart.
        xml = patch_network(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE), spec, a.desired.declared)
        net = p.conn.networkDefineXML(xml)
        notes.append("definition rewritten")
    live = [c for c in a.changes if c.mode == "live" and c.path.startswith("spec.dhcp")]
    if live:
        flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG | (libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE if active else 0)
        have = (a.live.facts.get("running_spec") if active else None) or a.live.spec
        _update_dhcp(net, have.get("dhcp") or {}, spec["dhcp"] or {}, flags)
        notes.append("DHCP updated " + ("live (same network, dnsmasq kept)" if active else "in the definition"))
    if "spec.autostart" in by_path:
        net.setAutostart(1 if spec["autostart"] else 0)
    if "spec.state" in by_path:
        if spec["state"] == "active" and not net.isActive():
            net.create()
        elif spec["state"] == "inactive" and net.isActive():
            net.destroy()
    return "updated " + ", ".join(c.path for c in a.changes) + (f" ({'; '.join(notes)})" if notes else "")


def _update_dhcp(net: libvirt.virNetwork, have: dict, want: dict, flags: int) -> None:
    """Hosts by MAC (deleted, modified, added) and the range, each one virNetworkUpdate."""
    old = {h["mac"]: h for h in have.get("hosts", [])}
    new = {h["mac"]: h for h in want.get("hosts", [])}
    for mac in sorted(old.keys() - new.keys()):
        net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, SECTION_HOST, -1, _xml(host_element(old[mac])), flags)
    for mac in sorted(old.keys() & new.keys()):
        if old[mac] != new[mac]:
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY, SECTION_HOST, -1, _xml(host_element(new[mac])), flags)
    if (have.get("start"), have.get("end")) != (want.get("start"), want.get("end")):
        if have.get("start"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, SECTION_RANGE, -1, _xml(range_element(have)), flags)
        if want.get("start"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, SECTION_RANGE, -1, _xml(range_element(want)), flags)
    for mac in sorted(new.keys() - old.keys()):
        net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, SECTION_HOST, -1, _xml(host_element(new[mac])), flags)


@handles("restart", "Network")
def restart_network(p: "LibvirtProvider", a: Action, o: Options) -> str:
    net = _lookup(p, a.id.name)
    if net.isActive():
        net.destroy()
    net.create()
    return "restarted for " + ", ".join(a.fields)


@handles("delete", "Network")
def delete_network(p: "LibvirtProvider", a: Action, o: Options) -> str:
    try:
        net = _lookup(p, a.id.name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return "already gone"
        raise
    if net.isActive():
        net.destroy()
    try:
        net.undefine()
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:   # a transient network is gone once destroyed
            raise
    return "stopped and undefined"
