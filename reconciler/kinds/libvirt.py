"""PURE rules of the libvirt kinds (StoragePool, Disk, VirtualMachine): checking and normalising
declared specs, the references they make, and classifying desired vs live into actions with reasons."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .. import cloudinit
from ..model import Action, FieldChange, Live, Resource, ResourceId
from .context import PlanContext
from ..units import UnitError, format_bytes, parse_bytes

# Qcow2 and dir pools round capacities up to a sector; a difference smaller than this is not drift.
CAPACITY_SLACK = 512

_DISK_PREFIX_BUS = {"vd": "virtio", "sd": "scsi", "hd": "ide", "xv": "xen"}


def show(path: str, value: Any) -> Any:
    """A value as a user wrote it (bytes back to units) for output."""
    if isinstance(value, int) and not isinstance(value, bool) and path.endswith(("memory", "Memory", "capacity")):
        return format_bytes(value)
    return value


# --------------------------------------------------------------------------- can QEMU reach a path?

@dataclass(frozen=True)
class Blocked:
    """A directory the hypervisor's user may not search (x), on the way to a path of interest."""
    dir: str
    mode: int
    owner: str


@dataclass(frozen=True)
class HypervisorAccess:
    """Host fact (the provider reads it, on a local qemu:///system only): the user QEMU runs as and,
    per directory of interest (pool folders, folders of declared files), the ancestor it cannot pass."""
    user: str
    blocked: Mapping[str, Blocked] = field(default_factory=dict)




def unreachable(ctx: PlanContext, directory: str | None, what: str) -> str | None:
    """The refusal for `what` when QEMU cannot reach `directory`, or None (reachable, or not known)."""
    access = ctx.host.hypervisor_access
    if access is None or not directory:
        return None
    b = access.blocked.get(os.path.normpath(directory))
    if b is None:
        return None
    return (f"QEMU runs as {access.user}, which cannot reach {what} ({directory}): {b.dir} (mode {b.mode:04o}, "
            f"owner {b.owner}) does not let it pass. Grant search permission with "
            f"`setfacl -m u:{access.user}:x {b.dir}` (or `chmod o+x {b.dir}`), "
            "or keep images under /var/lib/libvirt/images")


def paths_of_interest(kind: str, spec: Mapping) -> list[str]:
    """The directories a declared object makes QEMU reach: what the provider checks access to."""
    out = []
    if kind == "StoragePool" and spec.get("state", "present") == "present":
        out.append(spec["path"])
    elif kind == "Disk":
        b = spec.get("backingStore") or {}
        if "path" in b:
            out.append(os.path.dirname(b["path"]))
    elif kind == "VirtualMachine":
        out += [os.path.dirname(d["path"]) for d in spec.get("disks", ()) if d.get("path")]
        k = spec.get("kernel") or {}
        out += [os.path.dirname(k[f]) for f in ("path", "initrd") if isinstance(k.get(f), str)]
    return out


def _noop(r: Resource, live: Live | None, reason: str) -> Action:
    return Action("noop", r.id, reason, desired=r, live=live)


def _absent(r: Resource, live: Live | None, refused: str | None = None) -> list[Action]:
    """`state: absent`: nothing to do when it is gone, else a delete (refused when something still needs it)."""
    if live is None:
        return [_noop(r, None, "absent as declared")]
    return [Action("delete", r.id, "state: absent", desired=r, live=live, refused=refused)]


def _labels_change(r: Resource, live: Live) -> list[FieldChange]:
    if dict(r.labels) != dict(live.labels):
        return [FieldChange("metadata.labels", dict(live.labels), dict(r.labels), "live")]
    return []


# --------------------------------------------------------------------------- StoragePool

def _abs(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, path))


class StoragePoolRules:
    kind = "StoragePool"
    target = "libvirt"
    prunable = False
    show = staticmethod(show)
    to_manifest = staticmethod(lambda live, ctx: _pool_to_manifest(live, ctx))

    @staticmethod
    def resolve_paths(spec: dict, base: str) -> dict:
        return {**spec, "path": _abs(spec["path"], base)}

    @staticmethod
    def check(name: str, spec: dict):
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        return {"type": spec.get("type", "dir"), "path": spec["path"].rstrip("/") or "/",
                "autostart": spec.get("autostart", True), "state": spec.get("state", "present")}

    @staticmethod
    def references(spec: dict):
        return []

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        if d["state"] == "absent":
            volumes = live.facts.get("volumes", 0) if live else 0
            declared_in = [x.id.name for x in ctx.desired.values()
                           if x.id.kind == "Disk" and x.spec["pool"] == r.id.name and x.spec["state"] == "present"]
            blocked = f"pool still holds {volumes} volume(s); delete its disks first" if volumes or declared_in else None
            return _absent(r, live, blocked)
        if live is None:
            return [Action("create", r.id, "pool does not exist", desired=r,
                           changes=(FieldChange("spec.path", None, d["path"], "config"),),
                           refused=unreachable(ctx, d["path"], "the pool's folder"))]
        changes = []
        if live.spec.get("path") != d["path"]:
            return [Action("update", r.id, "path differs", desired=r, live=live,
                           changes=(FieldChange("spec.path", live.spec.get("path"), d["path"], "replace"),),
                           refused=f"pool {r.id.name!r} exists at {live.spec.get('path')}; moving a pool is not supported")]
        if live.spec.get("autostart") != d["autostart"]:
            changes.append(FieldChange("spec.autostart", live.spec.get("autostart"), d["autostart"], "live"))
        if not live.facts.get("active", True):
            changes.append(FieldChange("status.active", False, True, "live"))
        if changes:
            return [Action("update", r.id, "pool differs in " + ", ".join(c.path for c in changes),
                           changes=tuple(changes), desired=r, live=live)]
        return [_noop(r, live, "path, autostart and state match")]


