"""A StatusReport as text for a terminal: the host line, a VM table (MEMORY is in use/assigned, DISK
allocation/capacity, NET bytes received/sent), the broker's figures, the other objects. A small hand-made table: the columns are fixed and few, so a table library would add a
dependency without earning it; long names are shortened to keep each line within the width."""
from __future__ import annotations

from ..status import StatusReport, Vm


def size(n: float | int | None) -> str:
    """Bytes in IEC units, short: 512B, 1.5K, 20M, 3.0G."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{n:.0f}B"
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return "-"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s // span}{unit}"
    return f"{s}s"


def cpu(vm: Vm) -> str:
    return "-" if vm.cpu_percent is None else f"{vm.cpu_percent:.0f}%"


def memory(vm: Vm) -> str:
    if vm.memory_bytes is None and vm.memory_assigned_bytes is None:
        return "-"
    return f"{size(vm.memory_bytes)}/{size(vm.memory_assigned_bytes)}"


def disk(vm: Vm) -> str:
    if not vm.disks:
        return "-"
    alloc = sum(d.allocation_bytes or 0 for d in vm.disks)
    cap = sum(d.capacity_bytes or 0 for d in vm.disks)
    return f"{size(alloc)}/{size(cap)}"


def net(vm: Vm) -> str:
    return f"{size(vm.receive_bytes)}/{size(vm.transmit_bytes)}" if vm.interfaces else "-"


def _table(header: tuple, rows: list[tuple], width: int, shrink: int = 0) -> list[str]:
    """Left-aligned columns two spaces apart; column `shrink` is cut (with ~) to fit `width`."""
    cols = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    over = sum(cols) + 2 * (len(cols) - 1) - width
    if over > 0:
        cols[shrink] = max(8, cols[shrink] - over)

    def cell(v, w: int) -> str:
        v = str(v)
        return v if len(v) <= w else v[: w - 1] + "~"

    return ["  ".join(cell(v, w).ljust(w) for v, w in zip(r, cols)).rstrip() for r in [header, *rows]]


def render(report: StatusReport, width: int = 100) -> str:
    h = report.host
    running = sum(1 for v in report.vms if v.state == "running")
    mode = "NOWAIT" if h.nowait else "no NOWAIT"
    lines = [f"host {h.hostname}: {h.cpus} CPUs, {size(h.memory_bytes)} memory; {len(report.vms)} VMs, {running} running",
             f"  {h.libvirt_uri} ({h.driver}, libvirt {h.libvirt_version}); "
             f"statistics in {h.stats_call_seconds * 1000:.1f} ms ({mode})"]
    if h.fallback:
        lines.append(f"  statistics read VM by VM: {h.fallback}")
    if report.vms:
        rows = []
        for v in report.vms:
            rows.append((v.name, v.state, "yes" if v.managed else "no",
                         "stale" if v.stale else (v.sync or ("undeclared" if report.planned else "-")), cpu(v),
                         memory(v), disk(v), net(v), duration(v.backup_age_seconds)))
        header = ("VM", "STATE", "MANAGED", "SYNC", "CPU", "MEMORY", "DISK", "NET RX/TX", "BACKUP")
        # Figures no VM has (no interfaces with counters, no backups) make no column: room for names.
        keep = [i for i in range(len(header)) if i < 4 or any(r[i] != "-" for r in rows)]
        table = _table(tuple(header[i] for i in keep), [tuple(r[i] for i in keep) for r in rows], width)
        lines.append("")
        lines.append(table[0])
        for v, line in zip(report.vms, table[1:]):
            lines.append(line)
            if v.drift:
                lines.append(f"    drifted: {', '.join(v.drift)}")
            if v.stale:
                lines.append(f"    stale: {v.stale}")
    b = report.broker
    if b is not None:
        lines.append("")
        if b.error:
            lines.append(f"broker {b.url}: figures unavailable: {b.error}")
        else:
            rate = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
            lines.append(f"broker {b.url}: mosquitto {b.version or '?'}, up {duration(b.uptime_seconds)}")
            lines.append(f"  {b.clients_connected if b.clients_connected is not None else '-'} clients connected, "
                         f"{rate(b.received_per_second)} msg/s in, {rate(b.sent_per_second)} msg/s out, "
                         f"{b.retained_messages if b.retained_messages is not None else '-'} retained messages")
        for t in b.topics:
            lines.append(f"  topic {t.name}: retained message {'present' if t.retained_present else 'MISSING'}")
    others = [o for o in report.objects if o.kind != "VirtualMachine"]
    if others:
        rows = [(o.kind, o.name, "yes" if o.managed else "no", "yes" if o.declared else "no",
                 (o.sync or "undeclared") if report.planned else "-", o.state) for o in others]
        table = _table(("KIND", "NAME", "MANAGED", "DECLARED", "SYNC", "STATE"), rows, width, shrink=1)
        lines.append("")
        lines.append(table[0])
        for o, line in zip(others, table[1:]):
            lines.append(line)
            if o.drift and o.sync in ("drifted", "refused"):
                lines.append(f"    drifted: {', '.join(o.drift)}")
    if report.planned:
        total = sum(report.drift.values())
        lines.append("")
        lines.append(f"drift: {total} object(s) not in sync"
                     + (" (" + ", ".join(f"{k}={n}" for k, n in report.drift.items() if n) + ")" if total else ""))
    for e in report.errors:
        lines.append(f"error: {e}")
    return "\n".join(lines) + "\n"
