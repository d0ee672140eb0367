"""PURE rules of the Network kind (a libvirt virtual network: nat, isolated, or a host bridge): offline
checks of addresses, normalising, and classifying desired vs live. DHCP ranges and static hosts change
live (virNetworkUpdate: same UUID, dnsmasq keeps running, no guest loses its link); mode, bridge and
ipv4 are restart-class: the definition is rewritten at once, the running network is restarted only
under --allow-restart, and the plan names the running VMs attached. Networks carry no marker (libvirt
keeps no metadata on networks): like pools they go only by `state: absent`, refused while a defined
VM uses the network."""
from __future__ import annotations

import ipaddress
from typing import Any

from ..model import Action, FieldChange, Live, Resource
from .context import PlanContext

# libvirt's own, created by the libvirt-daemon-config-network package: never touched unless declared.
RESTART_FIELDS = ("mode", "bridge", "ipv4")


def _iface(spec: dict) -> ipaddress.IPv4Interface | None:
    return ipaddress.IPv4Interface(spec["ipv4"]) if spec.get("ipv4") else None


def _users(ctx: PlanContext, name: str, running_only: bool) -> list[str]:
    """VMs on the host whose interfaces use this network (defined, or running only), and that stay."""
    out = []
    for vid, vm in ctx.objects.items():
        if vid.kind != "VirtualMachine":
            continue
        if not any(i.get("network") == name for i in vm.spec.get("interfaces", ())):
            continue
        if running_only and vm.facts.get("state") not in ("running", "paused"):
            continue
        want = ctx.desired.get(vid)
        if not running_only and want is not None and want.spec.get("state") == "absent":
            continue
        out.append(vid.name)
    return sorted(out)