# --------------------------------------------------------------------------- Disk



def _source_image(ctx: PlanContext, d: dict) -> tuple[dict | None, str | None]:
    """The facts the provider read of a new disk's source image, and why its creation is refused."""
    src = d["source"]
    img = ctx.host.images.get(src["path"])
    if img is None:
        return None, f"source image {src['path']} was not read"
    if img.get("error"):
        return None, img["error"]
    if src["sha256"] and img["sha256"] != src["sha256"]:
        return None, (f"source image {src['path']} has sha256 {img['sha256']}, not the declared {src['sha256']}; "
                      "nothing is created")
    if img["format"] != d["format"]:
        return None, (f"source image {src['path']} is {img['format']} but the disk is declared {d['format']}: "
                      f"declare format: {img['format']}, or convert it (qemu-img convert -O {d['format']})")
    if d["capacity"] is not None and d["capacity"] < img["virtual_size"]:
        return None, (f"capacity {format_bytes(d['capacity'])} is smaller than the image's "
                      f"{format_bytes(img['virtual_size'])}")
    return img, None


def pool_path(ctx: PlanContext, pool: str) -> str | None:
    """Where a pool keeps its volumes: declared in this plan, or found on the host."""
    declared = ctx.desired.get(ResourceId("StoragePool", pool))
    if declared is not None and declared.spec["state"] == "present":
        return declared.spec["path"]
    live = ctx.objects.get(ResourceId("StoragePool", pool))
    if live is not None:
        return live.spec.get("path")
    return None


def disk_path(ctx: PlanContext, name: str) -> str | None:
    """The file of a Disk: the live volume's, or where its pool will put it."""
    live = ctx.objects.get(ResourceId("Disk", name))
    if live is not None:
        return live.facts.get("path")
    d = ctx.desired.get(ResourceId("Disk", name))
    if d is not None:
        base = pool_path(ctx, d.spec["pool"])
        return f"{base}/{name}" if base else None
    return None


def disk_source(ctx: PlanContext, name: str) -> dict | None:
    """{path, format} of a Disk: the live volume's, or where and how this plan will create it."""
    live = ctx.objects.get(ResourceId("Disk", name))
    if live is not None:
        return {"path": live.facts.get("path"), "format": live.spec.get("format")}
    d = ctx.desired.get(ResourceId("Disk", name))
    path = disk_path(ctx, name)
    if d is None or path is None:
        return None
    return {"path": path, "format": d.spec.get("format")}


def _with_sources(r: Resource, ctx: PlanContext) -> Resource:
    """The desired VM with each Disk reference resolved to its file and format (`source`): the
    provider executes the action with nothing to look up."""
    spec = dict(r.spec)
    refs = [x["disk"] for x in spec.get("disks", ()) if "disk" in x]
    if not refs:
        return r
    spec["disks"] = [{**x, "source": disk_source(ctx, x["disk"])} if "disk" in x else x for x in spec["disks"]]
    ci = spec.get("cloudInit")
    if ci and not ci.get("pool"):
        # The seed's pool defaults to the pool of the VM's first declared disk.
        first = ctx.desired.get(ResourceId("Disk", refs[0])) or ctx.objects.get(ResourceId("Disk", refs[0]))
        if first is not None and first.spec.get("pool"):
            spec["cloudInit"] = {**ci, "pool": first.spec["pool"]}
    return replace(r, spec=spec)


def _attached(ctx: PlanContext, path: str | None) -> list[dict]:
    """The running or paused VMs that hold a volume's file, by target: a grow goes through QEMU there."""
    out = []
    for rid, vm in ctx.objects.items():
        if rid.kind != "VirtualMachine" or vm.facts.get("state") not in ("running", "paused"):
            continue
        for x in vm.spec.get("disks", ()):
            if path and x.get("path") == path:
                out.append({"vm": rid.name, "target": x["target"]})
    return out


def backing_path(ctx: PlanContext, spec: dict) -> str | None:
    b = spec.get("backingStore")
    if not b:
        return None
    if "disk" in b:
        return disk_path(ctx, b["disk"])
    return b["path"]


