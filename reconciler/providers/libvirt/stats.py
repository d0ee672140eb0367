"""The status read of libvirt: every domain's statistics (state, CPU, balloon, block, interface) in
one bulk `getAllDomainStats` call, returned as frozen values. The only place `status` touches libvirt.

Why NOWAIT and a timeout: with plain getAllDomainStats one domain whose QEMU monitor is stuck in a job
stalls the whole host's read (the exporters' bug: inovex libvirt exporter #53/#58, kumina #33).
VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT makes libvirt skip the monitor of a domain that is busy and
return what it has without it; that domain is then shown stale. Where the flag is missing (old
libvirt-python) or refused (old libvirtd), or the bulk call does not answer within its timeout, each
domain is asked on its own, in parallel, with the same deadline: the ones that answer are shown, the
others are stale. One VM never fails the whole view.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import libvirt

from ...errors import TargetError

# Whether this libvirt-python knows the flag (added in libvirt 1.2.19; checked, not assumed).
NOWAIT = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
         | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_BLOCK | libvirt.VIR_DOMAIN_STATS_INTERFACE)
CALL_TIMEOUT = 10.0
FALLBACK_THREADS = 8
# Figures a healthy running domain of this driver reports; one missing means its monitor did not
# answer (NOWAIT skipped it). Drivers not listed (the test driver) report no figures at all: "n/a", not stale.
EXPECTED = {"QEMU": ("cpu.time", "balloon.rss")}
STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_BLOCKED: "running",
          libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
          libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_CRASHED: "crashed",
          libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended", libvirt.VIR_DOMAIN_NOSTATE: "unknown"}


@dataclass(frozen=True)
class BlockStat:
    name: str                    # target device, vda
    path: str | None
    allocation: int | None       # bytes written/allocated on the host
    capacity: int | None         # bytes the guest sees
    physical: int | None


@dataclass(frozen=True)
class NetStat:
    name: str                    # host-side device, vnet3
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class DomainStats:
    name: str
    state: str
    vcpus: int | None = None
    cpu_time_ns: int | None = None
    balloon_current_kib: int | None = None   # memory the guest has now
    balloon_maximum_kib: int | None = None
    balloon_rss_kib: int | None = None       # host memory the QEMU process holds
    balloon_available_kib: int | None = None  # guest view (virtio balloon stats), when the guest reports them
    balloon_unused_kib: int | None = None
    blocks: tuple = ()
    nets: tuple = ()
    stale: str | None = None                  # why the figures are missing or old; None when fresh


@dataclass(frozen=True)
class HostStats:
    uri: str
    hostname: str
    driver: str
    libvirt_version: str
    cpus: int
    memory_bytes: int
    domains: tuple                            # DomainStats, sorted by name
    call_seconds: float                       # wall time of the one bulk call
    taken_at: float                           # monotonic clock, for rates between two samples
    nowait: bool                              # the NOWAIT flag was used
    fallback: str | None = None               # why the per-domain fallback ran, if it did


def _msg(e: libvirt.libvirtError) -> str:
    return e.get_error_message() or str(e)


def _int(rec: dict, key: str) -> int | None:
    v = rec.get(key)
    return int(v) if v is not None else None


def parse(name: str, rec: dict, driver: str) -> DomainStats:
    """One domain's typed-parameter record (flat dotted keys) as a DomainStats."""
    state = STATES.get(rec.get("state.state", libvirt.VIR_DOMAIN_NOSTATE), "unknown")
    blocks = []
    for i in range(int(rec.get("block.count", 0))):
        p = f"block.{i}."
        blocks.append(BlockStat(str(rec.get(p + "name", f"disk{i}")), rec.get(p + "path"), _int(rec, p + "allocation"),
                                _int(rec, p + "capacity"), _int(rec, p + "physical")))
    nets = []
    for i in range(int(rec.get("net.count", 0))):
        p = f"net.{i}."
        if p + "name" not in rec:
            continue    # user-mode networking has no host device, so no counters
        nets.append(NetStat(str(rec.get(p + "name", f"net{i}")), int(rec.get(p + "rx.bytes", 0)),
                            int(rec.get(p + "tx.bytes", 0))))
    stale = None
    if state in ("running", "paused"):
        missing = [k for k in EXPECTED.get(driver, ()) if k not in rec]
        if missing:
            stale = f"busy: libvirt skipped {', '.join(missing)} rather than wait (NOWAIT)"
    return DomainStats(name, state, _int(rec, "vcpu.current"), _int(rec, "cpu.time"), _int(rec, "balloon.current"),
                       _int(rec, "balloon.maximum"), _int(rec, "balloon.rss"), _int(rec, "balloon.available"),
                       _int(rec, "balloon.unused"), tuple(blocks), tuple(nets), stale)