class NetworkRules:
    kind = "Network"
    target = "libvirt"
    prunable = False

    @staticmethod
    def check(name: str, spec: dict):
        out: list[tuple[tuple, str]] = []
        mode = spec.get("mode", "nat")
        if mode == "bridge":
            if not spec.get("bridge"):
                out.append((("spec", "bridge"), "mode bridge attaches guests to an existing host bridge: name it in bridge"))
            for f in ("ipv4", "dhcp"):
                if f in spec:
                    out.append((("spec", f), f"mode bridge uses the host bridge's own addressing: remove {f}"))
            return out
        try:
            iface = _iface(spec)
        except ValueError as e:
            return [(("spec", "ipv4"), f"ipv4 must be an address and prefix such as 10.77.0.1/24 ({e})")]
        if iface is not None and iface.ip == iface.network.network_address:
            out.append((("spec", "ipv4"), f"{spec['ipv4']} is the network's own address; give the host's, such as "
                                          f"{next(iface.network.hosts())}/{iface.network.prefixlen}"))
        dhcp = spec.get("dhcp")
        if dhcp is None:
            return out
        if iface is None:
            return out + [(("spec", "dhcp"), "dhcp needs ipv4 (the host's address on the network)")]
        net = iface.network

        def inside(path: tuple, value: str) -> ipaddress.IPv4Address | None:
            try:
                a = ipaddress.IPv4Address(value)
            except ValueError:
                out.append((path, f"{value!r} is not an IPv4 address"))
                return None
            if a not in net:
                out.append((path, f"{value} is outside {net}"))
            elif a == iface.ip:
                out.append((path, f"{value} is the host's own address on the network"))
            return a
        start = inside(("spec", "dhcp", "start"), dhcp["start"]) if "start" in dhcp else None
        end = inside(("spec", "dhcp", "end"), dhcp["end"]) if "end" in dhcp else None
        if ("start" in dhcp) != ("end" in dhcp):
            out.append((("spec", "dhcp"), "a DHCP range needs both start and end"))
        if start is not None and end is not None and start > end:
            out.append((("spec", "dhcp", "start"), f"start {start} is after end {end}"))
        macs: dict[str, int] = {}
        ips: dict[str, int] = {}
        for i, h in enumerate(dhcp.get("hosts", [])):
            inside(("spec", "dhcp", "hosts", i, "ip"), h["ip"])
            mac = h["mac"].lower()
            if mac in macs:
                out.append((("spec", "dhcp", "hosts", i, "mac"), f"MAC {h['mac']} is listed twice"))
            if h["ip"] in ips:
                out.append((("spec", "dhcp", "hosts", i, "ip"), f"{h['ip']} is given to two hosts"))
            macs[mac] = i
            ips[h["ip"]] = i
        return out

    @staticmethod
    def normalise(spec: dict) -> dict:
        mode = spec.get("mode", "nat")
        dhcp = spec.get("dhcp")
        ipv4 = str(_iface(spec)) if spec.get("ipv4") else None
        return {
            "mode": mode,
            "bridge": spec.get("bridge"),
            "ipv4": ipv4,
            "dhcp": None if dhcp is None else {
                "start": dhcp.get("start"), "end": dhcp.get("end"),
                "hosts": sorted(({"mac": h["mac"].lower(), "ip": h["ip"], **({"name": h["name"]} if h.get("name") else {})}
                                 for h in dhcp.get("hosts", [])), key=lambda h: h["mac"])},
            "autostart": spec.get("autostart", True),
            "state": spec.get("state", "active"),
        }

    @staticmethod
    def references(spec: dict):
        return []

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        if d["state"] == "absent":
            if live is None:
                return [Action("noop", r.id, "absent as declared", desired=r)]
            users = _users(ctx, r.id.name, running_only=False)
            refused = f"still used by VirtualMachine {', '.join(users)}" if users else None
            return [Action("delete", r.id, "state: absent", desired=r, live=live, refused=refused)]
        if live is None:
            return [Action("create", r.id, "network does not exist", desired=r,
                           changes=(FieldChange("spec.mode", None, d["mode"], "config"),))]
        l = live.spec
        active = bool(live.facts.get("active"))
        changes: list[FieldChange] = []
        restart: list[str] = []
        run = live.facts.get("running_spec") if active else None
        for f in RESTART_FIELDS:
            # An undeclared bridge name is libvirt's choice (virbrN), never drift.
            if f == "bridge" and "bridge" not in r.declared:
                continue
            if d[f] != l.get(f):
                changes.append(FieldChange(f"spec.{f}", l.get(f), d[f], "restart" if active else "config"))
            # The running network is compared too: a definition rewritten by an earlier apply without
            # --allow-restart still waits for its restart.
            if run is not None and d[f] != run.get(f) or run is None and active and d[f] != l.get(f):
                restart.append(f"spec.{f}")
        if "dhcp" in r.declared or l.get("dhcp"):
            want, have = d["dhcp"] or {}, l.get("dhcp") or {}
            mode = "live" if not any(c.mode == "restart" for c in changes) else "config"
            if (want.get("start"), want.get("end")) != (have.get("start"), have.get("end")):
                changes.append(FieldChange("spec.dhcp.range", _range(have), _range(want), mode))
            if want.get("hosts", []) != have.get("hosts", []):
                changes.append(FieldChange("spec.dhcp.hosts", have.get("hosts", []), want.get("hosts", []), mode))
        if d["autostart"] != live.facts.get("autostart"):
            changes.append(FieldChange("spec.autostart", live.facts.get("autostart"), d["autostart"], "live"))
        if (d["state"] == "active") != active:
            changes.append(FieldChange("spec.state", "active" if active else "inactive", d["state"], "live"))
        actions: list[Action] = []
        if changes:
            modes = sorted({c.mode for c in changes})
            actions.append(Action("update", r.id, "in place (" + ", ".join(modes) + "): " + ", ".join(c.path for c in changes),
                                  desired=r, live=live, changes=tuple(changes)))
        if restart and active and d["state"] == "active":
            running = _users(ctx, r.id.name, running_only=True)
            who = (f"running VMs attached: {', '.join(running)} (their links drop while it restarts)"
                   if running else "no running VM is attached")
            held = None if ctx.options.allow_restart else f"restart required ({who}): rerun with --allow-restart"
            actions.append(Action("restart", r.id, f"restart the network for {', '.join(restart)}; {who}",
                                  desired=r, live=live, held=held,
                                  changes=tuple(FieldChange(p, None, None, "restart") for p in restart)))
        if not actions:
            return [Action("noop", r.id, "mode, addresses, DHCP and state match", desired=r, live=live)]
        return actions

    to_manifest = staticmethod(lambda live, ctx: _to_manifest(live, ctx))


def _range(dhcp: dict) -> str | None:
    return f"{dhcp['start']}-{dhcp['end']}" if dhcp.get("start") else None


def _to_manifest(n: Live, ctx) -> Any:
    from .exporting import Doc
    s = n.spec
    if s.get("mode") not in ("nat", "isolated", "bridge"):
        ctx.notes.append(f"{n.id} skipped: forward mode {s.get('mode')!r} is not supported (nat, isolated, bridge)")
        return None
    spec: dict[str, Any] = {"mode": s["mode"]}
    if s.get("bridge"):
        spec["bridge"] = s["bridge"]
    if s.get("ipv4"):
        spec["ipv4"] = s["ipv4"]
    if s.get("dhcp"):
        dhcp: dict[str, Any] = {}
        if s["dhcp"].get("start"):
            dhcp.update(start=s["dhcp"]["start"], end=s["dhcp"]["end"])
        if s["dhcp"].get("hosts"):
            dhcp["hosts"] = [dict(h) for h in s["dhcp"]["hosts"]]
        spec["dhcp"] = dhcp
    spec["autostart"] = bool(n.facts.get("autostart"))
    spec["state"] = "active" if n.facts.get("active") else "inactive"
    doc = Doc("Network", n.id.name, spec)
    if n.facts.get("extra"):
        doc.comments.append("not exported (a manifest cannot express it): " + ", ".join(n.facts["extra"]))
    return doc
