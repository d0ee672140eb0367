"""`reconciler status`: one reading of the host as a frozen StatusReport (no printing).

What one reading is: a first bulk libvirt statistics sample; then, inside the CPU sampling interval
(so the interval costs no extra time when they take longer), the same target reads and plan as
`plan` (manifests.load -> run.make_providers/read_all -> planner.plan) and the broker's `$SYS` figures;
then the second statistics sample, from which CPU % is the CPU time used between the two.

A VM whose statistics do not answer is a row marked stale with the reason; it never fails the view.
A broker whose `$SYS` figures (or, without PATHs, objects) cannot be read is reported in `errors`
(exit 1) with the rest shown.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import manifests, planner
from .errors import TargetError
from .kinds.registry import NAMES, of_target
from .model import Options, ResourceId

DEFAULT_SAMPLE = 1.0


@dataclass(frozen=True)
class Host:
    hostname: str
    libvirt_uri: str
    driver: str                  # QEMU, TEST, ...
    libvirt_version: str
    cpus: int
    memory_bytes: int
    taken_at: float              # Unix time of the reading
    stats_call_seconds: float    # one getAllDomainStats call (the first sample)
    nowait: bool                 # VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT was used
    fallback: str | None = None  # why the per-domain fallback ran, if it did


@dataclass(frozen=True)
class Disk:
    name: str                    # target device (vda)
    allocation_bytes: int | None
    capacity_bytes: int | None


@dataclass(frozen=True)
class Interface:
    name: str                    # host-side device (vnet3)
    receive_bytes: int
    transmit_bytes: int


@dataclass(frozen=True)
class Vm:
    name: str
    state: str
    managed: bool
    declared: bool
    sync: str | None             # None without PATHs; see Obj.sync
    drift: tuple = ()            # field paths that differ from the manifest
    vcpus: int | None = None
    cpu_seconds: float | None = None
    cpu_percent: float | None = None      # of its own vCPUs (100 = every vCPU busy), between the two samples
    memory_bytes: int | None = None       # in use
    memory_source: str | None = None      # "guest" (balloon driver's figures) | "host" (QEMU's resident memory)
    memory_assigned_bytes: int | None = None
    disks: tuple = ()
    interfaces: tuple = ()
    stale: str | None = None     # why the figures are missing; None when fresh
    # Seconds since the VM's newest good backup (BackupPolicy backups); None when it has none.
    backup_age_seconds: float | None = None

    @property
    def receive_bytes(self) -> int:
        return sum(i.receive_bytes for i in self.interfaces)

    @property
    def transmit_bytes(self) -> int:
        return sum(i.transmit_bytes for i in self.interfaces)


@dataclass(frozen=True)
class Obj:
    kind: str
    name: str
    managed: bool
    declared: bool
    # With PATHs: "in sync" | "drifted" (would be updated/restarted/replaced/deleted) | "missing"
    # (would be created) | "refused" | "orphan" (managed, no manifest declares it); None otherwise.
    sync: str | None
    state: str
    drift: tuple = ()
    reason: str = ""


@dataclass(frozen=True)
class Topic:
    name: str
    retained_declared: bool
    retained_present: bool


@dataclass(frozen=True)
class Broker:
    url: str
    version: str | None = None
    uptime_seconds: int | None = None
    clients_connected: int | None = None
    messages_received_total: int | None = None
    messages_sent_total: int | None = None
    publish_received_total: int | None = None
    publish_sent_total: int | None = None
    bytes_received_total: int | None = None
    bytes_sent_total: int | None = None
    received_per_second: float | None = None
    sent_per_second: float | None = None
    retained_messages: int | None = None
    subscriptions: int | None = None
    topics: tuple = ()
    error: str | None = None


@dataclass(frozen=True)
class StatusReport:
    host: Host
    vms: tuple
    objects: tuple               # every object of every kind read (VMs included), sorted by kind order, name
    broker: Broker | None
    planned: bool                # PATHs were given: sync and drift are filled
    drift: dict = field(default_factory=dict)     # kind -> objects not in sync (v1's reconciler_drift)
    errors: tuple = ()
    timings: dict = field(default_factory=dict)   # seconds per phase


def status(paths: list[str], targets, options: Options = Options(), *, sample_seconds: float = DEFAULT_SAMPLE,
           stats_timeout: float | None = None, include_broker: bool | None = None) -> StatusReport:
    """`targets` is config.Targets. The broker is read when the manifests declare MQTT kinds, or, without
    PATHs, when a broker login is given (a dynamic-security broker refuses anonymous readers)."""
    from .providers.libvirt.stats import CALL_TIMEOUT, StatsReader
    from .run import make_providers

    started = time.monotonic()
    timings: dict[str, float] = {}
    resources = manifests.load(paths) if paths else []
    timings["load"] = time.monotonic() - started
    mqtt_kinds = set(of_target("mqtt"))
    declared_kinds = {r.id.kind for r in resources}
    if include_broker is None:
        include_broker = bool(declared_kinds & mqtt_kinds) if paths else bool(targets.mqtt_username)
    # The host's libvirt is always read: its VMs are the point of the view.
    kinds = declared_kinds | set(of_target("libvirt")) | (mqtt_kinds if include_broker and not paths else set())

    reader = StatsReader(targets.libvirt_uri, stats_timeout or CALL_TIMEOUT)
    errors: list[str] = []
    try:
        first = reader.sample()
        timings["stats_call"] = first.call_seconds
        t = time.monotonic()
        broker_error = None
        if paths:
            snapshot = _read(make_providers(kinds, targets))
        else:
            # Without PATHs the broker is an extra: when its objects cannot be read (a login without
            # `subscribe #`, a broker down), the host is still shown and the error reported (exit 1).
            snapshot = _read(make_providers(kinds - mqtt_kinds, targets))
            if kinds & mqtt_kinds:
                try:
                    snapshot = snapshot.merged(_read(make_providers(kinds & mqtt_kinds, targets)))
                except TargetError as e:
                    broker_error = e
                    errors.append(str(e))
        timings["read"] = time.monotonic() - t
        t = time.monotonic()
        plan = planner.plan(resources, snapshot, options) if paths else None
        timings["plan"] = time.monotonic() - t
        sys_stats = broker_error
        if include_broker and broker_error is None:
            from .providers.mosquitto import sysstats
            t = time.monotonic()
            try:
                sys_stats = sysstats.read(targets.mqtt_url, targets.mqtt_username, targets.mqtt_password,
                                          targets.mqtt_cafile)
            except TargetError as e:
                errors.append(str(e))
                sys_stats = e
            timings["broker"] = time.monotonic() - t
        second = None
        if sample_seconds > 0:
            left = sample_seconds - (time.monotonic() - first.taken_at)
            if left > 0:
                time.sleep(left)
            second = reader.sample()
            timings["stats_call_2"] = second.call_seconds
    finally:
        reader.close()
    report = build(first, second, resources, snapshot, plan, sys_stats, targets.mqtt_url, tuple(errors))
    timings["total"] = time.monotonic() - started
    return StatusReport(report.host, report.vms, report.objects, report.broker, report.planned, report.drift,
                        report.errors, timings)


def _read(providers: dict):
    """The same bulk reads as `plan` (run.read_all), each provider closed afterwards."""
    from .run import read_all, unique
    try:
        return read_all(providers)
    finally:
        for p in unique(providers):
            p.close()


# --------------------------------------------------------------------------- pure assembly

def _sync_of(plan) -> dict:
    """ResourceId -> (sync, drift fields, reason) from a plan."""
    out: dict = {}
    if plan is None:
        return out
    for a in plan.steps:
        if a.verb == "noop":
            out[a.id] = ("in sync", (), a.reason)
        elif a.refused:
            out[a.id] = ("refused", tuple(a.fields), a.refused)
        elif a.verb == "create":
            out[a.id] = ("missing", tuple(a.fields), a.reason)
        else:
            out[a.id] = ("drifted", tuple(a.fields) or (f"({a.verb})",), a.reason)
    for rid, reason in plan.orphans:
        out.setdefault(rid, ("orphan", (), reason))
    return out


def _state(live) -> str:
    if live is None:
        return "absent"
    if live.id.kind == "VirtualMachine":
        return str(live.facts.get("state", "unknown"))
    if live.id.kind == "Topic":
        return "retained" if live.spec.get("retained") else "present"
    if live.id.kind == "StoragePool":
        return "active" if live.facts.get("active") else "inactive"
    return str(live.spec.get("state") or "present")


def build(first, second, resources, snapshot, plan, sys_stats, mqtt_url: str, errors: tuple = ()) -> StatusReport:
    """PURE: the two statistics samples, the read snapshot, the plan and the $SYS figures -> StatusReport."""
    now = time.time()
    declared = {r.id: r for r in resources}
    sync = _sync_of(plan)
    order = {k: i for i, k in enumerate(NAMES)}

    objects: dict[ResourceId, Obj] = {}
    for rid, live in snapshot.objects.items():
        if live.facts.get("backup"):
            continue    # a backup's volumes: listed by `reconciler backups`, summed up as the VM's backup age
        s, fields, reason = sync.get(rid, (None, (), ""))
        objects[rid] = Obj(rid.kind, rid.name, bool(live.managed), rid in declared, s, _state(live), fields, reason)
    for rid in declared:
        if rid not in objects:
            s, fields, reason = sync.get(rid, (None, (), ""))
            objects[rid] = Obj(rid.kind, rid.name, False, True, s, "absent", fields, reason)

    from .kinds.backup import backup_ages
    ages = backup_ages(snapshot.objects, now)
    cur = second or first
    before = {d.name: d for d in first.domains}
    dt = (second.taken_at - first.taken_at) if second else 0.0
    vms = []
    for d in cur.domains:
        o = objects.get(ResourceId("VirtualMachine", d.name))
        cpu_pct = None
        b = before.get(d.name)
        if second and b and b.cpu_time_ns is not None and d.cpu_time_ns is not None and dt > 0 and d.state == "running":
            cpu_pct = max(0.0, (d.cpu_time_ns - b.cpu_time_ns) / (dt * 1e9 * (d.vcpus or 1)) * 100.0)
        if d.balloon_available_kib is not None and d.balloon_unused_kib is not None:
            mem, source = (d.balloon_available_kib - d.balloon_unused_kib) * 1024, "guest"
        elif d.balloon_rss_kib is not None:
            mem, source = d.balloon_rss_kib * 1024, "host"
        else:
            mem, source = None, None
        assigned = d.balloon_current_kib * 1024 if d.balloon_current_kib is not None and d.state != "shutoff" else None
        vms.append(Vm(
            name=d.name, state=d.state, managed=o.managed if o else False, declared=o.declared if o else False,
            sync=o.sync if o else None, drift=o.drift if o else (), vcpus=d.vcpus,
            cpu_seconds=d.cpu_time_ns / 1e9 if d.cpu_time_ns is not None else None, cpu_percent=cpu_pct,
            memory_bytes=mem, memory_source=source, memory_assigned_bytes=assigned,
            disks=tuple(Disk(x.name, x.allocation, x.capacity) for x in d.blocks if x.capacity),
            interfaces=tuple(Interface(n.name, n.rx_bytes, n.tx_bytes) for n in d.nets),
            stale=d.stale, backup_age_seconds=ages.get(d.name)))

    broker = None
    if sys_stats is not None:
        topics = tuple(
            Topic(r.id.name, True, bool((snapshot.objects.get(r.id).spec.get("retained")
                                        if snapshot.objects.get(r.id) else None)))
            for r in resources if r.id.kind == "Topic" and "retained" in r.spec and r.spec.get("state") != "absent")
        if isinstance(sys_stats, Exception):
            broker = Broker(mqtt_url, topics=topics, error=str(sys_stats))
        else:
            s = sys_stats
            broker = Broker(s.url, s.version, s.uptime_seconds, s.clients_connected, s.messages_received_total,
                            s.messages_sent_total, s.publish_received_total, s.publish_sent_total,
                            s.bytes_received_total, s.bytes_sent_total, s.received_per_second, s.sent_per_second,
                            s.retained_messages, s.subscriptions, topics)

    drift: dict[str, int] = {}
    if plan is not None:
        drift = {k: 0 for k in NAMES}
        for a in plan.actions:
            drift[a.id.kind] = drift.get(a.id.kind, 0) + 1
    host = Host(cur.hostname, cur.uri, cur.driver, cur.libvirt_version, cur.cpus, cur.memory_bytes, now,
                first.call_seconds, first.nowait, first.fallback or (second.fallback if second else None))
    objs = tuple(sorted(objects.values(), key=lambda o: (order.get(o.kind, 99), o.name)))
    return StatusReport(host, tuple(vms), objs, broker, plan is not None, drift, errors)


def _plain(v):
    # dataclasses.asdict deep-copies every leaf: 1 s for a 1,000-VM report; this walk is ~20x faster.
    if hasattr(v, "__dataclass_fields__"):
        return {k: _plain(getattr(v, k)) for k in v.__dataclass_fields__}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def to_dict(report: StatusReport) -> dict:
    """The report as plain JSON values (for -o json)."""
    d = _plain(report)
    for vm, src in zip(d["vms"], report.vms):
        vm["receive_bytes"], vm["transmit_bytes"] = src.receive_bytes, src.transmit_bytes
    return d
