"""What libvirt tells a watcher, as calls of `notify(kind, name, what)`: domain, network and storage
pool events on a connection of its own, and (on a local qemu:///system) the definition files libvirt
rewrites when a definition changes. Keeps the connection up: a lost one is reopened with backoff and
followed by `resync()`. Decides nothing; `reconciler.watch` decides what an event starts.

Probed on libvirt 9.0 / QEMU 7.2 and the test driver: lifecycle (defined, started, suspended,
resumed, stopped, undefined) and metadata (virsh desc) changes arrive as events; a memory or vCPU
change (virsh setmem/setmaxmem/setvcpus) and autostart do NOT: libvirt sends nothing for them. On a
local qemu:///system libvirt rewrites /etc/libvirt/qemu/NAME.xml for every change of a persistent
definition, so an inotify watch on that folder (and autostart/, networks/, ../storage/) reports
those too. Elsewhere they wait for the interval's full pass.

Idle cost: one thread blocked in virEventRunDefaultImpl (poll), one blocked in select on the inotify
descriptor, one blocked on a threading.Event; the only traffic is libvirt's keepalive every 5 s.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from typing import Callable

import libvirt

from .provider import _msg  # noqa: F401  (importing provider also silences libvirt's stderr printing)

Notify = Callable[[str | None, str | None, str], None]

RETRY_FIRST, RETRY_MAX = 0.5, 30.0
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3

LIFECYCLE = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed", 5: "stopped",
             6: "shut down", 7: "power-management suspended", 8: "crashed"}
# Domain events that say a domain changed in a way a manifest can express. REBOOT, BALLOON_CHANGE and
# TUNABLE are included: they cost nothing when nothing happens.
DOMAIN_EVENTS = {"LIFECYCLE": None, "REBOOT": "rebooted", "DEVICE_ADDED": "device added",
                 "DEVICE_REMOVED": "device removed", "METADATA_CHANGE": "metadata changed",
                 "BALLOON_CHANGE": "memory changed", "TUNABLE": "tunables changed"}

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """libvirt's default event loop on a daemon thread, once per process. Must run before the
    connection that registers callbacks is opened."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    time.sleep(1.0)   # never spin on a broken loop
        _loop_thread = threading.Thread(target=run, name="libvirt-event-loop", daemon=True)
        _loop_thread.start()


class LibvirtEvents:
    """Events of one libvirt URI, for as long as start() .. stop()."""

    def __init__(self, uri: str, notify: Notify, resync: Callable[[str], None],
                 say: Callable[[str], None] = lambda s: None, files: bool = True):
        self.uri = uri
        self.notify, self.resync, self.say = notify, resync, say
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[tuple[str, int]] = []
        self._thread: threading.Thread | None = None
        self._files = _DefinitionFiles(notify) if files and _local_qemu(uri) else None
        self.connected = threading.Event()
        self.tried = threading.Event()       # the first connection attempt is over, either way

    def start(self) -> None:
        ensure_event_loop()
        self._thread = threading.Thread(target=self._supervise, name="libvirt-watch", daemon=True)
        self._thread.start()
        if self._files is not None:
            self._files.start()

    def stop(self) -> None:
        self._stop.set()
        self._lost.set()
        if self._files is not None:
            self._files.stop()
        if self._thread is not None:
            self._thread.join(timeout=1)

    # ------------------------------------------------------------------ connection

    def _supervise(self) -> None:
        delay, failures, first = RETRY_FIRST, 0, True
        while not self._stop.is_set():
            try:
                self._connect()
            except libvirt.libvirtError as e:
                self.tried.set()
                failures += 1
                if failures == 1:
                    self.say(f"cannot watch libvirt at {self.uri}: {_msg(e)}; retrying with backoff")
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if not first:
                self.say(f"libvirt at {self.uri}: events connection re-established; running a full pass")
                self.resync(f"libvirt at {self.uri} reconnected")
            first, delay, failures = False, RETRY_FIRST, 0
            self.connected.set()
            self.tried.set()
            self._lost.wait()          # blocks: no CPU while connected
            self.connected.clear()
            self._disconnect()
            if not self._stop.is_set():
                self.say(f"libvirt at {self.uri}: events connection lost; reconnecting with backoff")
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _connect(self) -> None:
        self._lost.clear()
        conn = libvirt.open(self.uri)
        self._conn = conn
        try:
            conn.registerCloseCallback(lambda c, reason, opaque: self._lost.set(), None)
            try:
                # A daemon that stops answering (not only one that closes the socket) is noticed too.
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except libvirt.libvirtError:
                pass      # drivers without keepalive (local test:///): the close callback remains
            for event, what in DOMAIN_EVENTS.items():
                eid = getattr(libvirt, f"VIR_DOMAIN_EVENT_ID_{event}", None)
                if eid is None:
                    continue
                cb = self._on_lifecycle if event == "LIFECYCLE" else self._on_domain(what)
                try:
                    self._callbacks.append(("domain", conn.domainEventRegisterAny(None, eid, cb, None)))
                except libvirt.libvirtError:
                    pass  # this driver does not send that event
            for kind, register, eid, cb in (
                    ("network", conn.networkEventRegisterAny, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                     lambda c, net, event, detail, opaque: self._emit("Network", net, event)),
                    ("pool", conn.storagePoolEventRegisterAny, libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE,
                     lambda c, pool, event, detail, opaque: self._emit("StoragePool", pool, event))):
                try:
                    self._callbacks.append((kind, register(None, eid, cb, None)))
                except libvirt.libvirtError:
                    pass
        except libvirt.libvirtError:
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        callbacks, self._callbacks = self._callbacks, []
        if conn is None:
            return
        deregister = {"domain": conn.domainEventDeregisterAny, "network": conn.networkEventDeregisterAny,
                      "pool": conn.storagePoolEventDeregisterAny}
        for kind, cid in callbacks:
            try:
                deregister[kind](cid)
            except libvirt.libvirtError:
                pass
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    # ------------------------------------------------------------------ callbacks (event-loop thread)

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        self._emit("VirtualMachine", dom, event)

    def _on_domain(self, what: str):
        def cb(conn, dom, *rest) -> None:
            self._safe("VirtualMachine", dom, what)
        return cb

    def _emit(self, kind: str, obj, event: int) -> None:
        self._safe(kind, obj, LIFECYCLE.get(event, f"event {event}") if kind == "VirtualMachine"
                   else _POOL_NET.get(event, f"event {event}"))

    def _safe(self, kind: str, obj, what: str) -> None:
        # An exception raised here would be printed by libvirt-python on the loop thread and lost.
        try:
            name = obj.name()
        except libvirt.libvirtError:
            name = None
        try:
            self.notify(kind, name, what)
        except Exception:
            pass


