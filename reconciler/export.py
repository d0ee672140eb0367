"""`reconciler export`: print live state as manifests (multi-document YAML) that validate and that
`plan` reports in sync: the round trip of the contract, section 4.

What is exported (README.md, "reconciler export", says the same for users):
- VirtualMachines, MqttRoles, MqttGroups, MqttClients and Topics carry an ownership marker: without
  `--all` only marked (managed) ones are printed; `--all` adds unmarked ones, so that applying the
  output adopts them.
- StoragePools and Disks cannot carry a marker (libvirt pools and volumes have no metadata). Without
  `--all` the disks the exported VMs use are printed (their backing chains included) together with the
  pools that hold them: that usage is the only evidence of ownership there is, and printing the whole
  host's storage (ISO stores, other tools' images) would make a default export adopt what it never
  managed. `--all` prints every pool and volume that a manifest can express.
- An object that refers to another one the output does not contain stays valid: a VM disk becomes
  `{path: ...}` instead of `{disk: ...}`, a backing store `{path: ...}`. An MQTT reference (role,
  group) cannot; the referenced object is printed too, with a comment, unless `--kind` left its kind out.
- Secrets are never read back: a client whose password the reconciler set (its marker holds a
  fingerprint) gets `password: {fromEnv: MQTT_PASSWORD_<NAME>}` with a comment; for other clients the
  same line is printed commented out, so applying the export leaves their password alone.
- A device that a manifest cannot express (an empty CD-ROM drive, a disk on a USB bus, a macvtap
  NIC) is left out of the document alone, with a comment; every other disk and interface is exported.
  The VirtualMachine kind never compares nor removes such a device, so the round trip still holds.

Targets: libvirt (from --libvirt-uri) whenever a libvirt kind is exported; the broker only when an
MQTT kind is exported and a broker login is configured (--mqtt-username / RECONCILER_MQTT_USERNAME).
Without --kind, a missing login means "no broker here": MQTT kinds are skipped with a note on stderr.
Asking for an MQTT kind with --kind and no login is an error.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from .errors import ReconcilerError
from .kinds.registry import NAMES as KINDS
from .kinds.registry import of_target
from .model import Live, ResourceId, Snapshot
from .units import format_bytes

LIBVIRT_KINDS, MQTT_KINDS = of_target("libvirt"), of_target("mqtt")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PASSWORD_MARK = "__reconciler_password_placeholder__"


@dataclass
class Doc:
    kind: str
    name: str
    spec: dict
    labels: dict = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)
    # (env var, active) for MqttClient: active means the password line is live, not commented out.
    password: tuple[str, bool] | None = None

    def manifest(self) -> dict:
        meta: dict[str, Any] = {"name": self.name}
        if self.labels:
            meta["labels"] = dict(sorted(self.labels.items()))
        return {"apiVersion": "reconciler/v1", "kind": self.kind, "metadata": meta, "spec": self.spec}


class ExportError(ReconcilerError):
    """Export cannot run with the given targets and kinds."""


# --------------------------------------------------------------------------- command

@dataclass(frozen=True)
class Exported:
    """What an export found: the documents, notes on what was left out, and where it read from."""
    docs: tuple
    notes: tuple[str, ...]
    sources: tuple[str, ...]


def export(targets, kinds: set[str], *, include_all: bool = False, explicit_kinds: bool = False,
           scope: str = "default") -> Exported:
    """Read `kinds` from the targets and turn them into manifests. Renders nothing."""
    from .run import make_providers, read_all, unique
    notes: list[str] = []
    kinds = set(kinds)
    if kinds & set(MQTT_KINDS) and not targets.mqtt_username:
        if explicit_kinds:
            wanted = ", ".join(k for k in KINDS if k in kinds and k in MQTT_KINDS)
            raise ExportError(f"exporting {wanted} needs the broker's admin login: give --mqtt-username "
                              "(or RECONCILER_MQTT_USERNAME) and RECONCILER_MQTT_PASSWORD or RECONCILER_MQTT_PASSWORD_FILE")
        kinds -= set(MQTT_KINDS)
        notes.append("MQTT kinds skipped: no broker login configured (--mqtt-username)")
    providers = make_providers(kinds, targets)
    try:
        snapshot = read_all(providers)
    finally:
        for p in unique(providers):
            p.close()
    docs, more = build(snapshot, kinds, include_all=include_all, scope=scope)
    sources = []
    if kinds & set(LIBVIRT_KINDS):
        sources.append(f"libvirt {targets.libvirt_uri}")
    if kinds & set(MQTT_KINDS):
        sources.append(f"broker {targets.mqtt_url}")
    return Exported(tuple(docs), tuple(notes + more), tuple(sources))


def render_yaml(result: Exported, include_all: bool = False) -> str:
    """Multi-document YAML with a header line saying what was read and when."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = (f"# reconciler export{' --all' if include_all else ''} of {', '.join(result.sources) or 'nothing'} "
              f"at {stamp}: {len(result.docs)} document(s)\n")
    return header + render(result.docs)


