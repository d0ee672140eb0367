"""The libvirt side of Snapshot, Restore and BackupPolicy: reading snapshots, records and backup
volumes into Live objects, and carrying out their actions. Decides nothing (kinds/backup.py does).

What this machine's libvirt 9.0 / QEMU 7.2 can do, and so what is used:
- snapshots are internal qcow2 snapshots (virDomainSnapshotCreateXML); a running VM's must include
  its RAM, and external disk-only snapshots can be neither reverted nor deleted on 9.0;
- a running VM is backed up live with virDomainBackupBegin (push mode) into volumes created first
  in the policy's pool; a shut-off VM (which the backup API refuses) by cloning each disk volume
  with virStorageVolCreateXMLFrom (libvirt runs qemu-img convert on the host);
- a backup is good only once its manifest volume (`<vm>@<policy>@<stamp>.json`) is written, which is
  the last step: a run killed before that leaves volumes that are never counted, and are removed
  (with any backup job still running into them) by the next run;
- restoring from a backup writes each backup volume's content into the VM's disk with
  `qemu-img convert -n` on this host (the disk keeps its file, format and internal snapshots)."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from ...errors import ApplyError
from ...kinds import backup as rules
from ...model import HostFacts, Action, Live, Options, ResourceId, Snapshot
from . import domxml
from .handlers import handles, reads

# Record updates are read-modify-write of one metadata element; the applier may run two actions on
# one VM's records at once (two snapshots taken in parallel).
_RECORDS_LOCK = threading.Lock()
# The applier runs independent actions of one kind on threads; two on the same VM (two policies
# backing it up, a snapshot and another) must still take turns: libvirt allows one job per domain.
_VM_LOCKS: dict[str, threading.Lock] = {}
_VM_LOCKS_GUARD = threading.Lock()


def _vm_lock(vm: str) -> threading.Lock:
    with _VM_LOCKS_GUARD:
        return _VM_LOCKS.setdefault(vm, threading.Lock())


# A manifest is a few hundred bytes; anything much larger is not one of ours.
MANIFEST_MAX = 1 << 20
# How often a running backup job is polled, and how long it may take before the run gives up on it.
POLL = 0.2
BACKUP_TIMEOUT = 6 * 3600.0
AGENT_TIMEOUT = 5


def _code(e: libvirt.libvirtError) -> int:
    return e.get_error_code()


# --------------------------------------------------------------------------- records on the VM

def _records(dom: libvirt.virDomain) -> dict:
    return domxml.records_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def _update_records(dom: libvirt.virDomain, change) -> None:
    """Apply `change(records)` to the VM's records element, in its definition (and the running VM)."""
    with _RECORDS_LOCK:
        rec = _records(dom)
        change(rec)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.records_xml(rec), domxml.RECORDS_PREFIX,
                        domxml.RECORDS_NS, flags)


# --------------------------------------------------------------------------- snapshots

def parse_snapshot(xml: str) -> dict:
    root = ET.fromstring(xml)
    mem = root.find("memory")
    state = (root.findtext("state") or "").strip()
    return {"name": root.findtext("name"), "description": root.findtext("description"),
            "state": state, "taken": int(root.findtext("creationTime") or 0),
            "has_memory": (mem is not None and mem.get("snapshot") not in (None, "no")) or state in ("running", "paused"),
            "disks": [d.get("name") for d in root.findall("disks/disk") if d.get("snapshot") not in ("no",)]}


def vm_records(core: Snapshot) -> dict[str, dict]:
    """Each VM's records (snapshots taken, restores run) as the core read found them on the domain."""
    return {rid.name: live.facts["records"] for rid, live in core.objects.items()
            if rid.kind == "VirtualMachine" and live.facts.get("records")}