def _with_timeout(call, timeout: float):
    """Run `call` on a daemon thread; (True, value) or (False, None) when it did not answer in time.
    A stuck libvirt call cannot be cancelled; the daemon thread is left to finish or die with us."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="libvirt-stats")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["value"]


class StatsReader:
    """Holds one connection; `sample()` takes one bulk reading of every domain."""

    def __init__(self, uri: str, timeout: float = CALL_TIMEOUT, connect_timeout: float = 20.0):
        self.uri, self.timeout = uri, timeout
        ok, conn = _with_timeout(lambda: self._open(uri), connect_timeout)
        if not ok:
            raise TargetError(f"libvirt at {uri} did not answer within {connect_timeout:g}s")
        self.conn = conn
        try:
            self.driver = conn.getType()
            self.hostname = conn.getHostname()
            lv = conn.getLibVersion()
            self.version = f"{lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}"
            info = conn.getInfo()
            self.cpus, self.memory = int(info[2]), int(info[1]) * 1024 * 1024
        except libvirt.libvirtError as e:
            raise TargetError(f"reading libvirt at {uri} failed: {_msg(e)}") from None
        self.nowait = bool(NOWAIT)

    @staticmethod
    def _open(uri: str):
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise TargetError(f"cannot connect to libvirt at {uri}: {_msg(e)}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def sample(self) -> HostStats:
        started = time.monotonic()
        fallback = None
        records: list | None = None
        try:
            ok, records = _with_timeout(lambda: self.conn.getAllDomainStats(STATS, NOWAIT if self.nowait else 0),
                                        self.timeout)
            if not ok:
                fallback = f"the bulk statistics call did not answer within {self.timeout:g}s"
                records = None
        except libvirt.libvirtError as e:
            if self.nowait and e.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                # An older libvirtd refuses the flag: ask each domain, each with a deadline.
                self.nowait = False
                fallback = f"libvirtd refused NOWAIT ({_msg(e)})"
            else:
                raise TargetError(f"reading domain statistics from libvirt at {self.uri} failed: {_msg(e)}") from None
        call_seconds = time.monotonic() - started
        if records is not None:
            domains = [parse(d.name(), rec, self.driver) for d, rec in records]
        else:
            domains = self._per_domain()
        return HostStats(self.uri, self.hostname, self.driver, self.version, self.cpus, self.memory,
                         tuple(sorted(domains, key=lambda d: d.name)), call_seconds, time.monotonic(),
                         self.nowait, fallback)

    def _per_domain(self) -> list[DomainStats]:
        ok, doms = _with_timeout(lambda: self.conn.listAllDomains(0), self.timeout)
        if not ok:
            raise TargetError(f"libvirt at {self.uri} did not list its domains within {self.timeout:g}s")
        # Without NOWAIT here: each domain has its own thread and the deadline below, so waiting for a
        # job another caller holds for a moment (libvirt handling a guest event) is safe, and a healthy
        # VM is not shown stale because its monitor was briefly busy when this one call came.

        def one(dom) -> DomainStats:
            [(d, rec)] = self.conn.domainListGetStats([dom], STATS, 0)
            return parse(d.name(), rec, self.driver)

        # Daemon workers (a ThreadPoolExecutor's threads are joined at exit: one stuck call would
        # hang the process); the ones still stuck in libvirt at the deadline are not waited for.
        work: queue.Queue = queue.Queue()
        for d in doms:
            work.put(d)
        done: dict[str, DomainStats] = {}
        lock = threading.Lock()

        def worker() -> None:
            while True:
                try:
                    dom = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = one(dom)
                except libvirt.libvirtError as e:
                    result = DomainStats(dom.name(), "unknown", stale=f"libvirt: {_msg(e)}")
                with lock:
                    done[result.name] = result

        threads = [threading.Thread(target=worker, daemon=True, name="libvirt-stats")
                   for _ in range(min(FALLBACK_THREADS, len(doms)))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with lock:
            return [done.get(d.name()) or DomainStats(d.name(), "unknown",
                                                      stale=f"its statistics did not answer within {self.timeout:g}s")
                    for d in doms]