class DiskRules:
    kind = "Disk"
    target = "libvirt"
    prunable = False
    show = staticmethod(show)
    to_manifest = staticmethod(lambda live, ctx: _disk_to_manifest(live, ctx))
    export_needs = staticmethod(lambda live, ctx: _disk_export_needs(live, ctx))

    @staticmethod
    def resolve_paths(spec: dict, base: str) -> dict:
        b = spec.get("backingStore")
        if b and "path" in b:
            spec = {**spec, "backingStore": {**b, "path": _abs(b["path"], base)}}
        if isinstance(spec.get("source"), dict) and "path" in spec["source"]:
            spec = {**spec, "source": {**spec["source"], "path": _abs(spec["source"]["path"], base)}}
        return spec

    @staticmethod
    def check(name: str, spec: dict):
        if "capacity" not in spec and "source" not in spec:
            return [(("spec",), "a disk needs a capacity (or a source image, whose size it then takes)")]
        if "source" in spec and "backingStore" in spec:
            return [(("spec", "source"), "a disk takes its content from a source image or a backing store, not both")]
        try:
            if "capacity" in spec:
                parse_bytes(spec.get("capacity"))
        except UnitError as e:
            return [(("spec", "capacity"), str(e))]
        b = spec.get("backingStore") or {}
        if b.get("disk") == name:
            return [(("spec", "backingStore", "disk"), "a disk cannot be its own backing store")]
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        src = spec.get("source")
        return {"pool": spec["pool"], "capacity": parse_bytes(spec["capacity"]) if "capacity" in spec else None,
                "format": spec.get("format", "qcow2"),
                "backingStore": dict(spec["backingStore"]) if spec.get("backingStore") else None,
                # Creation-time only: libvirt keeps no record of where a volume's content came from.
                "source": {"path": src["path"], "sha256": (src.get("sha256") or "").lower() or None} if src else None,
                "state": spec.get("state", "present")}

    @staticmethod
    def references(spec: dict):
        b = spec.get("backingStore") or {}
        if "disk" in b:
            yield ("Disk", b["disk"], ("spec", "backingStore", "disk"))

    @staticmethod
    def users(ctx: PlanContext, name: str) -> list[str]:
        """VMs defined on the host that use this disk and will still use it after this plan."""
        path = disk_path(ctx, name)
        out = []
        for vid, vm in ctx.objects.items():
            if vid.kind != "VirtualMachine":
                continue
            uses = any(d.get("disk") == name or (path and d.get("path") == path) for d in vm.spec.get("disks", ()))
            if not uses:
                continue
            want = ctx.desired.get(vid)
            if want is not None:
                if want.spec["state"] == "absent":
                    continue
                if "disks" in want.declared and not any(d.get("disk") == name for d in want.spec["disks"]):
                    continue
            elif vm.managed and ctx.options.prune:
                continue
            out.append(vid.name)
        return out

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        if d["state"] == "absent":
            users = DiskRules.users(ctx, r.id.name) if live else []
            return _absent(r, live, f"still used by VirtualMachine {', '.join(users)}" if users else None)
        if live is None:
            if pool_path(ctx, d["pool"]) is None:
                return [Action("create", r.id, "disk does not exist", desired=r,
                               refused=f"pool {d['pool']!r} is neither declared nor on the host")]
            needs = [ResourceId("StoragePool", d["pool"])]
            if d["backingStore"] and "disk" in d["backingStore"]:
                needs.append(ResourceId("Disk", d["backingStore"]["disk"]))
            backing = (d["backingStore"] or {}).get("path")
            refused = unreachable(ctx, pool_path(ctx, d["pool"]), f"the folder of pool {d['pool']!r}") or \
                (unreachable(ctx, os.path.dirname(backing), "the backing file's folder") if backing else None)
            capacity = d["capacity"]
            reason = "disk does not exist"
            if d.get("source"):
                img, refused_img = _source_image(ctx, d)
                refused = refused or refused_img
                if img is not None:
                    capacity = max(capacity or 0, img["virtual_size"])
                    reason += f"; from {img['format']} image {d['source']['path']} (sha256 {img['sha256'][:12]}…" \
                              + (", checked)" if d["source"]["sha256"] else ", not declared)")
            resolved = r
            if d["backingStore"] and "disk" in d["backingStore"]:
                # The base's file and format, so the provider needs no lookup (it may be created in this run).
                base = disk_source(ctx, d["backingStore"]["disk"]) or {}
                resolved = replace(r, spec={**d, "backingStore": {**d["backingStore"], **base}})
            return [Action("create", r.id, reason, desired=resolved, needs=tuple(needs),
                           changes=(FieldChange("spec.capacity", None, capacity, "config"),), refused=refused)]
        l = live.spec
        refusals = []
        # A refused change still names its field, so that output and JSON say what was refused.
        refused_fields: list[FieldChange] = []
        if l.get("pool") != d["pool"]:
            refusals.append(f"it is in pool {l.get('pool')!r}; moving a disk between pools is not supported")
            refused_fields.append(FieldChange("spec.pool", l.get("pool"), d["pool"], "replace"))
        if l.get("format") != d["format"]:
            refusals.append(f"changing format {l.get('format')} -> {d['format']} of an existing disk is refused")
            refused_fields.append(FieldChange("spec.format", l.get("format"), d["format"], "replace"))
        want_backing = backing_path(ctx, d)
        if (l.get("backingStore") or None) != want_backing:
            refusals.append(f"changing the backing store of an existing disk ({l.get('backingStore')} -> {want_backing}) is refused")
            refused_fields.append(FieldChange("spec.backingStore", l.get("backingStore"), want_backing, "replace"))
        cap = l.get("capacity", 0)
        changes = []
        if d["capacity"] is None:
            pass    # taken from the source image at creation: nothing to compare
        elif d["capacity"] < cap - CAPACITY_SLACK:
            refusals.append(f"shrinking {format_bytes(cap)} -> {format_bytes(d['capacity'])} would lose data and is refused")
            refused_fields.append(FieldChange("spec.capacity", cap, d["capacity"], "replace"))
        elif d["capacity"] > cap:
            changes.append(FieldChange("spec.capacity", cap, d["capacity"], "live"))
        if refusals:
            return [Action("update", r.id, "; ".join(refusals), desired=r, live=live,
                           changes=tuple(refused_fields + changes), refused="; ".join(refusals))]
        if changes:
            attached = _attached(ctx, live.facts.get("path"))
            resolved = replace(r, spec={**d, "attached": attached}) if attached else r
            return [Action("update", r.id, f"grow {format_bytes(cap)} -> {format_bytes(d['capacity'])} in place",
                           desired=resolved, live=live, changes=tuple(changes))]
        return [_noop(r, live, "capacity, format and backing store match")]