@reads("Snapshot")
def read_snapshots(p, conn, core: Snapshot) -> Snapshot:
    """Every snapshot of every domain that has one (one bulk list), and every snapshot a VM's records
    say we took that is no longer there (read as vanished)."""
    records = vm_records(core)
    objects: dict[ResourceId, Live] = {}
    seen: set = set()
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_HAS_SNAPSHOT):
        try:
            vm = dom.name()
            snaps = [parse_snapshot(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)]
        except libvirt.libvirtError as e:
            if _code(e) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT):
                continue   # deleted by another tool since the list
            raise
        rec = records.get(vm, {}).get("snapshots", {})
        for s in snaps:
            rid = ResourceId("Snapshot", s["name"])
            recorded = s["name"] in rec
            if rid in objects and not recorded:
                continue   # the same name on two VMs: the one we recorded wins
            memory = rec[s["name"]]["memory"] if recorded else s["has_memory"]
            objects[rid] = Live(rid, {"vm": vm, "memory": memory, "description": s["description"], "state": "present"},
                                managed=recorded,
                                facts={"domain": vm, "taken": s["taken"], "snapshot_state": s["state"],
                                       "has_memory": s["has_memory"], "disks": tuple(s["disks"])})
            seen.add((vm, s["name"]))
    for vm, rec in records.items():
        for name, r in rec.get("snapshots", {}).items():
            rid = ResourceId("Snapshot", name)
            if (vm, name) in seen or rid in objects:
                continue
            objects[rid] = Live(rid, {"vm": vm, "memory": r["memory"], "description": None, "state": "present"},
                                managed=True, facts={"domain": vm, "taken": r["taken"], "vanished": True})
    return Snapshot(objects)


def _snapshot_xml(name: str, description: str | None, running: bool) -> str:
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description is not None:
        ET.SubElement(root, "description").text = description
    # libvirt 9.0 takes an internal snapshot of a running VM only with its RAM.
    ET.SubElement(root, "memory", {"snapshot": "internal" if running else "no"})
    return ET.tostring(root, encoding="unicode")


def _find_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
    try:
        return dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as e:
        if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return None
        raise


@handles("create", "Snapshot")
def create_snapshot(p, a: Action, o: Options) -> str:
    with _vm_lock(a.desired.spec["vm"]):
        return _create_snapshot(p, a, o)


def _create_snapshot(p, a: Action, o: Options) -> str:
    spec = a.desired.spec
    dom = p.conn.lookupByName(spec["vm"])
    snap = _find_snapshot(dom, a.id.name)
    if snap is not None:
        # An earlier run was killed between taking it and recording it: record it, never take it again.
        note = "found it taken by an interrupted run; recorded it"
    else:
        running = bool(dom.isActive())
        snap = dom.snapshotCreateXML(_snapshot_xml(a.id.name, spec["description"], running), 0)
        note = "took an internal snapshot of " + ("the running VM, RAM included" if running else "the shut-off VM's disks")
    taken = parse_snapshot(snap.getXMLDesc(0))["taken"]
    _update_records(dom, lambda rec: rec["snapshots"].__setitem__(a.id.name, {"memory": spec["memory"], "taken": taken}))
    return f"{note} ({rules.listed(taken)})"


@handles("update", "Snapshot")
def update_snapshot(p, a: Action, o: Options) -> str:
    spec = a.desired.spec
    dom = p.conn.lookupByName(spec["vm"])
    snap = dom.snapshotLookupByName(a.id.name, 0)
    if "spec.description" in a.fields:
        root = ET.fromstring(snap.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE))
        el = root.find("description")
        if spec["description"] is None:
            if el is not None:
                root.remove(el)
        else:
            if el is None:
                el = ET.Element("description")
                root.insert(1, el)
            el.text = spec["description"]
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if snap.isCurrent(0):
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), flags)
    taken = parse_snapshot(snap.getXMLDesc(0))["taken"]
    _update_records(dom, lambda rec: rec["snapshots"].__setitem__(a.id.name, {"memory": spec["memory"], "taken": taken}))
    return "updated " + ", ".join(a.fields)


@handles("delete", "Snapshot")
def delete_snapshot(p, a: Action, o: Options) -> str:
    vm = (a.live.facts.get("domain") if a.live else None) or a.desired.spec["vm"]
    dom = p._lookup(vm)
    if dom is None:
        return "its VM is gone"
    snap = _find_snapshot(dom, a.id.name)
    if snap is not None:
        snap.delete(0)
    _update_records(dom, lambda rec: rec["snapshots"].pop(a.id.name, None))
    return "deleted" if snap is not None else "forgot the record of the vanished snapshot"


# --------------------------------------------------------------------------- restores

@reads("Restore")
def read_restores(p, conn, core: Snapshot) -> Snapshot:
    objects: dict[ResourceId, Live] = {}
    for vm, rec in vm_records(core).items():
        for name, r in rec.get("restores", {}).items():
            rid = ResourceId("Restore", name)
            objects[rid] = Live(rid, {"vm": vm}, managed=True,
                                facts={"domain": vm, "done": r["done"], "source": r["source"]})
    return Snapshot(objects)