_POOL_NET = {0: "defined", 1: "undefined", 2: "started", 3: "stopped", 4: "created", 5: "deleted"}


def _local_qemu(uri: str) -> bool:
    return uri.rstrip("/") in ("qemu:///system", "qemu+unix:///system") and os.path.isdir(_QEMU_DIR)


# ---------------------------------------------------------------------- definition files (inotify)

_QEMU_DIR = "/etc/libvirt/qemu"
# folder -> the kind whose definitions it holds
_FOLDERS = {
    _QEMU_DIR: "VirtualMachine",
    _QEMU_DIR + "/autostart": "VirtualMachine",
    _QEMU_DIR + "/networks": "Network",
    _QEMU_DIR + "/networks/autostart": "Network",
    "/etc/libvirt/storage": "StoragePool",
    "/etc/libvirt/storage/autostart": "StoragePool",
}
IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x200, 0o4000, 0o2000000
_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_HEADER = struct.Struct("iIII")


class _DefinitionFiles:
    """inotify on the folders where libvirtd keeps persistent definitions: libvirt writes NAME.xml
    (through NAME.xml.new and a rename) for every definition change, and links NAME.xml in
    autostart/ when autostart is switched on. Quiet when nothing changes."""

    def __init__(self, notify: Notify):
        self.notify = notify
        self._fd = -1
        self._wd: dict[int, str] = {}
        self._pipe = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        libc_name = ctypes.util.find_library("c")
        if not libc_name:
            return
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return
        for folder in _FOLDERS:
            wd = libc.inotify_add_watch(fd, folder.encode(), _MASK) if os.path.isdir(folder) else -1
            if wd >= 0:
                self._wd[wd] = folder
        if not self._wd:
            os.close(fd)
            return
        self._fd = fd
        self._thread = threading.Thread(target=self._run, name="libvirt-definitions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        try:
            os.write(self._pipe[1], b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._fd, self._pipe[0]], [], [])
                if self._pipe[0] in ready:
                    return
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    continue
                seen: set[tuple[str, str]] = set()
                for kind, name in _parse(data, self._wd):
                    if (kind, name) not in seen:
                        seen.add((kind, name))
                        try:
                            self.notify(kind, name, "definition file changed")
                        except Exception:
                            pass
        finally:
            os.close(self._fd)


def _parse(data: bytes, wd: dict[int, str]):
    """(kind, object name) of each inotify record about a NAME.xml file."""
    off = 0
    while off + _HEADER.size <= len(data):
        w, mask, cookie, length = _HEADER.unpack_from(data, off)
        raw = data[off + _HEADER.size: off + _HEADER.size + length].rstrip(b"\0")
        off += _HEADER.size + length
        name = raw.decode("utf-8", "replace")
        folder = wd.get(w)
        if folder is None or not name.endswith(".xml"):
            continue       # NAME.xml.new and other temporary files: the rename that follows counts
        yield _FOLDERS[folder], name[:-4]