# --------------------------------------------------------------------------- VirtualMachine

def _norm_vm_disk(d: dict) -> dict:
    target = d["target"]
    bus = d.get("bus") or _DISK_PREFIX_BUS.get(target[:2], "virtio")
    device = d.get("device", "disk")
    if device == "cdrom" and "bus" not in d:
        bus = "sata"
    out = {"target": target, "bus": bus, "device": device}
    if "disk" in d:
        out["disk"] = d["disk"]
    else:
        out["path"] = d["path"]
    return out


VM_DISK_BUSES = ("virtio", "sata", "scsi", "ide")


def inexpressible_disk(d: dict) -> str | None:
    """Why a live disk device cannot be written in a manifest, or None when it can. Such a device
    (the empty CD-ROM drive virt-install leaves, a USB stick, a pool-volume source) is never compared
    unless a manifest declares its target, and never removed: it is left as it is."""
    device, target = d.get("device", "disk"), d.get("target")
    if device not in ("disk", "cdrom"):
        return f"{target} is a {device} device"
    if d.get("bus") not in VM_DISK_BUSES:
        return f"{target} is on bus {d.get('bus')!r}"
    if not d.get("path"):
        return f"{target} has no file (an empty drive)"
    if d["path"].startswith("volume:"):
        return f"{target} names a pool volume, not a file"
    return None


def inexpressible_interface(i: dict) -> str | None:
    """Why a live interface cannot be written in a manifest (macvtap, hostdev, ...), or None."""
    if "network" in i or "bridge" in i or i.get("user"):
        return None
    return f"an interface of type {i.get('type')!r}"


def _norm_kernel(k: dict | None) -> dict | None:
    if not k:
        return None
    return {"path": k["path"], "initrd": k.get("initrd"), "cmdline": k.get("cmdline")}


def seed_of(ctx: PlanContext, r: Resource):
    """The VM's cloud-init seed (built once per plan; its str is its digest), or None."""
    ci = r.spec.get("cloudInit")
    if ci is None:
        return None
    key = ("cloudinit-seed", r.id.name)
    if key not in ctx.memo:
        ctx.memo[key] = cloudinit.seed_for(r.id.name, ci)
    return ctx.memo[key]


def _boot_changes(r: Resource, l: dict, ctx: PlanContext, running: bool) -> list[FieldChange]:
    """Direct kernel boot (restart-class) and the cloud-init seed: a changed seed is swapped live on
    a running VM that has one; a VM getting its first seed needs a restart to see the new CD-ROM.
    Both compared only when the manifest declares them."""
    ch: list[FieldChange] = []
    slow = "restart" if running else "config"
    if "kernel" in r.declared and r.spec["kernel"] != l.get("kernel"):
        ch.append(FieldChange("spec.kernel", l.get("kernel"), r.spec["kernel"], slow))
    if "cloudInit" in r.declared:
        have = l.get("cloudInit") or {}
        seed, inst = seed_of(ctx, r)
        if have.get("seed") != str(seed) or have.get("instanceId") != inst:
            mode = ("live" if running else "config") if have.get("seed") else slow
            ch.append(FieldChange("spec.cloudInit", have.get("seed"), str(seed), mode))
    return ch


def _seed_note(r: Resource, live: dict, running: bool) -> str:
    have = live.get("cloudInit") or {}
    return cloudinit.when_read(have.get("instanceId"), cloudinit.instance_id(r.id.name, r.spec["cloudInit"]), running)


def _norm_iface(i: dict) -> dict:
    out = {k: i[k] for k in ("network", "bridge", "user", "model") if k in i}
    if "mac" in i:
        out["mac"] = i["mac"].lower()
    return out


def _norm_graphics(g: Any) -> dict:
    if g is None or g == "none":
        return {"type": "none"}
    if isinstance(g, str):
        return {"type": g, "listen": "127.0.0.1"}
    return {"type": g["type"], "listen": g.get("listen", "127.0.0.1")}


# Fields whose defaults are part of the contract: compared even when the manifest omits them.
VM_DEFAULTED = ("hypervisor", "arch", "state", "autostart")
VM_REPLACE = ("hypervisor", "arch", "machine")