# --------------------------------------------------------------------------- rendering

def env_name(client: str) -> str:
    """The placeholder variable of a client's password: sensor-01 -> MQTT_PASSWORD_SENSOR_01."""
    return "MQTT_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", client).upper()


def render(docs: Iterable[Doc]) -> str:
    parts = []
    for d in docs:
        body = yaml.safe_dump(d.manifest(), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
        if d.password is not None:
            var, active = d.password
            if active:
                line = (f"password: {{fromEnv: {var}}}  # secret not exported: set {var} to this client's "
                        f"password (or use fromFile)")
            else:
                line = (f"# password: {{fromEnv: {var}}}  # not set by the reconciler, so not managed; "
                        f"uncomment to manage it")
            body = body.replace(f"password: {_PASSWORD_MARK}", line)
        head = "".join(f"# {c}\n" for c in d.comments)
        parts.append("---\n" + head + body)
    return "".join(parts)


# --------------------------------------------------------------------------- building (pure)

def build(snapshot: Snapshot, kinds: set[str], include_all: bool = False,
          scope: str = "default") -> tuple[list[Doc], list[str]]:
    """The documents to print for `kinds` from a snapshot, and notes on what was left out.
    "Managed" means marked by the reconciler in `scope` (what --prune in that scope treats as its own)."""
    objs = snapshot.objects
    notes: list[str] = []
    other_scopes = [rid for rid, l in objs.items() if rid.kind in kinds and l.managed
                    and (l.facts.get("scope") or "default") != scope]
    if other_scopes and not include_all:
        notes.append(f"{len(other_scopes)} object(s) managed in another scope left out "
                     f"(set RECONCILER_SCOPE, or use --all to adopt them into scope {scope!r})")

    def mine(live: Live) -> bool:
        return include_all or (live.managed and (live.facts.get("scope") or "default") == scope)
    by_kind: dict[str, list[Live]] = {k: [] for k in KINDS}
    for rid, live in sorted(objs.items()):
        if rid.kind in by_kind:
            by_kind[rid.kind].append(live)

    def nameable(live: Live) -> bool:
        if live.id.kind == "Topic" or NAME.match(live.id.name):
            return True
        notes.append(f"{live.id} skipped: its name cannot be written in a manifest")
        return False

    docs: list[Doc] = []

    # libvirt: VMs decide which storage is "theirs" when --all is not given.
    vms = [v for v in by_kind["VirtualMachine"] if mine(v) and nameable(v)]
    disks_by_path = {l.facts.get("path"): l for l in by_kind["Disk"] if l.facts.get("path")}
    if include_all:
        disks = [d for d in by_kind["Disk"] if nameable(d)]
        pools = [p for p in by_kind["StoragePool"] if nameable(p)]
    else:
        wanted: dict[str, Live] = {}
        todo = [disks_by_path[d["path"]] for v in vms for d in v.spec.get("disks", ()) if d.get("path") in disks_by_path]
        while todo:
            d = todo.pop()
            if d.id.name in wanted:
                continue
            wanted[d.id.name] = d
            b = d.spec.get("backingStore")
            if b in disks_by_path:
                todo.append(disks_by_path[b])
        disks = [d for _, d in sorted(wanted.items()) if nameable(d)]
        pool_names = {d.spec.get("pool") for d in disks}
        pools = [p for p in by_kind["StoragePool"] if p.id.name in pool_names and nameable(p)]

    pool_docs = [_pool(p, notes) for p in pools] if "StoragePool" in kinds else []
    disk_docs_all = {d.id.name: doc for d in disks if (doc := _disk_base(d, notes)) is not None}
    disk_names = set(disk_docs_all) if "Disk" in kinds else set()
    if "Disk" in kinds:
        for d in disks:
            doc = disk_docs_all.get(d.id.name)
            if doc is not None:
                _disk_backing(doc, d, disks_by_path, disk_names)
    docs += [d for d in pool_docs if d is not None]
    docs += [disk_docs_all[n] for n in sorted(disk_names)]
    if "VirtualMachine" in kinds:
        docs += [_vm(v, disks_by_path, disk_names) for v in vms]

    # MQTT: managed ones, plus the unmarked objects they refer to (a reference must resolve).
    selected: dict[ResourceId, Live] = {}
    for kind in ("MqttRole", "MqttGroup", "MqttClient", "Topic"):
        if kind in kinds:
            for live in by_kind[kind]:
                if mine(live) and nameable(live):
                    selected[live.id] = live
    pulled_in: dict[ResourceId, str] = {}
    changed = True
    while changed:
        changed = False
        for live in list(selected.values()):
            for ref in _mqtt_refs(live):
                target = objs.get(ref)
                if ref.kind in kinds and ref not in selected and target is not None and nameable(target):
                    selected[ref] = target
                    pulled_in[ref] = str(live.id)
                    changed = True
    for rid, live in sorted(selected.items(), key=lambda kv: (KINDS.index(kv[0].kind), kv[0].name)):
        d = _mqtt(live, notes)
        if d is None:
            continue
        if rid in pulled_in:
            d.comments[:] = [c for c in d.comments if not c.startswith("not marked")]
            d.comments.insert(0, f"not marked as managed; exported because {pulled_in[rid]} refers to it "
                                 "(applying this adopts it)")
        docs.append(d)

    order = {k: i for i, k in enumerate(KINDS)}
    docs.sort(key=lambda d: (order[d.kind], d.name))
    return _self_check(docs, notes), notes


def _self_check(docs: list[Doc], notes: list[str]) -> list[Doc]:
    """Drop (with a note) any document its kind's schema or rules would refuse: never print an invalid one."""
    from .kinds import KIND_RULES
    from .manifests import validator
    out = []
    for d in docs:
        m = d.manifest()
        if d.password is not None:
            m["spec"] = {k: v for k, v in m["spec"].items() if k != "password"}
            if d.password[1]:
                m["spec"]["password"] = {"fromEnv": d.password[0]}
        errors = list(validator(d.kind).iter_errors(m))
        problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
        if not problems:
            spec = {k: v for k, v in m["spec"].items() if k != "password"}
            problems = [msg for _, msg in KIND_RULES[d.kind].check(d.name, spec)]
        if problems:
            notes.append(f"{d.kind}/{d.name} skipped: a manifest cannot express it ({problems[0][:200]})")
            continue
        out.append(d)
    return out


def _pool(p: Live, notes: list[str]) -> Doc | None:
    s = p.spec
    if s.get("type") != "dir":
        notes.append(f"{p.id} skipped: pool type {s.get('type')!r} is not supported (only dir)")
        return None
    doc = Doc("StoragePool", p.id.name, {"type": "dir", "path": s["path"], "autostart": bool(s.get("autostart"))})
    if not p.facts.get("active", True):
        doc.comments.append("this pool is not active on the host: applying starts it")
    return doc


def _disk_base(d: Live, notes: list[str]) -> Doc | None:
    s = d.spec
    if s.get("format") not in ("qcow2", "raw"):
        notes.append(f"{d.id} skipped: volume format {s.get('format')!r} is not supported (qcow2 or raw)")
        return None
    if not s.get("capacity"):
        notes.append(f"{d.id} skipped: it has no capacity")
        return None
    return Doc("Disk", d.id.name, {"pool": s["pool"], "capacity": format_bytes(s["capacity"]), "format": s["format"]})


def _disk_backing(doc: Doc, d: Live, disks_by_path: dict, exported: set[str]) -> None:
    b = d.spec.get("backingStore")
    if not b:
        return
    base = disks_by_path.get(b)
    if base is not None and base.id.name in exported:
        doc.spec["backingStore"] = {"disk": base.id.name}
    else:
        doc.spec["backingStore"] = {"path": b}


def _vm(v: Live, disks_by_path: dict, exported_disks: set[str]) -> Doc:
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
    from .kinds.libvirt import inexpressible_disk, inexpressible_interface
    disks = []
    for d in s.get("disks", ()):
        why = inexpressible_disk(d)
        if why:
            comments.append(f"disk {why}: a manifest cannot express it; it is left as it is")
            continue
        name = d.get("disk") or getattr(disks_by_path.get(d["path"]), "id", ResourceId("", "")).name or None
        entry: dict[str, Any]
        if name and name in exported_disks and d.get("device", "disk") == "disk":
            entry = {"disk": name, "target": d["target"], "bus": d["bus"]}
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
    if not v.managed:
        comments.insert(0, "not marked as managed: applying this adopts it")
    return Doc("VirtualMachine", v.id.name, spec, dict(v.labels), comments)


def _mqtt_refs(live: Live) -> list[ResourceId]:
    s = live.spec
    out = []
    if live.id.kind in ("MqttGroup", "MqttClient"):
        out += [ResourceId("MqttRole", r["name"]) for r in s.get("roles") or ()]
    if live.id.kind == "MqttClient":
        out += [ResourceId("MqttGroup", g["name"]) for g in s.get("groups") or ()]
    return out


def _text_fields(s: dict, spec: dict) -> None:
    if s.get("description"):
        spec["description"] = s["description"]
    if s.get("textName"):
        spec["textName"] = s["textName"]


def _refs(items) -> list[dict]:
    out = []
    for r in items or ():
        e = {"name": r["name"]}
        if r.get("priority", -1) != -1:
            e["priority"] = r["priority"]
        out.append(e)
    return out


def _mqtt(live: Live, notes: list[str]) -> Doc | None:
    s, kind, name = live.spec, live.id.kind, live.id.name
    spec: dict[str, Any] = {}
    doc = Doc(kind, name, spec, dict(live.labels))
    if kind == "MqttRole":
        _text_fields(s, spec)
        spec["acls"] = [{"type": a["type"], "topic": a["topic"], "allow": a["allow"], "priority": a["priority"]}
                        for a in s.get("acls") or ()]
    elif kind == "MqttGroup":
        _text_fields(s, spec)
        spec["roles"] = _refs(s.get("roles"))
    elif kind == "MqttClient":
        var = env_name(name)
        spec["password"] = _PASSWORD_MARK
        doc.password = (var, bool(live.managed and live.facts.get("fingerprint")))
        if s.get("clientId"):
            spec["clientId"] = s["clientId"]
        _text_fields(s, spec)
        spec["roles"] = _refs(s.get("roles"))
        spec["groups"] = _refs(s.get("groups"))
        if s.get("disabled"):
            spec["disabled"] = True
    elif kind == "Topic":
        r = s.get("retained") or {}
        if live.facts.get("binary") or r.get("payload") is None:
            notes.append(f"{live.id} skipped: its retained message is binary, a manifest holds text")
            return None
        if name.startswith("$"):
            return None
        spec["retained"] = {"payload": r["payload"], "qos": r.get("qos", 1)}
    if not live.managed and kind != "Topic":
        doc.comments.insert(0, "not marked as managed: applying this adopts it")
    elif not live.managed:
        doc.comments.insert(0, "retained message not published by the reconciler: applying this adopts it")
    return doc
