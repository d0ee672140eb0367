"""The libvirt provider: bulk reads of pools, volumes and domains into Live objects, and one side
effect per planned action. The only module that imports libvirt. Decides nothing."""
from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt

from ...errors import ApplyError, TargetError
from ...model import Action, HostFacts, Live, Options, ResourceId, Snapshot
from . import bootxml, domxml, images
from .handlers import HANDLERS, READERS
from .xmlcache import ParseCache

LIVE_CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
# A live detach needs the guest's cooperation; past this wait the detach is left for the restart.
DETACH_WAIT = 3.0
CONNECT_TIMEOUT = 20.0
# Threads for independent XMLDesc calls; libvirt-python releases the GIL during RPCs.
READ_THREADS = 8


def _quiet_errors(ctx, err) -> None:
    """libvirt prints every error to stderr by default; ours are reported as one sentence."""


libvirt.registerErrorHandler(_quiet_errors, None)


def _msg(e: libvirt.libvirtError) -> str:
    return e.get_error_message() or str(e)


# What libvirt says of an object that was listed a moment ago and is gone now (another tool deleted it).
GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL)


_POOL_STOPPED = object()  # sentinel: a volume whose pool stopped during the read


def _vanished(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() in GONE


def _live_and_config(call, *args) -> None:
    """Change the running VM and its definition in one call where the driver allows it, else in two."""
    try:
        call(*args, LIVE_CONFIG)
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_OPERATION_INVALID):
            raise
        call(*args, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        call(*args, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


class LibvirtProvider:
    kinds = ("StoragePool", "Disk", "VirtualMachine")
    # One connection serves concurrent calls; the applier may run independent actions together.
    parallel = True

    def __init__(self, uri: str):
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        # Nothing else: every action carries what it needs, so independent actions may run at once.

    def target(self) -> str:
        return f"libvirt:{self.uri}"

    # ------------------------------------------------------------------ connection

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            result: dict[str, Any] = {}

            def connect() -> None:
                try:
                    result["conn"] = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    result["error"] = _msg(e)

            t = threading.Thread(target=connect, daemon=True)
            t.start()
            # 20 s, so that with start-up and the message the whole run fails inside the promised 30 s.
            t.join(CONNECT_TIMEOUT)
            if t.is_alive():
                raise TargetError(f"libvirt at {self.uri} did not answer within {CONNECT_TIMEOUT:g}s")
            if "error" in result:
                raise TargetError(f"cannot connect to libvirt at {self.uri}: {result['error']}")
            self._conn = result["conn"]
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None

    # ------------------------------------------------------------------ reading

    def _access(self, pools: dict[str, str], folders: set[str]):
        """kinds/libvirt.py's HypervisorAccess for a local qemu:///system only, else None."""
        from .hostaccess import read_access
        return read_access(self.uri, folders | {p for p in pools.values() if p})

    def read(self, kinds: frozenset[str], desired=()) -> Snapshot:
        """Every live object of `kinds`, and the host facts the kinds consult. `desired` (the declared
        resources): their folders are checked for QEMU's access, and a new disk's source image is read
        (checksum, format, size)."""
        from ...kinds.libvirt import paths_of_interest
        folders = {p for r in desired for p in paths_of_interest(r.id.kind, r.spec)}
        sources = {r.id.name: r.spec["source"]["path"] for r in desired if r.id.kind == "Disk" and r.spec.get("source")}
        try:
            snap = self._read(folders)
            if sources:
                new = {n for n in sources if ResourceId("Disk", n) not in snap.objects}
                snap = snap.merged(Snapshot({}, HostFacts(images=images.read_image_facts(sources, new))))
            # Kinds with a reader of their own (providers/libvirt/handlers.py) are read beside the core three.
            core = snap
            for kind in sorted(kinds & READERS.keys()):
                snap = snap.merged(READERS[kind](self, self.conn, core))
            return snap
        except libvirt.libvirtError as e:
            raise TargetError(f"reading libvirt at {self.uri} failed: {_msg(e)}") from None

    def _read(self, folders: set[str] = frozenset()) -> Snapshot:
        conn = self.conn
        objects: dict[ResourceId, Live] = {}
        pools: dict[str, str] = {}
        path_to_disk: dict[str, str] = {}
        flags = (0, libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING, libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED,
                 libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)

        # The host is shared: between the bulk list and an object's own calls, another tool may delete
        # it. Such an object is read as gone (None below), never as a failed read.
        def pool_head(pool: libvirt.virStoragePool) -> tuple | None:
            try:
                active = bool(pool.isActive())
                info, autostart = domxml.parse_pool(pool.XMLDesc(0)), bool(pool.autostart())
                try:
                    vols = pool.listAllVolumes(0) if active else []
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                        raise
                    active, vols = False, []   # stopped since it was listed
                return info, active, vols, autostart
            except libvirt.libvirtError as e:
                if _vanished(e):
                    return None
                raise

        def volume(vol: libvirt.virStorageVol) -> Any:
            try:
                return cache.parse("volume", vol.XMLDesc(0), domxml.parse_volume)
            except libvirt.libvirtError as e:
                if _vanished(e):
                    return None
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    return _POOL_STOPPED   # its pool was stopped since it was listed
                raise

        def describe(dom: libvirt.virDomain) -> tuple | None:
            name = dom.name()
            try:
                config = cache.parse("domain", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), domxml.parse_domain)
                live_spec = cache.parse("domain", dom.XMLDesc(0), domxml.parse_domain)["spec"] \
                    if name in active_names else None
            except libvirt.libvirtError as e:
                if _vanished(e):
                    return None
                raise
            return name, config, live_spec

        # One bulk list per kind, then every per-object XMLDesc on a pool of threads sharing the one
        # connection (libvirt-python releases the GIL during RPCs): pools, volumes and domains overlap.
        # Each document goes through the content-addressed parse cache (xmlcache.py) in the worker that
        # fetched it, so its text is dropped at once. A hit is a hash and an unmarshal; a full
        # ElementTree parse in the workers was measured slower than fetching all and parsing after
        # (0.82-0.95 s against 0.55-0.74 s for 1,000 domains and 1,000 volumes: a worker parsing holds
        # the GIL while the others' RPC replies wait for it), but fetching all first held every text at
        # once (+30 MiB peak at 5,000 VMs). With the cache, misses are rare (a changed document).
        cache = ParseCache(self.uri)
        with ThreadPoolExecutor(READ_THREADS) as ex:
            lists = [ex.submit(conn.listAllDomains, f) for f in flags]
            heads = [h for h in ex.map(pool_head, conn.listAllStoragePools(0)) if h is not None]
            vol_jobs = [[ex.submit(volume, v) for v in vols] for _, _, vols, _ in heads]
            domains, running, paused, autostart = (f.result() for f in lists)
            running = {d.name() for d in running}
            paused = {d.name() for d in paused}
            autostart = {d.name() for d in autostart}
            active_names = running | paused
            dom_jobs = [ex.submit(describe, d) for d in domains]

            fetched = [[job.result() for job in jobs] for jobs in vol_jobs]
            described = [d for d in (j.result() for j in dom_jobs) if d is not None]
        for (info, active, vols, pool_autostart), read in zip(heads, fetched):
            if any(v is _POOL_STOPPED for v in read):
                active = False
            pools[info["name"]] = info["path"]
            objects[ResourceId("StoragePool", info["name"])] = Live(
                ResourceId("StoragePool", info["name"]),
                {"type": info["type"], "path": (info["path"] or "").rstrip("/") or "/",
                 "autostart": pool_autostart, "state": "present"},
                facts={"active": active, "volumes": len(vols)})
            for v in read:
                if v is None or v is _POOL_STOPPED:
                    continue
                v["pool"] = info["name"]
                rid = ResourceId("Disk", v["name"])
                if rid in objects:
                    continue  # the same volume name in two pools: the first pool (by listing) wins
                path_to_disk[v["path"]] = v["name"]
                objects[rid] = Live(rid, {"pool": info["name"], "capacity": v["capacity"], "format": v["format"],
                                          "backingStore": v["backingStore"], "state": "present"},
                                    facts={"path": v["path"]})

        for name, parsed, live_spec in described:
            state = "running" if name in running else "paused" if name in paused else "shutoff"
            facts: dict[str, Any] = {"state": state, "autostart": name in autostart, "uuid": parsed["uuid"]}
            if live_spec is not None:
                facts["running_spec"] = live_spec
            if any(parsed.get("records", {}).values()):
                facts["records"] = parsed["records"]   # snapshots taken and restores run (providers/libvirt/backup.py)
            for d in parsed["spec"]["disks"]:
                if d["path"] and d["path"] in path_to_disk:
                    d["disk"] = path_to_disk[d["path"]]
            seed = parsed["spec"].get("cloudInit")
            if seed and seed.get("path") in path_to_disk:
                # A VM's cloud-init seed volume belongs to the VM, not to the Disks a manifest declares.
                objects.pop(ResourceId("Disk", path_to_disk[seed["path"]]), None)
            rid = ResourceId("VirtualMachine", name)
            objects[rid] = Live(rid, parsed["spec"], parsed["labels"], parsed["managed"], facts, parsed["scope"])
        cache.save()
        return Snapshot(objects, HostFacts(machine_aliases=self._machine_aliases(),
                                           hypervisor_access=self._access(pools, set(folders))))

    def _machine_aliases(self) -> dict:
        """{arch: {alias: canonical}} from the host's capabilities ("pc" -> "pc-i440fx-7.2")."""
        try:
            caps = ET.fromstring(self.conn.getCapabilities())
        except (libvirt.libvirtError, ET.ParseError):
            return {}
        out: dict[str, dict] = {}
        for guest in caps.findall("guest"):
            arch = guest.find("arch")
            if arch is None:
                continue
            aliases = out.setdefault(arch.get("name"), {})
            for m in arch.iter("machine"):
                if m.get("canonical") and m.text:
                    aliases[m.text] = m.get("canonical")
        return out

    # ------------------------------------------------------------------ applying

    def apply(self, action: Action, options: Options) -> str:
        handler = HANDLERS.get((action.verb, action.id.kind))
        if handler is None:
            raise ApplyError(f"{action.id}: {action.verb} is not supported")
        try:
            return handler(self, action, options)
        except libvirt.libvirtError as e:
            code = e.get_error_code()
            if code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                        libvirt.VIR_ERR_INTERNAL_ERROR) and not self._alive():
                raise TargetError(f"libvirt at {self.uri} went away: {_msg(e)}") from None
            raise ApplyError(f"libvirt refused: {_msg(e)}") from None

    def _alive(self) -> bool:
        try:
            return self._conn is not None and self._conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    # pools

    def _create_StoragePool(self, a: Action, o: Options) -> str:
        spec = a.desired.spec
        try:
            pool = self.conn.storagePoolLookupByName(a.id.name)
        except libvirt.libvirtError:
            pool = self.conn.storagePoolDefineXML(domxml.build_pool(a.id.name, spec), 0)
        pool.build(0)
        if not pool.isActive():
            pool.create(0)
        pool.setAutostart(1 if spec["autostart"] else 0)
        return f"defined, built and started at {spec['path']}"

    def _update_StoragePool(self, a: Action, o: Options) -> str:
        pool = self.conn.storagePoolLookupByName(a.id.name)
        if not pool.isActive():
            pool.create(0)
        pool.setAutostart(1 if a.desired.spec["autostart"] else 0)
        return "updated: " + ", ".join(a.fields)

    def _delete_StoragePool(self, a: Action, o: Options) -> str:
        pool = self.conn.storagePoolLookupByName(a.id.name)
        if pool.isActive():
            if pool.numOfVolumes():
                raise ApplyError("pool still holds volumes; refusing to delete it")
            try:
                pool.delete(0)  # removes the now empty directory
            except libvirt.libvirtError:
                pass
            pool.destroy()
        pool.undefine()
        return "deleted (empty)"

    # disks

    def _pool_of(self, name: str) -> libvirt.virStoragePool:
        pool = self.conn.storagePoolLookupByName(name)
        if not pool.isActive():
            pool.create(0)
        return pool

    def _create_Disk(self, a: Action, o: Options) -> str:
        spec = a.desired.spec
        pool = self._pool_of(spec["pool"])
        try:
            vol = pool.storageVolLookupByName(a.id.name)  # a half-finished earlier run: adopt, never duplicate
        except libvirt.libvirtError:
            backing = None
            b = spec["backingStore"]
            if b:
                # The planner resolved a backing Disk to its file and format.
                if not b.get("path"):
                    raise ApplyError(f"backing disk {b.get('disk')!r} does not exist")
                backing = (b["path"], b.get("format") or "qcow2")
            if spec.get("source"):
                vol = images.import_image(self, pool, a.id.name, spec)
            else:
                vol = pool.createXML(domxml.build_volume(a.id.name, spec["capacity"], spec["format"], backing), 0)
        v = domxml.parse_volume(vol.XMLDesc(0))
        if spec.get("source"):
            return f"created {spec['format']} volume {v['path']} from {spec['source']['path']}"
        return f"created {spec['format']} volume {v['path']}"

    def _update_Disk(self, a: Action, o: Options) -> str:
        new = a.desired.spec["capacity"]
        for use in a.desired.spec.get("attached", ()):
            # qemu-img cannot resize an image a running VM holds; QEMU itself can.
            dom = self.conn.lookupByName(use["vm"])
            dom.blockResize(use["target"], new, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            return f"grown to {new} bytes through running VM {use['vm']} ({use['target']})"
        vol = self._pool_of(a.desired.spec["pool"]).storageVolLookupByName(a.id.name)
        vol.resize(new, 0)
        return f"grown to {new} bytes in place"

    def _delete_Disk(self, a: Action, o: Options) -> str:
        vol = self.conn.storageVolLookupByPath(a.live.facts["path"])
        vol.delete(0)
        return f"deleted {a.live.facts['path']}"

    # domains

    @staticmethod
    def _disk_sources(spec: dict) -> dict:
        """Each disk target's (file, format); the planner resolved Disk references (`source`)."""
        out = {}
        for d in spec["disks"]:
            if "disk" in d:
                src = d.get("source") or {}
                if not src.get("path"):
                    raise ApplyError(f"disk {d['disk']!r} does not exist")
                out[d["target"]] = (src["path"], src.get("format"))
            else:
                out[d["target"]] = (d["path"], d.get("format") or ("raw" if d["device"] == "cdrom" else "qcow2"))
        return out

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _create_VirtualMachine(self, a: Action, o: Options) -> str:
        spec = a.desired.spec
        seed = None
        if spec.get("cloudInit"):
            # The seed volume first: a domain defined with a missing CD-ROM file would not start.
            seed, image = images.seed_info(self, a.id.name, spec, None)
            images.write_seed(self, seed, image)
        xml = domxml.build_domain(a.id.name, spec, dict(a.desired.labels), self._disk_sources(spec), scope=a.scope)
        xml = bootxml.decorate(xml, spec, None, seed)
        try:
            dom = self.conn.defineXML(xml)
            fresh = True
        except libvirt.libvirtError:
            # An earlier run was killed between define and the rest: finish it, marker included.
            dom = self._lookup(a.id.name)
            if dom is None:
                raise
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.owner_xml(dict(a.desired.labels), a.scope),
                            domxml.NS_PREFIX, domxml.NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            fresh = False
        if spec["autostart"]:
            dom.setAutostart(1)
        forced = None
        if fresh and spec["state"] == "running":
            dom.create()  # a domain defined a moment ago is shut off: no need to ask
        elif not (fresh and spec["state"] == "shutoff"):
            forced = self._set_state(dom, spec["state"], o)
        return f"defined and {spec['state']}" + (f" ({forced})" if forced else "")

    def _set_state(self, dom: libvirt.virDomain, want: str, o: Options) -> str | None:
        """Bring the VM to `want`; returns the forced power-off note of _shutdown, if any."""
        state = dom.state()[0]
        active = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)
        if want in ("running", "paused") and not active:
            dom.create()
            state = libvirt.VIR_DOMAIN_RUNNING
        if want == "paused" and state != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()
        elif want == "running" and state == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        elif want == "shutoff" and active:
            return self._shutdown(dom, o.shutdown_timeout)
        return None

    def _shutdown(self, dom: libvirt.virDomain, timeout: float) -> str | None:
        """Graceful shutdown, then forced off once `timeout` seconds have passed.
        Returns a note for the result message when the VM had to be forced off, else None."""
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            dom.shutdown()
        except libvirt.libvirtError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return None
            time.sleep(0.2)
        if dom.isActive():
            dom.destroy()
            # An operator must see that the guest was powered off without its consent.
            return f"forced off: the guest did not shut down within {timeout:g}s"
        return None

    def _update_VirtualMachine(self, a: Action, o: Options) -> str:
        spec, declared = a.desired.spec, a.desired.declared
        dom = self.conn.lookupByName(a.id.name)
        notes: list[str] = []
        failures: list[str] = []
        failed: set[str] = set()
        active = bool(dom.isActive())
        by_path = {c.path: c for c in a.changes}
        live_changes = [c for c in a.changes if c.mode == "live"]

        def attempt(paths: list[str], fn, *args) -> None:
            # One field libvirt refuses must not keep the others from being applied: each part is
            # tried, and the action fails at the end naming what did not go through.
            try:
                note = fn(*args)
            except (libvirt.libvirtError, ApplyError) as e:
                failures.append(f"{', '.join(paths)}: {_msg(e) if isinstance(e, libvirt.libvirtError) else e}")
                failed.update(paths)
                return
            if isinstance(note, list):
                notes.extend(note)
            elif note:
                notes.append(note)

        if active:
            for c in live_changes:
                if c.path == "spec.memory":
                    attempt([c.path], _live_and_config, dom.setMemoryFlags, spec["memory"] // 1024)
                elif c.path == "spec.vcpus":
                    attempt([c.path], _live_and_config, dom.setVcpusFlags, spec["vcpus"])
                elif c.path.startswith("spec.disks["):
                    attempt([c.path], self._hot_disk, dom, c, spec)
        if "spec.description" in by_path:
            flags = LIVE_CONFIG if active else libvirt.VIR_DOMAIN_AFFECT_CONFIG
            attempt(["spec.description"], dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_DESCRIPTION,
                    spec["description"] or None, None, None, flags)
        if {"metadata.labels", "metadata.managed", "metadata.scope"} & set(by_path):
            flags = LIVE_CONFIG if active else libvirt.VIR_DOMAIN_AFFECT_CONFIG
            attempt([p for p in by_path if p.startswith("metadata.")], dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    domxml.owner_xml(dict(a.desired.labels), a.scope), domxml.NS_PREFIX, domxml.NS, flags)
        seed = None
        if spec.get("cloudInit"):
            live_ci = (a.live.spec.get("cloudInit") if a.live else None) or None
            seed, image = images.seed_info(self, a.id.name, spec, live_ci)
            if "spec.cloudInit" in by_path:
                attempt(["spec.cloudInit"], images.sync_seed, self, dom, seed, image, live_ci, active)
        config_changes = [c for c in a.changes if c.mode in ("config", "restart")
                          and not (c.path == "spec.cloudInit" and c.before)]
        if config_changes:
            def define() -> str | None:
                cfg = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                new = domxml.patch_domain(cfg, spec, declared, dict(a.desired.labels), self._disk_sources(spec),
                                          a.scope)
                new = bootxml.decorate(new, spec, declared, seed)
                self.conn.defineXML(new)
                restart = [c.path for c in config_changes if c.mode == "restart"]
                return "restart required for " + ", ".join(restart) if active and restart else None
            attempt([c.path for c in config_changes], define)
        if "spec.autostart" in by_path:
            attempt(["spec.autostart"], dom.setAutostart, 1 if spec["autostart"] else 0)
        if "spec.state" in by_path:
            attempt(["spec.state"], self._set_state, dom, spec["state"], o)
        done = [c.path for c in a.changes if c.path not in failed]
        if failures:
            raise ApplyError("; ".join(failures) + (f" (applied: {', '.join(done)})" if done else ""))
        return "updated " + ", ".join(c.path for c in a.changes) + (f" ({'; '.join(notes)})" if notes else "")

    def _hot_disk(self, dom: libvirt.virDomain, c, spec: dict) -> list[str]:
        target = c.path[len("spec.disks["):-1]
        in_config = domxml.find_disk_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), target) is not None
        if c.after is not None:
            d = next(x for x in spec["disks"] if x["target"] == target)
            path, fmt = self._disk_sources(spec)[target]
            xml = ET.tostring(domxml.disk_element(d, path, fmt), encoding="unicode")
            running = domxml.find_disk_xml(dom.XMLDesc(0), target)
            if running is not None:
                # The running VM holds the target already (changed by hand since the plan was made):
                # the same file needs only the definition, another file is not ours to unplug.
                if domxml.disk_source(running) != path:
                    raise ApplyError(f"{target} of the running VM holds {domxml.disk_source(running)}, not {path}; "
                                     "detach it or restart the VM")
                if not in_config:
                    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
                return []
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (0 if in_config else libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            dom.attachDeviceFlags(xml, flags)
            return []
        xml = domxml.find_disk_xml(dom.XMLDesc(0), target)
        if xml is None:
            if in_config:
                dom.detachDeviceFlags(domxml.find_disk_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), target),
                                      libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return []
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if in_config else 0)
        dom.detachDeviceFlags(xml, flags)
        deadline = time.monotonic() + DETACH_WAIT
        while time.monotonic() < deadline:
            if domxml.find_disk_xml(dom.XMLDesc(0), target) is None:
                return []
            time.sleep(0.2)
        return [f"{target} removed from the definition; the guest has not released it yet, so it goes at the next restart"]

    def _restart_VirtualMachine(self, a: Action, o: Options) -> str:
        dom = self.conn.lookupByName(a.id.name)
        paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        forced = self._shutdown(dom, o.shutdown_timeout)
        dom.create()
        if paused or a.desired.spec["state"] == "paused":
            dom.suspend()
        return "restarted for " + ", ".join(a.fields) + (f" ({forced})" if forced else "")

    def _replace_VirtualMachine(self, a: Action, o: Options) -> str:
        dom = self.conn.lookupByName(a.id.name)
        uuid = dom.UUIDString()
        forced = self._shutdown(dom, o.shutdown_timeout) if dom.isActive() else None
        spec = a.desired.spec
        xml = domxml.build_domain(a.id.name, spec, dict(a.desired.labels), self._disk_sources(spec), uuid=uuid,
                                  scope=a.scope)
        if spec.get("cloudInit"):
            seed, image = images.seed_info(self, a.id.name, spec, a.live.spec.get("cloudInit") if a.live else None)
            images.write_seed(self, seed, image)
            xml = bootxml.decorate(xml, spec, None, seed)
        else:
            xml = bootxml.decorate(xml, spec, None, None)
        # The records of snapshots taken and restores run (providers/libvirt/backup.py) outlive the redefinition.
        xml = domxml.with_records(xml, domxml.records_of(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        dom = self.conn.defineXML(xml)
        dom.setAutostart(1 if spec["autostart"] else 0)
        self._set_state(dom, spec["state"], o)
        return f"redefined with the same UUID {uuid} for " + ", ".join(c.path for c in a.changes if c.mode == "replace") \
            + (f" ({forced})" if forced else "")

    def _delete_VirtualMachine(self, a: Action, o: Options) -> str:
        dom = self._lookup(a.id.name)
        if dom is None:
            return "already gone"
        snapshots = dom.listAllSnapshots(0)
        if snapshots:
            # The plan refuses this for a VM declared absent; a --prune delete is planned without its
            # manifest, so the same rule is kept here: undefining would orphan the snapshots' data.
            raise ApplyError(f"VM {a.id.name} still has snapshot(s) {', '.join(sorted(s.getName() for s in snapshots))}: "
                             f"declare them (kind Snapshot) with state: absent to delete them first")
        if dom.isActive():
            dom.destroy()
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        for extra in ("VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
            flags |= getattr(libvirt, extra, 0)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            dom.undefine()
        # The seed goes with its VM (declared Disks stay).
        seed = images.delete_seed(self.conn, a.live.spec.get("cloudInit") if a.live else None)
        return "stopped and undefined (its disks are kept" + (f"; {seed}" if seed else "") + ")"


# The core kinds' handlers, in the same table as every other kind's (providers/libvirt/handlers.py).
HANDLERS[("create", "StoragePool")] = LibvirtProvider._create_StoragePool
HANDLERS[("update", "StoragePool")] = LibvirtProvider._update_StoragePool
HANDLERS[("delete", "StoragePool")] = LibvirtProvider._delete_StoragePool
HANDLERS[("create", "Disk")] = LibvirtProvider._create_Disk
HANDLERS[("update", "Disk")] = LibvirtProvider._update_Disk
HANDLERS[("delete", "Disk")] = LibvirtProvider._delete_Disk
HANDLERS[("create", "VirtualMachine")] = LibvirtProvider._create_VirtualMachine
HANDLERS[("update", "VirtualMachine")] = LibvirtProvider._update_VirtualMachine
HANDLERS[("restart", "VirtualMachine")] = LibvirtProvider._restart_VirtualMachine
HANDLERS[("replace", "VirtualMachine")] = LibvirtProvider._replace_VirtualMachine
HANDLERS[("delete", "VirtualMachine")] = LibvirtProvider._delete_VirtualMachine