def _mib(n: int) -> int:
    """QEMU sizes guest memory in whole MiB; rounding up here keeps "500MB" from showing as drift."""
    return -(-n // MIB) * MIB


MIB = 1024 * 1024


class VirtualMachineRules:
    kind = "VirtualMachine"
    target = "libvirt"
    prunable = True
    consults = ("Snapshot",)     # a VM with snapshots is not deleted nor replaced
    show = staticmethod(show)
    to_manifest = staticmethod(lambda live, ctx: _vm_to_manifest(live, ctx))
    export_needs = staticmethod(lambda live, ctx: _vm_export_needs(live, ctx))

    @staticmethod
    def resolve_paths(spec: dict, base: str) -> dict:
        if spec.get("disks"):
            spec = {**spec, "disks": [{**d, "path": _abs(d["path"], base)} if "path" in d else d for d in spec["disks"]]}
        if isinstance(spec.get("kernel"), dict):
            k = spec["kernel"]
            spec = {**spec, "kernel": {**k, **{f: _abs(k[f], base) for f in ("path", "initrd") if f in k}}}
        if isinstance(spec.get("cloudInit"), dict):
            spec = {**spec, "cloudInit": cloudinit.resolve_paths(spec["cloudInit"], base)}
        return spec

    @staticmethod
    def check(name: str, spec: dict):
        out = []
        for f in ("memory", "maxMemory"):
            if f in spec:
                try:
                    parse_bytes(spec[f])
                except UnitError as e:
                    out.append((("spec", f), str(e)))
        if out:
            return out
        if "maxMemory" in spec and parse_bytes(spec["maxMemory"]) < parse_bytes(spec["memory"]):
            out.append((("spec", "maxMemory"), f"maxMemory {spec['maxMemory']} is below memory {spec['memory']}"))
        if "maxVcpus" in spec and spec["maxVcpus"] < spec["vcpus"]:
            out.append((("spec", "maxVcpus"), f"maxVcpus {spec['maxVcpus']} is below vcpus {spec['vcpus']}"))
        targets = {}
        for i, d in enumerate(spec.get("disks", [])):
            if d["target"] in targets:
                out.append((("spec", "disks", i, "target"), f"target {d['target']} is used twice"))
            targets[d["target"]] = i
        macs = set()
        for i, n in enumerate(spec.get("interfaces", [])):
            if "mac" in n:
                if n["mac"].lower() in macs:
                    out.append((("spec", "interfaces", i, "mac"), f"MAC {n['mac']} is used twice"))
                macs.add(n["mac"].lower())
        if isinstance(spec.get("cloudInit"), dict):
            has_pool = any("disk" in d for d in spec.get("disks", [])[:1])
            out += cloudinit.check(spec["cloudInit"], has_pool)
        return out

    @staticmethod
    def normalise(spec: dict) -> dict:
        out = {
            "hypervisor": spec.get("hypervisor", "kvm"),
            "memory": _mib(parse_bytes(spec["memory"])),
            "maxMemory": _mib(parse_bytes(spec["maxMemory"])) if "maxMemory" in spec else None,
            "vcpus": spec["vcpus"],
            "maxVcpus": spec.get("maxVcpus"),
            "state": spec.get("state", "running"),
            "autostart": spec.get("autostart", False),
            "arch": spec.get("arch", "x86_64"),
            "machine": spec.get("machine"),
            "boot": list(spec.get("boot", ["hd"])),
            "disks": [_norm_vm_disk(d) for d in spec.get("disks", [])],
            "interfaces": [_norm_iface(i) for i in spec.get("interfaces", [])],
            "graphics": _norm_graphics(spec.get("graphics")),
            "description": spec.get("description"),
            "kernel": _norm_kernel(spec.get("kernel")),
            "cloudInit": cloudinit.normalise(spec.get("cloudInit")),
        }
        return out

    @staticmethod
    def references(spec: dict):
        for i, d in enumerate(spec.get("disks", [])):
            if "disk" in d:
                yield ("Disk", d["disk"], ("spec", "disks", i, "disk"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        resolved = _with_sources(r, ctx)
        return [replace(a, desired=resolved) if a.desired is r else a for a in _classify_vm(r, live, ctx)]


def _machine_matches(ctx: PlanContext, desired: str | None, arch: str, live: str | None) -> bool:
    """"pc" matches the versioned "pc-i440fx-7.2" libvirt expands it to."""
    if desired is None or desired == live:
        return True
    aliases = ctx.host.machine_aliases.get(arch, {})
    return aliases.get(desired) == live


def _resolve_disks(ctx: PlanContext, disks: list[dict]) -> dict:
    """Desired disks by target, with each Disk reference resolved to the file it lives in."""
    out = {}
    for x in disks:
        path = disk_path(ctx, x["disk"]) if "disk" in x else x["path"]
        out[x["target"]] = {"target": x["target"], "bus": x["bus"], "device": x["device"], "path": path}
    return out


def _interfaces_match(want: list[dict], have: list[dict]) -> bool:
    """Interfaces match position by position on the keys the manifest gives (an undeclared MAC is libvirt's)."""
    if len(want) != len(have):
        return False
    return all(all(h.get(k) == v for k, v in w.items()) for w, h in zip(want, have))


def _compare_vm(d: dict, declared: frozenset, l: dict, ctx: PlanContext, running: bool,
                max_mem: int | None, max_vcpus: int | None, view: str = "config") -> list[FieldChange]:
    """Differences between a desired spec and one view (persistent "config" or "running") of a domain.

    `running` picks the mode of each change: live when libvirt can apply it to the running VM,
    restart when only the next boot picks it up; config for a VM that is not running. The running
    view skips memory: the balloon's actual size is the guest's business, not drift."""
    ch: list[FieldChange] = []
    slow = "restart" if running else "config"
    for f in VM_REPLACE:
        if f == "machine":
            if not _machine_matches(ctx, d["machine"], d["arch"], l.get("machine")):
                ch.append(FieldChange("spec.machine", l.get("machine"), d["machine"], "replace"))
        elif d[f] != l.get(f):
            ch.append(FieldChange(f"spec.{f}", l.get(f), d[f], "replace"))
    live_max_mem = l.get("maxMemory") or l.get("memory")
    want_max_mem = d["maxMemory"]
    if want_max_mem is not None and want_max_mem != live_max_mem:
        ch.append(FieldChange("spec.maxMemory", live_max_mem, want_max_mem, slow))
    elif want_max_mem is None and live_max_mem is not None and live_max_mem < d["memory"]:
        ch.append(FieldChange("spec.maxMemory", live_max_mem, d["memory"], slow))
    if view == "config" and d["memory"] != l.get("memory"):
        fits = max_mem is not None and d["memory"] <= max_mem
        ch.append(FieldChange("spec.memory", l.get("memory"), d["memory"], "live" if (running and fits) else slow))
    live_max_vcpus = l.get("maxVcpus") or l.get("vcpus")
    if d["maxVcpus"] is not None and d["maxVcpus"] != live_max_vcpus:
        ch.append(FieldChange("spec.maxVcpus", live_max_vcpus, d["maxVcpus"], slow))
    elif d["maxVcpus"] is None and live_max_vcpus is not None and live_max_vcpus < d["vcpus"]:
        ch.append(FieldChange("spec.maxVcpus", live_max_vcpus, d["vcpus"], slow))
    if d["vcpus"] != l.get("vcpus"):
        # Hot-add works within maxVcpus; removing a vCPU the guest booted with needs a restart.
        fits = max_vcpus is not None and l.get("vcpus", 0) < d["vcpus"] <= max_vcpus
        ch.append(FieldChange("spec.vcpus", l.get("vcpus"), d["vcpus"], "live" if (running and fits) else slow))
    for f in ("boot", "graphics"):
        if f in declared and d[f] != l.get(f):
            ch.append(FieldChange(f"spec.{f}", l.get(f), d[f], slow))
    if "interfaces" in declared:
        have_ifaces = [i for i in l.get("interfaces", []) if inexpressible_interface(i) is None]
        if not _interfaces_match(d["interfaces"], have_ifaces):
            ch.append(FieldChange("spec.interfaces", have_ifaces, d["interfaces"], slow))
    if view == "config" and "description" in declared and d["description"] != (l.get("description") or None):
        ch.append(FieldChange("spec.description", l.get("description"), d["description"], "live"))
    if "disks" in declared:
        want = _resolve_disks(ctx, d["disks"])
        have = {x["target"]: {k: x.get(k) for k in ("target", "bus", "device", "path")} for x in l.get("disks", [])
                if inexpressible_disk(x) is None or x["target"] in want}
        for t in sorted(set(want) | set(have)):
            w, h = want.get(t), have.get(t)
            if w == h:
                continue
            if w is None or h is None:
                # A detach the guest has not completed (config done, running VM still holding it) waits for a restart.
                hot = running and not (view == "running" and w is None)
                ch.append(FieldChange(f"spec.disks[{t}]", h, w, "live" if hot else slow))
            else:
                ch.append(FieldChange(f"spec.disks[{t}]", h, w, slow))
    return ch


def _unreachable_disks(ctx: PlanContext, d: dict, targets: set | None) -> str | None:
    """The refusal for the first declared disk (of `targets`, or all) whose folder QEMU cannot reach."""
    for t, x in _resolve_disks(ctx, d["disks"]).items():
        if targets is not None and t not in targets:
            continue
        why = unreachable(ctx, os.path.dirname(x["path"]) if x["path"] else None, f"the folder of disk {t}")
        if why:
            return why
    k = d.get("kernel") or {}
    for f in ("path", "initrd"):
        if isinstance(k.get(f), str):
            why = unreachable(ctx, os.path.dirname(k[f]), f"the folder of the kernel's {f}")
            if why:
                return why
    seed_pool = (d.get("cloudInit") or {}).get("pool")
    if seed_pool:
        return unreachable(ctx, pool_path(ctx, seed_pool), f"the folder of the seed's pool {seed_pool!r}")
    return None


# Fields the running view does not compare: their config-view mode is final.
_CONFIG_VIEW_ONLY = ("spec.memory", "spec.description")


def _effective_max(spec: dict, key_max: str, key: str) -> int | None:
    return spec.get(key_max) or spec.get(key)


def _snapshots_block(vm: str, ctx: PlanContext) -> str | None:
    """Deleting a VM drops libvirt's metadata of its snapshots and orphans their data: refused while it has
    any that are not declared absent in the same plan (those are deleted first)."""
    left = sorted(sid.name for sid, s in ctx.objects.items()
                  if sid.kind == "Snapshot" and s.facts.get("domain") == vm and not s.facts.get("vanished")
                  and not (sid in ctx.desired and ctx.desired[sid].spec.get("state") == "absent"))
    if not left:
        return None
    return (f"VM {vm} still has snapshot(s) {', '.join(left)}: declare them (kind Snapshot) with state: absent "
            f"to delete them first")


def _classify_vm(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
    d = r.spec
    needs = tuple(ResourceId("Disk", x["disk"]) for x in d["disks"] if "disk" in x)
    # A declared Network the VM attaches to is created first; when that fails, the VM is not attempted.
    needs += tuple(ResourceId("Network", i["network"]) for i in d["interfaces"]
                   if "network" in i and ResourceId("Network", i["network"]) in ctx.desired)
    if d["state"] == "absent":
        return _absent(r, live, _snapshots_block(r.id.name, ctx) if live else None)
    starts = d["state"] in ("running", "paused")
    if live is None:
        return [Action("create", r.id, "domain does not exist", desired=r, needs=needs,
                       changes=(FieldChange("spec.state", None, d["state"], "live"),),
                       refused=_unreachable_disks(ctx, d, None) if starts else None)]

    config = live.spec
    state = live.facts.get("state", "shutoff")
    running = state in ("running", "paused")
    run_spec = live.facts.get("running_spec") if running else None
    actions: list[Action] = []

    if run_spec is not None:
        mm = _effective_max(run_spec, "maxMemory", "memory")
        mv = _effective_max(run_spec, "maxVcpus", "vcpus")
    else:
        mm = mv = None
    cfg_changes = _compare_vm(d, r.declared, config, ctx, running, mm, mv) + _boot_changes(r, config, ctx, running)
    run_changes = _compare_vm(d, r.declared, run_spec, ctx, True, mm, mv, view="running") \
        + _boot_changes(r, run_spec, ctx, True) if run_spec is not None else []
    if run_spec is not None:
        # Drift in the persistent definition alone (`virsh setvcpus --config`, `detach-disk --config`)
        # while the running VM already matches: only the definition is rewritten. Neither a restart
        # nor a hot-plug (which would find the device already there) is wanted. Memory is compared in
        # the config view only (the balloon is the guest's), so its own mode stands.
        run_paths = {c.path for c in run_changes}
        cfg_changes = [FieldChange(c.path, c.before, c.after, "config")
                       if c.mode in ("live", "restart") and c.path not in run_paths and c.path not in _CONFIG_VIEW_ONLY
                       else c for c in cfg_changes]

    replace = [c for c in cfg_changes if c.mode == "replace"]
    if replace:
        held = None if ctx.options.allow_replace else "changing " + ", ".join(c.path for c in replace) + " needs --allow-replace"
        # Redefining drops libvirt's metadata of the VM's snapshots (their RAM state would not fit the new machine).
        return [Action("replace", r.id, "redefine with the same UUID: " + ", ".join(c.path for c in replace) + " differ",
                       desired=r, live=live, changes=tuple(cfg_changes), held=held, needs=needs,
                       refused=_snapshots_block(r.id.name, ctx))]

    changes = list(cfg_changes)
    if not live.managed:
        changes.insert(0, FieldChange("metadata.managed", False, True, "live"))
    elif live.scope != ctx.options.scope:
        changes.insert(0, FieldChange("metadata.scope", live.scope, ctx.options.scope, "live"))
    changes += _labels_change(r, live)

    # Live-capable fields where the persistent definition matches but the running VM does not.
    restart_fields: list[str] = [c.path for c in changes if c.mode == "restart"]
    if run_spec is not None:
        cfg_paths = {c.path for c in changes}
        for c in run_changes:
            if c.path in cfg_paths or c.mode == "replace":
                continue
            if c.mode == "live":
                changes.append(c)
            elif c.path not in restart_fields:
                restart_fields.append(c.path)

    if d["autostart"] != live.facts.get("autostart", False):
        changes.append(FieldChange("spec.autostart", live.facts.get("autostart", False), d["autostart"], "live"))
    want_state = d["state"]
    if want_state != state:
        changes.append(FieldChange("spec.state", state, want_state, "live"))

    if changes:
        modes = sorted({c.mode for c in changes})
        # Starting the VM, or giving it a disk, makes QEMU open files: refused when it cannot reach them.
        refused = None
        if starts and any(c.path == "spec.state" for c in changes):
            refused = _unreachable_disks(ctx, d, None)
        elif starts and running:
            refused = _unreachable_disks(ctx, d, {c.path[len("spec.disks["):-1] for c in changes
                                                  if c.path.startswith("spec.disks[") and c.after is not None})
        reason = "in place (" + ", ".join(modes) + "): " + ", ".join(c.path for c in changes)
        seed = next((c for c in changes if c.path == "spec.cloudInit"), None)
        if seed is not None:
            reason += "; " + _seed_note(r, config, running)
        actions.append(Action("update", r.id, reason,
                              desired=r, live=live, changes=tuple(changes), needs=needs, refused=refused))
    if restart_fields and want_state in ("running", "paused") and running:
        held = None if ctx.options.allow_restart else "restart required: rerun with --allow-restart"
        actions.append(Action("restart", r.id, "restart required for " + ", ".join(restart_fields),
                              desired=r, live=live, held=held,
                              changes=tuple(FieldChange(p, None, None, "restart") for p in restart_fields)))
    if not actions:
        return [_noop(r, live, "memory, vcpus, state and declared devices match")]
    return actions


# --------------------------------------------------------------------------- export (to_manifest)

def _pool_to_manifest(p: Live, ctx):
    from .exporting import Doc
    s = p.spec
    if s.get("type") != "dir":
        ctx.notes.append(f"{p.id} skipped: pool type {s.get('type')!r} is not supported (only dir)")
        return None
    doc = Doc("StoragePool", p.id.name, {"type": "dir", "path": s["path"], "autostart": bool(s.get("autostart"))})
    if not p.facts.get("active", True):
        doc.comments.append("this pool is not active on the host: applying starts it")
    return doc


def _disk_to_manifest(d: Live, ctx):
    from .exporting import Doc
    if d.facts.get("backup"):
        return None     # a BackupPolicy's backup volume: the policy's, never a declared Disk
    s = d.spec
    if s.get("format") not in ("qcow2", "raw"):
        ctx.notes.append(f"{d.id} skipped: volume format {s.get('format')!r} is not supported (qcow2 or raw)")
        return None
    if not s.get("capacity"):
        ctx.notes.append(f"{d.id} skipped: it has no capacity")
        return None
    spec: dict[str, Any] = {"pool": s["pool"], "capacity": format_bytes(s["capacity"]), "format": s["format"]}
    b = s.get("backingStore")
    if b:
        base = ctx.disks_by_path.get(b)
        spec["backingStore"] = {"disk": base.id.name} if base is not None and ctx.exported(base.id) else {"path": b}
    return Doc("Disk", d.id.name, spec)


def _disk_export_needs(d: Live, ctx) -> list[ResourceId]:
    """A disk needs its pool and the volume it is backed by."""
    out = [ResourceId("StoragePool", d.spec["pool"])] if d.spec.get("pool") else []
    base = ctx.disks_by_path.get(d.spec.get("backingStore"))
    if base is not None:
        out.append(base.id)
    return out


def _vm_export_needs(v: Live, ctx) -> list[ResourceId]:
    """A VM needs the volumes its disks are."""
    return [ctx.disks_by_path[d["path"]].id for d in v.spec.get("disks", ()) if d.get("path") in ctx.disks_by_path]


def _vm_to_manifest(v: Live, ctx):
    from .exporting import Doc, unmanaged_comment
    s = v.spec
    facts = v.facts
    comments: list[str] = []
    spec: dict[str, Any] = {"hypervisor": s.get("hypervisor")}
    spec["memory"] = format_bytes(s["memory"])
    if s.get("maxMemory") and s["maxMemory"] != s["memory"]:
        spec["maxMemory"] = format_bytes(s["maxMemory"])
    spec["vcpus"] = s["vcpus"]
    if s.get("maxVcpus") and s["maxVcpus"] != s["vcpus"]:
        spec["maxVcpus"] = s["maxVcpus"]
    spec["state"] = facts.get("state", "shutoff")
    spec["autostart"] = bool(facts.get("autostart", False))
    if s.get("arch"):
        spec["arch"] = s["arch"]
    if s.get("machine"):
        spec["machine"] = s["machine"]
    boot = list(s.get("boot") or [])
    if boot and all(b in ("hd", "cdrom", "network") for b in boot) and len(set(boot)) == len(boot):
        spec["boot"] = boot
    elif boot:
        comments.append(f"boot not exported: {boot} cannot be written in a manifest")

    # Every device a manifest can express is exported; one it cannot (an empty CD-ROM drive, a
    # macvtap NIC) is left out alone, with a comment: the kind never compares nor removes such a device.
    disks = []
    for d in s.get("disks", ()):
        why = inexpressible_disk(d)
        if why:
            comments.append(f"disk {why}: a manifest cannot express it; it is left as it is")
            continue
        vol = ctx.disks_by_path.get(d["path"])
        entry: dict[str, Any]
        if vol is not None and ctx.exported(vol.id) and d.get("device", "disk") == "disk":
            entry = {"disk": vol.id.name, "target": d["target"], "bus": d["bus"]}
        else:
            entry = {"path": d["path"], "target": d["target"], "bus": d["bus"]}
            if d.get("device", "disk") != "disk":
                entry["device"] = d["device"]
        disks.append(entry)
    spec["disks"] = disks

    ifaces = []
    for i in s.get("interfaces", ()):
        why = inexpressible_interface(i)
        if why:
            comments.append(f"{why} cannot be written in a manifest; it is left as it is")
            continue
        e: dict[str, Any] = {k: i[k] for k in ("network", "bridge", "user") if k in i}
        if i.get("model"):
            e["model"] = i["model"]
        if i.get("mac"):
            e["mac"] = i["mac"]
        ifaces.append(e)
    spec["interfaces"] = ifaces

    g = s.get("graphics") or {"type": "none"}
    if g.get("type") == "none":
        spec["graphics"] = "none"
    elif g.get("type") in ("vnc", "spice"):
        spec["graphics"] = g["type"] if g.get("listen", "127.0.0.1") == "127.0.0.1" else \
            {"type": g["type"], "listen": g["listen"]}
    else:
        comments.append(f"graphics not exported: type {g.get('type')!r}")
    if s.get("description"):
        spec["description"] = s["description"]
    return Doc("VirtualMachine", v.id.name, spec, dict(v.labels), unmanaged_comment(v) + comments)