def _disk_formats(xml: str) -> dict[str, tuple[str, str]]:
    """target -> (file, format) of a domain's file-backed, writable disks."""
    out = {}
    for d in ET.fromstring(xml).findall("devices/disk"):
        src, tgt, drv = d.find("source"), d.find("target"), d.find("driver")
        if d.get("device", "disk") != "disk" or src is None or tgt is None or not src.get("file") \
                or d.find("readonly") is not None:
            continue
        out[tgt.get("dev")] = (src.get("file"), (drv.get("type") if drv is not None else None) or "raw")
    return out


@handles("restore", "Restore")
def restore(p, a: Action, o: Options) -> str:
    with _vm_lock(a.desired.spec["vm"]):
        return _restore(p, a, o)


def _restore(p, a: Action, o: Options) -> str:
    spec = a.desired.spec
    res = spec["resolved"]
    vm = spec["vm"]
    dom = p.conn.lookupByName(vm)
    # The definition stays as declared: a revert brings back the snapshot's own definition, so the
    # current one is put back afterwards.
    saved = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    want = res.get("state") or ("running" if dom.isActive() else "shutoff")
    notes = []
    if dom.isActive():
        forced = p._shutdown(dom, o.shutdown_timeout)
        notes.append(f"stopped it ({forced})" if forced else "stopped it")
    if res.get("snapshot"):
        snap = dom.snapshotLookupByName(res["snapshot"], 0)
        info = parse_snapshot(snap.getXMLDesc(0))
        resume = info["has_memory"] and res.get("memory") and want in ("running", "paused")
        if info["has_memory"]:
            # A RAM snapshot always comes back running; resumed from RAM only when the Snapshot says memory: true.
            flag = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if resume and want == "running" \
                else libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
            dom.revertToSnapshot(snap, flag)
            if not resume and dom.isActive():
                dom.destroy()
        else:
            dom.revertToSnapshot(snap, 0)
        source = f"snapshot:{res['snapshot']}"
        notes.append(f"reverted to snapshot {res['snapshot']} ({rules.listed(info['taken'])})"
                     + (", RAM included" if resume else ""))
    else:
        b = res["backup"]
        current = _disk_formats(saved)
        pool = p._pool_of(b["pool"])
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise ApplyError("restoring from a backup needs qemu-img on the VM's host (Debian: qemu-utils)")
        for d in b["disks"]:
            if d["target"] not in current:
                raise ApplyError(f"the VM has no disk {d['target']} to restore the backup's copy into")
            path, fmt = current[d["target"]]
            src = pool.storageVolLookupByName(d["volume"]).path()
            # -n: write into the existing disk (same file, format and internal snapshots) instead of a new one.
            r = subprocess.run([qemu_img, "convert", "-n", "-f", d.get("format", "qcow2"), "-O", fmt, src, path],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise ApplyError(f"copying {d['volume']} back into {path} failed: "
                                 f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['qemu-img failed']}")
        source = f"backup:{spec['backup']['policy']}@{b['stamp']}"
        notes.append(f"copied back {', '.join(d['target'] for d in b['disks'])} from the backup of "
                     f"{rules.listed(b['time'])}")
    rec = domxml.records_of(saved)
    rec["restores"][a.id.name] = {"done": int(time.time()), "source": source}
    with _RECORDS_LOCK:
        # Recorded in the same define that puts the declared definition back: it never runs twice.
        p.conn.defineXML(domxml.with_records(saved, rec))
    state_note = p._set_state(dom, want, o)
    notes.append(f"now {want}" + (f" ({state_note})" if isinstance(state_note, str) and state_note else ""))
    return "; ".join(notes)


# --------------------------------------------------------------------------- backups

def _download(conn, path: str, size: int) -> bytes:
    vol = conn.storageVolLookupByPath(path)
    st = conn.newStream(0)
    vol.download(st, 0, size, 0)
    chunks = []
    while True:
        data = st.recv(65536)
        if not data or not isinstance(data, bytes):
            break
        chunks.append(data)
    st.finish()
    return b"".join(chunks)


def _manifest(conn, v: dict) -> dict | None:
    if not v.get("capacity") or v["capacity"] > MANIFEST_MAX:
        return None
    try:
        data = _download(conn, v["path"], v["capacity"]).rstrip(b"\0")
        m = json.loads(data.decode("utf-8"))
    except (libvirt.libvirtError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) else None


def _backup_volumes(conn) -> dict[str, dict]:
    """The volumes whose names are backups', in every active pool: one listing per pool (names come
    with it), then one XMLDesc per backup volume only."""
    out: dict[str, dict] = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        try:
            vols = pool.listAllVolumes(0)
            pool_name = pool.name()
        except libvirt.libvirtError as e:
            if _code(e) in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_OPERATION_INVALID):
                continue   # deleted or stopped since the list
            raise
        for vol in vols:
            if vol.name() in out or rules.parse_volume_name(vol.name()) is None:
                continue
            try:
                v = domxml.parse_volume(vol.XMLDesc(0))
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    continue
                raise
            v["pool"] = pool_name
            out[v["name"]] = v
    return out


