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
from dataclasses import dataclass
from typing import Iterable

import yaml

from .errors import ReconcilerError
from .kinds.registry import NAMES as KINDS
from .kinds.registry import of_target
from .kinds.exporting import Doc, ExportContext
from .kinds.mqtt import PASSWORD_PLACEHOLDER
from .model import Live, ResourceId, Snapshot

LIBVIRT_KINDS, MQTT_KINDS = of_target("libvirt"), of_target("mqtt")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


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
            body = body.replace(f"password: {PASSWORD_PLACEHOLDER}", line)
        head = "".join(f"# {c}\n" for c in d.comments)
        parts.append("---\n" + head + body)
    return "".join(parts)


# --------------------------------------------------------------------------- building (pure)

def build(snapshot: Snapshot, kinds: set[str], include_all: bool = False,
          scope: str = "default") -> tuple[list[Doc], list[str]]:
    """The documents to print for `kinds` from a snapshot, and notes on what was left out: one loop
    over the kinds of the registry, each turning its live objects into documents (`to_manifest`).

    Selection: with --all every object a kind can export; otherwise the objects managed in `scope`
    (what --prune in that scope treats as its own), plus whatever those need for their references to
    resolve (`export_needs`: a VM's volumes, a disk's pool and base, a client's roles and groups)."""
    from .kinds.registry import KINDS as REGISTRY
    objs = snapshot.objects
    notes: list[str] = []
    exportable = {k.kind: k for k in REGISTRY if hasattr(k, "to_manifest")}
    other_scopes = [rid for rid, l in objs.items() if rid.kind in kinds and l.managed
                    and l.scope != scope]
    if other_scopes and not include_all:
        notes.append(f"{len(other_scopes)} object(s) managed in another scope left out "
                     f"(set RECONCILER_SCOPE, or use --all to adopt them into scope {scope!r})")

    def nameable(live: Live) -> bool:
        if live.id.kind == "Topic" or NAME.match(live.id.name):
            return True
        notes.append(f"{live.id} skipped: its name cannot be written in a manifest")
        return False

    ctx = ExportContext(objs, set(), notes)
    if include_all:
        roots = [rid for rid in objs if rid.kind in exportable]
    else:
        roots = [rid for rid, l in objs.items() if rid.kind in exportable and exportable[rid.kind].prunable
                 and l.managed and l.scope == scope]
    selected: set[ResourceId] = set()
    pulled_in: dict[ResourceId, str] = {}
    todo = [(rid, None) for rid in sorted(roots)]
    while todo:
        rid, by = todo.pop()
        live = objs.get(rid)
        if rid in selected or live is None or rid.kind not in exportable or not nameable(live):
            continue
        selected.add(rid)
        if by is not None:
            pulled_in[rid] = by
        needs = getattr(exportable[rid.kind], "export_needs", None)
        for need in needs(live, ctx) if needs else ():
            todo.append((need, str(rid)))
    # Only the kinds asked for are printed; a reference to one not printed is written by path where it can be.
    ctx.selected = {rid for rid in selected if rid.kind in kinds}

    docs: list[Doc] = []
    for _ in range(3):      # a document that cannot be made (an unsupported format) is dropped, and
        docs = []           # whatever referred to it by name is made again with its path instead
        for kind in REGISTRY:
            if kind.kind not in kinds or kind.kind not in exportable:
                continue
            for rid in sorted(r for r in ctx.selected if r.kind == kind.kind):
                d = kind.to_manifest(objs[rid], ctx)
                if d is None:
                    continue
                if rid in pulled_in and kind.prunable and not objs[rid].managed:
                    d.comments[:] = [c for c in d.comments if not c.startswith("not marked")]
                    d.comments.insert(0, f"not marked as managed; exported because {pulled_in[rid]} refers to it "
                                         "(applying this adopts it)")
                docs.append(d)
        made = {ResourceId(d.kind, d.name) for d in docs}
        if made >= ctx.selected:
            break
        ctx.selected &= made
        notes[:] = list(dict.fromkeys(notes))
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
