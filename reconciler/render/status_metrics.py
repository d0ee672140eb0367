"""A StatusReport as Prometheus series, written with the prometheus-client library: its text exposition
escapes label values and orders HELP/TYPE/samples correctly, and `write_to_textfile` writes a temporary
file beside the target and renames it, so node_exporter's textfile collector never reads half a file.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` only on counters, `_ratio`
for 0..1. Every series of a VM carries `vm`; disks add `disk`, interfaces `interface`.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..status import StatusReport

# Every series this module can write, for the Grafana dashboard's test and the README.
SERIES = (
    "reconciler_vm_up", "reconciler_vm_running", "reconciler_vm_vcpus", "reconciler_vm_cpu_seconds_total",
    "reconciler_vm_cpu_usage_ratio", "reconciler_vm_memory_bytes", "reconciler_vm_memory_assigned_bytes",
    "reconciler_vm_disk_allocation_bytes", "reconciler_vm_disk_capacity_bytes",
    "reconciler_vm_network_receive_bytes_total", "reconciler_vm_network_transmit_bytes_total",
    "reconciler_backup_age_seconds", "reconciler_vm_managed", "reconciler_vm_in_sync",
    "reconciler_host_cpus", "reconciler_host_memory_bytes", "reconciler_libvirt_stats_duration_seconds",
    "reconciler_status_timestamp_seconds",
    "reconciler_broker_up", "reconciler_broker_clients_connected", "reconciler_broker_messages_received_total",
    "reconciler_broker_messages_sent_total", "reconciler_broker_publish_messages_received_total",
    "reconciler_broker_publish_messages_sent_total", "reconciler_broker_received_bytes_total",
    "reconciler_broker_sent_bytes_total", "reconciler_broker_retained_messages", "reconciler_broker_subscriptions",
    "reconciler_broker_uptime_seconds", "reconciler_topic_retained_present",
    "reconciler_drift",
)


class _Collector:
    def __init__(self, report: StatusReport):
        self.r = report

    def collect(self):
        r = self.r
        g = lambda name, doc, labels=(): GaugeMetricFamily(name, doc, labels=list(labels))  # noqa: E731
        up = g("reconciler_vm_up", "1 when the VM's statistics answered in the last status read, 0 when stale.", ["vm"])
        running = g("reconciler_vm_running", "1 when the VM is running.", ["vm"])
        vcpus = g("reconciler_vm_vcpus", "vCPUs the VM has.", ["vm"])
        cpu = CounterMetricFamily("reconciler_vm_cpu_seconds", "CPU time the VM has used.", labels=["vm"])
        cpu_ratio = g("reconciler_vm_cpu_usage_ratio",
                      "Share of the VM's vCPUs busy between the two samples of the status read (0..1).", ["vm"])
        mem = g("reconciler_vm_memory_bytes", "Memory in use: the guest's own figure when its balloon driver reports "
                                              "one, else the QEMU process's resident memory.", ["vm"])
        mem_set = g("reconciler_vm_memory_assigned_bytes", "Memory the VM has now (balloon current).", ["vm"])
        alloc = g("reconciler_vm_disk_allocation_bytes", "Bytes allocated on the host for the disk.", ["vm", "disk"])
        cap = g("reconciler_vm_disk_capacity_bytes", "Size of the disk as the guest sees it.", ["vm", "disk"])
        rx = CounterMetricFamily("reconciler_vm_network_receive_bytes", "Bytes the VM's interface received.",
                                 labels=["vm", "interface"])
        tx = CounterMetricFamily("reconciler_vm_network_transmit_bytes", "Bytes the VM's interface sent.",
                                 labels=["vm", "interface"])
        # The same name and help as plan/apply's metrics (render/metrics.py).
        backup = g("reconciler_backup_age_seconds", "Seconds since the VM's newest good backup.", ["vm"])
        managed = g("reconciler_vm_managed", "1 when the VM carries the reconciler's ownership marker.", ["vm"])
        in_sync = g("reconciler_vm_in_sync", "1 when the declared VM matches its manifest (only with manifest paths).",
                    ["vm"])
        for v in r.vms:
            up.add_metric([v.name], 0 if v.stale else 1)
            running.add_metric([v.name], 1 if v.state == "running" else 0)
            managed.add_metric([v.name], 1 if v.managed else 0)
            if v.sync is not None:
                in_sync.add_metric([v.name], 1 if v.sync == "in sync" else 0)
            if v.vcpus is not None:
                vcpus.add_metric([v.name], v.vcpus)
            if v.cpu_seconds is not None:
                cpu.add_metric([v.name], v.cpu_seconds)
            if v.cpu_percent is not None:
                cpu_ratio.add_metric([v.name], v.cpu_percent / 100)
            if v.memory_bytes is not None:
                mem.add_metric([v.name], v.memory_bytes)
            if v.memory_assigned_bytes is not None:
                mem_set.add_metric([v.name], v.memory_assigned_bytes)
            for d in v.disks:
                if d.allocation_bytes is not None:
                    alloc.add_metric([v.name, d.name], d.allocation_bytes)
                if d.capacity_bytes is not None:
                    cap.add_metric([v.name, d.name], d.capacity_bytes)
            for i in v.interfaces:
                rx.add_metric([v.name, i.name], i.receive_bytes)
                tx.add_metric([v.name, i.name], i.transmit_bytes)
            if v.backup_age_seconds is not None:
                backup.add_metric([v.name], v.backup_age_seconds)
        yield from (up, running, vcpus, cpu, cpu_ratio, mem, mem_set, alloc, cap, rx, tx, backup, managed, in_sync)

        h = r.host
        m = g("reconciler_host_cpus", "CPUs of the host.")
        m.add_metric([], h.cpus)
        yield m
        m = g("reconciler_host_memory_bytes", "Memory of the host.")
        m.add_metric([], h.memory_bytes)
        yield m
        m = g("reconciler_libvirt_stats_duration_seconds", "Wall time of one getAllDomainStats call.")
        m.add_metric([], h.stats_call_seconds)
        yield m
        m = g("reconciler_status_timestamp_seconds", "When the status read was taken (Unix time).")
        m.add_metric([], h.taken_at)
        yield m

        b = r.broker
        if b is not None:
            m = g("reconciler_broker_up", "1 when the broker's $SYS figures were read.")
            m.add_metric([], 0 if b.error else 1)
            yield m
            for name, doc, value, counter in (
                    ("reconciler_broker_clients_connected", "Clients connected to the broker.", b.clients_connected, False),
                    ("reconciler_broker_messages_received", "MQTT packets of every type the broker received.",
                     b.messages_received_total, True),
                    ("reconciler_broker_messages_sent", "MQTT packets of every type the broker sent.",
                     b.messages_sent_total, True),
                    ("reconciler_broker_publish_messages_received", "PUBLISH messages the broker received.",
                     b.publish_received_total, True),
                    ("reconciler_broker_publish_messages_sent", "PUBLISH messages the broker sent.",
                     b.publish_sent_total, True),
                    ("reconciler_broker_received_bytes", "Bytes the broker received.", b.bytes_received_total, True),
                    ("reconciler_broker_sent_bytes", "Bytes the broker sent.", b.bytes_sent_total, True),
                    ("reconciler_broker_retained_messages", "Retained messages the broker holds.",
                     b.retained_messages, False),
                    ("reconciler_broker_subscriptions", "Subscriptions on the broker.", b.subscriptions, False),
                    ("reconciler_broker_uptime_seconds", "Seconds since the broker started.", b.uptime_seconds, False)):
                if value is None:
                    continue
                fam = CounterMetricFamily(name, doc) if counter else g(name, doc)
                fam.add_metric([], value)
                yield fam
            if b.topics:
                m = g("reconciler_topic_retained_present",
                      "1 when the retained message a declared Topic must hold is on the broker.", ["topic"])
                for t in b.topics:
                    m.add_metric([t.name], 1 if t.retained_present else 0)
                yield m
        if r.planned:
            m = g("reconciler_drift", "Declared objects whose live state differs from the manifests, per kind.",
                  ["kind"])
            for kind, n in r.drift.items():
                m.add_metric([kind], n)
            yield m


def registry(report: StatusReport) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(report))
    return reg


def text(report: StatusReport) -> str:
    return generate_latest(registry(report)).decode("utf-8")


def write(path: str, report: StatusReport) -> None:
    write_to_textfile(path, registry(report))