def read_backups(p, conn, volumes: dict | None = None) -> list[rules.Backup]:
    """Every backup in every pool, good or not."""
    groups: dict[tuple, dict] = {}
    for name, v in (_backup_volumes(conn) if volumes is None else volumes).items():
        parts = rules.parse_volume_name(name)
        if parts is None:
            continue
        key = (v.get("pool"), parts["vm"], parts["policy"], parts["stamp"])
        g = groups.setdefault(key, {"time": parts["time"], "volumes": {}, "manifest": None})
        g["volumes"][name] = v
        if parts["manifest"]:
            g["manifest"] = v
    out = []
    for (pool, vm, policy, st), g in sorted(groups.items(), key=lambda kv: kv[1]["time"]):
        m = _manifest(conn, g["manifest"]) if g["manifest"] else None
        problem = ""
        disks: tuple = ()
        if g["manifest"] is None:
            problem = "unfinished: no manifest"
        elif m is None or not m.get("complete") or (m.get("vm"), m.get("policy"), m.get("stamp")) != (vm, policy, st):
            problem = "unfinished: manifest incomplete or unreadable"
        else:
            disks = tuple({k: d.get(k) for k in ("target", "volume", "format", "capacity")} for d in m.get("disks", ()))
            missing = [d["volume"] for d in disks if d["volume"] not in g["volumes"]]
            if missing or not disks:
                problem = "broken: missing " + (", ".join(missing) or "disks")
        out.append(rules.Backup(vm=vm, policy=policy, pool=pool, stamp=st, time=g["time"], good=not problem,
                                disks=disks, volumes=tuple(sorted(g["volumes"])),
                                consistency=(m or {}).get("consistency", ""), problem=problem))
    return out


@reads("BackupPolicy")
def read_policies(p, conn, core: Snapshot) -> Snapshot:
    volumes = _backup_volumes(conn)
    by_policy: dict[str, list] = {}
    for b in read_backups(p, conn, volumes):
        by_policy.setdefault(b.policy, []).append(b)
    objects = {ResourceId("BackupPolicy", pol): Live(ResourceId("BackupPolicy", pol), {}, managed=True,
                                                     facts={"backups": tuple(bs)})
               for pol, bs in by_policy.items()}
    # Backup volumes are read as Disks by the bulk read; marked, they are never listed as orphaned disks.
    for name, v in volumes.items():
        if rules.parse_volume_name(name) is not None:
            rid = ResourceId("Disk", name)
            objects[rid] = Live(rid, {"pool": v.get("pool"), "capacity": v.get("capacity"), "format": v.get("format"),
                                      "backingStore": v.get("backingStore"), "state": "present"},
                                facts={"path": v.get("path"), "backup": True})
    # The clock the pure rules judge `every` by, read once with the rest of live state.
    return Snapshot(objects, HostFacts(now=rules.now()))


def _volume_xml(name: str, capacity: int, fmt: str) -> str:
    return domxml.build_volume(name, capacity, fmt, None)


