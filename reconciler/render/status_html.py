"""A StatusReport as one self-contained HTML page: inline CSS, no external assets, no JavaScript, so
a browser shows it as it is, from a file, a mail or a cron job's web folder. Every text is escaped."""
from __future__ import annotations

import time
from html import escape

from ..status import StatusReport, Vm
from .status_text import duration, size

CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--mute:#667085;--line:#e3e6eb;--ok:#1a7f37;--warn:#b54708;
--bad:#c4320a;--bar:#dfe3ea;--cpu:#3e7bfa;--mem:#8e5cf7;--disk:#12a4a4}
*{box-sizing:border-box}
body{margin:0;padding:24px;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"DejaVu Sans",sans-serif}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 10px}
.sub{color:var(--mute);margin:0 0 4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px}
.card h3{font-size:15px;margin:0 0 8px;display:flex;gap:8px;align-items:center;flex-wrap:wrap;word-break:break-all}
.badge{font-size:11px;font-weight:600;padding:1px 7px;border-radius:10px;border:1px solid currentColor;white-space:nowrap}
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}.mute{color:var(--mute)}
.row{display:grid;grid-template-columns:64px 1fr 118px;gap:8px;align-items:center;margin:5px 0;font-size:13px}
.bar{height:10px;background:var(--bar);border-radius:5px;overflow:hidden}
.bar span{display:block;height:100%;border-radius:5px}
.cpu span{background:var(--cpu)}.mem span{background:var(--mem)}.disk span{background:var(--disk)}
.fig{text-align:right;font-variant-numeric:tabular-nums;color:var(--mute)}
.meta{font-size:12px;color:var(--mute);margin-top:6px}
ul.drift{margin:8px 0 0;padding-left:18px;font-size:12.5px;color:var(--warn)}
ul.drift code{color:var(--ink)}
.stale{font-size:12.5px;color:var(--bad);margin-top:6px}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);border-radius:8px;
font-size:13px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top;word-break:break-all}
th{font-size:12px;color:var(--mute);font-weight:600}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.figs div{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.figs b{display:block;font-size:20px}.figs small{color:var(--mute)}
.err{background:#fff1f0;border:1px solid #f5c2c0;color:var(--bad);border-radius:8px;padding:10px 14px;margin:12px 0}
"""

SYNC_CLASS = {"in sync": "ok", "drifted": "warn", "missing": "warn", "orphan": "mute", "refused": "bad",
              "stale": "bad"}
STATE_CLASS = {"running": "ok", "paused": "warn", "shutoff": "mute", "crashed": "bad", "unknown": "bad"}


def _badge(text: str, cls: str) -> str:
    return f'<span class="badge {cls}">{escape(text)}</span>'


def _bar(label: str, cls: str, ratio: float | None, figure: str) -> str:
    pct = 0.0 if ratio is None else max(0.0, min(1.0, ratio)) * 100
    return (f'<div class="row"><span>{escape(label)}</span><div class="bar {cls}" title="{pct:.0f}%">'
            f'<span style="width:{pct:.1f}%"></span></div><span class="fig">{escape(figure)}</span></div>')


def _vm_card(v: Vm, planned: bool) -> str:
    head = [escape(v.name), _badge(v.state, STATE_CLASS.get(v.state, "mute"))]
    if v.stale:
        head.append(_badge("stale", "bad"))
    if v.sync:
        head.append(_badge(v.sync, SYNC_CLASS.get(v.sync, "mute")))
    elif planned:
        head.append(_badge("undeclared", "mute"))
    head.append(_badge("managed" if v.managed else "unmanaged", "mute"))
    out = [f'<div class="card" id="vm-{escape(v.name)}"><h3>{" ".join(head)}</h3>']
    out.append(_bar("CPU", "cpu", None if v.cpu_percent is None else v.cpu_percent / 100,
                    "-" if v.cpu_percent is None else f"{v.cpu_percent:.1f}% of {v.vcpus or '?'} vCPU"))
    mem_ratio = (v.memory_bytes / v.memory_assigned_bytes
                 if v.memory_bytes is not None and v.memory_assigned_bytes else None)
    out.append(_bar("Memory", "mem", mem_ratio, f"{size(v.memory_bytes)} / {size(v.memory_assigned_bytes)}"))
    alloc = sum(d.allocation_bytes or 0 for d in v.disks)
    cap = sum(d.capacity_bytes or 0 for d in v.disks)
    out.append(_bar("Disk", "disk", alloc / cap if cap else None,
                    f"{size(alloc)} / {size(cap)}" if v.disks else "no disk"))
    meta = []
    if v.interfaces:
        meta.append(f"network {size(v.receive_bytes)} received, {size(v.transmit_bytes)} sent")
    if v.memory_source:
        meta.append(f"memory in use as seen by the {v.memory_source}")
    if v.backup_age_seconds is not None:
        meta.append(f"newest backup {duration(v.backup_age_seconds)} old")
    if meta:
        out.append(f'<div class="meta">{escape("; ".join(meta))}</div>')
    if v.stale:
        out.append(f'<div class="stale">{escape(v.stale)}</div>')
    if v.drift:
        out.append('<ul class="drift">' + "".join(f"<li><code>{escape(f)}</code></li>" for f in v.drift) + "</ul>")
    out.append("</div>")
    return "".join(out)


def _fig(value, label: str) -> str:
    shown = "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))
    return f"<div><b>{escape(shown)}</b><small>{escape(label)}</small></div>"


def render(report: StatusReport) -> str:
    h = report.host
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.taken_at))
    running = sum(1 for v in report.vms if v.state == "running")
    drifted = sum(report.drift.values())
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>reconciler status: {escape(h.hostname)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(h.hostname)}</h1>",
             f'<p class="sub">{escape(h.libvirt_uri)} &middot; {escape(h.driver)} libvirt {escape(h.libvirt_version)}'
             f" &middot; {h.cpus} CPUs &middot; {escape(size(h.memory_bytes))} memory &middot; read {escape(taken)}</p>",
             f'<p class="sub">{len(report.vms)} VMs, {running} running'
             + (f" &middot; {drifted} object(s) not in sync" if report.planned else "") + "</p>"]
    for e in report.errors:
        parts.append(f'<div class="err">{escape(e)}</div>')
    if h.fallback:
        parts.append(f'<div class="err">statistics read VM by VM: {escape(h.fallback)}</div>')
    parts.append("<h2>Virtual machines</h2>")
    if report.vms:
        parts.append('<div class="grid">' + "".join(_vm_card(v, report.planned) for v in report.vms) + "</div>")
    else:
        parts.append('<p class="mute">No VMs on this host.</p>')
    b = report.broker
    if b is not None:
        parts.append(f"<h2>Broker {escape(b.url)}</h2>")
        if b.error:
            parts.append(f'<div class="err">{escape(b.error)}</div>')
        else:
            parts.append('<div class="figs">' + "".join([
                _fig(b.clients_connected, "clients connected"),
                _fig(b.received_per_second, "messages/s in (1 min)"),
                _fig(b.sent_per_second, "messages/s out (1 min)"),
                _fig(b.retained_messages, "retained messages"),
                _fig(b.subscriptions, "subscriptions"),
                _fig(duration(b.uptime_seconds), f"up (mosquitto {b.version or '?'})")]) + "</div>")
        if b.topics:
            parts.append("<h2>Declared retained messages</h2><table><tr><th>Topic</th><th>Retained message</th></tr>")
            for t in b.topics:
                parts.append(f"<tr><td>{escape(t.name)}</td><td>"
                             + (_badge("present", "ok") if t.retained_present else _badge("missing", "bad"))
                             + "</td></tr>")
            parts.append("</table>")
    others = [o for o in report.objects if o.kind != "VirtualMachine"]
    if others:
        parts.append("<h2>Other objects</h2><table><tr><th>Kind</th><th>Name</th><th>Managed</th><th>Declared</th>"
                     "<th>Sync</th><th>State</th></tr>")
        for o in others:
            s = o.sync or ("undeclared" if report.planned else "-")
            cell = _badge(s, SYNC_CLASS.get(s, "mute")) if report.planned else "-"
            if o.drift and o.sync in ("drifted", "refused"):
                cell += '<ul class="drift">' + "".join(f"<li><code>{escape(f)}</code></li>" for f in o.drift) + "</ul>"
            parts.append(f"<tr><td>{escape(o.kind)}</td><td>{escape(o.name)}</td><td>{'yes' if o.managed else 'no'}"
                         f"</td><td>{'yes' if o.declared else 'no'}</td><td>{cell}</td><td>{escape(o.state)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