def _delete_volume(pool: libvirt.virStoragePool, name: str, wait: float = 0.0) -> bool:
    """Delete a volume (False if it is not there). With `wait`, a volume libvirtd is still building
    (the clone of a run killed mid-copy goes on without it) is deleted once it is built."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.storageVolLookupByName(name).delete(0)
            return True
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            building = _code(e) == libvirt.VIR_ERR_OPERATION_INVALID and "being allocated" in (e.get_error_message() or "")
            if not building or time.monotonic() > deadline:
                raise
        time.sleep(POLL)


def _stale_job(dom: libvirt.virDomain, debris_paths: set) -> bool:
    """A backup job still copying into the remains of a killed run is aborted (True); anyone else's is
    not ours to stop."""
    if not dom.isActive() or dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
        return False
    try:
        targets = {t.get("file") for t in ET.fromstring(dom.backupGetXMLDesc(0)).iter("target")}
    except libvirt.libvirtError:
        targets = set()
    if not targets & debris_paths:
        raise ApplyError("another job (not a backup of ours) is running on the VM; try again when it ends")
    dom.abortJob()
    deadline = time.monotonic() + 60
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE and time.monotonic() < deadline:
        time.sleep(POLL)
    return True


def _freeze(dom: libvirt.virDomain) -> bool:
    """Freeze the guest's filesystems through the guest agent when it has one that answers."""
    if "org.qemu.guest_agent.0" not in dom.XMLDesc(0):
        return False
    try:
        dom.agentSetResponseTimeout(AGENT_TIMEOUT, 0)
        return dom.fsFreeze(None, 0) > 0
    except libvirt.libvirtError:
        return False


def _backup_live(dom: libvirt.virDomain, targets: list[tuple[str, str]]) -> str:
    """Push-mode backup of the running VM into `targets` [(disk target, file)]; returns its consistency."""
    root = ET.Element("domainbackup", {"mode": "push"})
    disks = ET.SubElement(root, "disks")
    for target, path in targets:
        d = ET.SubElement(disks, "disk", {"name": target, "backup": "yes", "type": "file"})
        ET.SubElement(d, "target", {"file": path})
        ET.SubElement(d, "driver", {"type": "qcow2"})
    frozen = _freeze(dom)
    try:
        dom.backupBegin(ET.tostring(root, encoding="unicode"), None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    finally:
        if frozen:
            try:
                dom.fsThaw(None, 0)
            except libvirt.libvirtError:
                pass
    deadline = time.monotonic() + BACKUP_TIMEOUT
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        if time.monotonic() > deadline:
            dom.abortJob()
            raise ApplyError(f"the backup job did not finish within {BACKUP_TIMEOUT:.0f}s; aborted it")
        time.sleep(POLL)
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if not stats.get("success") or stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise ApplyError(f"the backup job did not complete: {stats.get('errmsg') or 'failed'}")
    return "frozen" if frozen else "crash-consistent"


def _upload(conn, vol: libvirt.virStorageVol, data: bytes) -> None:
    st = conn.newStream(0)
    vol.upload(st, 0, len(data), 0)
    sent = 0
    while sent < len(data):
        n = st.send(data[sent:])
        if n < 0:
            st.abort()
            raise ApplyError("writing the backup manifest failed")
        sent += n
    st.finish()


@handles("create", "BackupPolicy")
def create_backup(p, a: Action, o: Options) -> str:
    with _vm_lock(a.desired.spec["vm"]):
        return _create_backup(p, a, o)


def _create_backup(p, a: Action, o: Options) -> str:
    spec = a.desired.spec
    res = spec["resolved"]
    vm, policy = spec["vm"], a.id.name
    conn = p.conn
    dom = conn.lookupByName(vm)
    pool = p._pool_of(spec["pool"])
    pool_dir = domxml.parse_pool(pool.XMLDesc(0))["path"] or ""
    debris = list(res.get("debris", ()))
    aborted = _stale_job(dom, {f"{pool_dir.rstrip('/')}/{n}" for n in debris})
    for name in debris:
        _delete_volume(pool, name, wait=BACKUP_TIMEOUT)
    sources = _disk_formats(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    if not sources:
        raise ApplyError(f"VM {vm} has no writable file-backed disk to back up")
    t = time.time()
    st = rules.stamp(t)
    while any(_exists(pool, n) for n in (rules.manifest_volume_name(vm, policy, st),)):
        time.sleep(1.0)   # two backups in one second would share a name
        t = time.time()
        st = rules.stamp(t)
    made: list[str] = []
    disks = []
    started = time.monotonic()
    try:
        live = bool(dom.isActive())
        if live:
            targets = []
            for target, (path, fmt) in sorted(sources.items()):
                cap = dom.blockInfo(target)[0]
                name = rules.disk_volume_name(vm, policy, st, target)
                vol = pool.createXML(_volume_xml(name, cap, "qcow2"), 0)
                made.append(name)
                targets.append((target, vol.path()))
                disks.append({"target": target, "volume": name, "format": "qcow2", "capacity": cap, "source": path})
            consistency = _backup_live(dom, targets)
        else:
            for target, (path, fmt) in sorted(sources.items()):
                try:
                    src = conn.storageVolLookupByPath(path)
                except libvirt.libvirtError:
                    raise ApplyError(f"disk {target} ({path}) is not a libvirt volume; a shut-off VM's disks are "
                                     f"copied through libvirt's storage API") from None
                cap = src.info()[1]
                name = rules.disk_volume_name(vm, policy, st, target)
                made.append(name)
                pool.createXMLFrom(_volume_xml(name, cap, "qcow2"), src, 0)
                disks.append({"target": target, "volume": name, "format": "qcow2", "capacity": cap, "source": path})
            consistency = "shut-off"
        manifest = {"version": 1, "vm": vm, "policy": policy, "stamp": st, "time": rules.listed(t),
                    "consistency": consistency, "live": live, "disks": disks, "complete": True}
        data = json.dumps(manifest, sort_keys=True).encode()
        mname = rules.manifest_volume_name(vm, policy, st)
        mvol = pool.createXML(_volume_xml(mname, len(data), "raw"), 0)
        made.append(mname)
        _upload(conn, mvol, data)
    except BaseException:
        # A failed backup leaves nothing that could be taken for one (the next run would remove it anyway).
        for name in reversed(made):
            try:
                _delete_volume(pool, name)
            except libvirt.libvirtError:
                pass
        raise
    took = time.monotonic() - started
    how = "live, the VM kept running" if live else "copied from the shut-off VM"
    cleared = f"; removed an interrupted backup{' and aborted its job' if aborted else ''}" if debris else ""
    return (f"backup {rules.listed(t)} of {', '.join(d['target'] for d in disks)} ({how}, {consistency}) "
            f"in {took:.1f}s{cleared}")


def _exists(pool: libvirt.virStoragePool, name: str) -> bool:
    try:
        pool.storageVolLookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


@handles("delete", "BackupPolicy")
def prune_backups(p, a: Action, o: Options) -> str:
    vols = [tuple(x) for x in a.desired.spec["resolved"]["volumes"]]
    # Manifests first: a backup half-deleted by a killed run is then unfinished, never a good one with holes.
    vols.sort(key=lambda pv: not pv[1].endswith(".json"))
    gone = 0
    for pool_name, name in vols:
        if _delete_volume(p._pool_of(pool_name), name):
            gone += 1
    return f"deleted {gone} volume(s): " + a.reason.removeprefix("prune ")


# --------------------------------------------------------------------------- listing

def backup_ages(p, now: float | None = None) -> dict[str, float]:
    """Seconds since each VM's newest good backup on the host, for `status` and metrics (`p`: a
    LibvirtProvider; one listing per pool, one manifest download per backup)."""
    by_policy: dict[str, list] = {}
    for b in read_backups(p, p.conn):
        by_policy.setdefault(b.policy, []).append(b)
    objects = {ResourceId("BackupPolicy", k): Live(ResourceId("BackupPolicy", k), {}, facts={"backups": tuple(v)})
               for k, v in by_policy.items()}
    return rules.backup_ages(objects, rules.now() if now is None else now)


def list_backups(uri: str, policy: str | None = None) -> list[dict[str, Any]]:
    """Every backup on the host (good and unfinished), oldest first, with its size, for `reconciler backups`."""
    from .provider import LibvirtProvider
    p = LibvirtProvider(uri)
    try:
        volumes = _backup_volumes(p.conn)
        out = []
        for b in read_backups(p, p.conn, volumes):
            if policy is not None and b.policy != policy:
                continue
            size = 0
            for name in b.volumes:
                v = volumes.get(name)
                if v is None:
                    continue
                try:
                    size += p.conn.storageVolLookupByPath(v["path"]).info()[2]
                except libvirt.libvirtError:
                    pass
            out.append({"time": b.when, "vm": b.vm, "policy": b.policy, "pool": b.pool, "size": size,
                        "disks": [d["target"] for d in b.disks], "consistency": b.consistency, "good": b.good,
                        "problem": b.problem})
        return out
    except libvirt.libvirtError as e:
        from ...errors import TargetError
        raise TargetError(f"reading backups at {uri} failed: {e.get_error_message() or e}") from None
    finally:
        p.close()
